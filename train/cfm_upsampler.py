"""Train a CFM upsampler: `accelerate launch train/cfm_upsampler.py --config configs/X.yaml [--key value ...]`.

The same code runs as `fmboost train --config X.yaml` (single process, in-process) and unchanged on
CPU, one GPU or many through Accelerate. One step reads images (or cached latents) → latents →
coupling → CFM loss → optimizer step → EMA; see `train_step`. Posterior-mean flows (`source:
posterior_mean`) also load their frozen estimate — a regression upsampler R, or a pretrained restorer — and read
its estimates from the cache.

Several processes (`torchrun --nproc_per_node N` or `accelerate launch --multi_gpu`, also on CPUs with
gloo) are data-parallel: `train_batch_size` is per process, every rank draws its own noise, rank 0
alone logs, validates and saves, and the run refuses to start when Accelerate sees fewer processes
than the launcher started. A checkpoint resumes with another number of processes: the global step,
epoch, position in the epoch's sample order and LR schedule carry over (`checkpoint.continue_with`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from fmboost.models import CFMUNet, CouplingFlowMatcher, FirstStage, Upsampler, load_first_stage
from fmboost.models.autoencoders import DIFFUSERS_KINDS
from fmboost.models.calibration import describe, fit_calibration
from fmboost.models.metrics import LPIPS_MIN_SIZE, MetricUnavailable, load_lpips
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.models.restorer import Restorer
from fmboost.pipelines.processes import has_device, launched_as
from fmboost.train import checkpoint as ckpt
from fmboost.train.config import TrainConfig, add_config_arguments, load_config, overrides_from_args
from fmboost.train.data import EpochSampler, PairDataset, image_records, split_records, validation_pairs
from fmboost.train.latent_cache import (
    CachedLatentDataset,
    build_or_load,
    cache_location,
    encode_batch,
    posterior_mean_file,
    restorer_estimate_file,
    training_latent_stats,
    weights_digest,
)
from fmboost.train.validation import validate
from tqdm.auto import tqdm

# Tests set FMBOOST_FAULT_INJECT=kill_after_step:<n> to SIGKILL every process right after step n.
KILL_AFTER = "kill_after_step:"
#: Patches per validation image (an even grid over it) that the per-band detail dial is fitted on.
CALIBRATION_CROPS = 16


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and the last checkpoint stays as it was."""


@dataclass
class StepOutput:
    loss: float
    grad_norm: float | None  # only on steps that update the weights


@dataclass
class Optimization:
    """What updates the weights: the optimizer, its LR schedule and the EMA of the weights (None: no EMA)."""

    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMAModel | None = None


def batch_latents(batch: dict, upsampler: Upsampler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x1, the conditioning, the estimate or None), each (B, C, H, W): read from the latent cache, or encoded
    from the image pair (and the estimate made: R on cond, or the restorer's image encoded) on the fly."""
    first_stage, flow = upsampler.first_stage, upsampler.flow
    if "hr_latent" in batch:
        x1, cond = batch["hr_latent"], batch["cond"]
    else:
        x1, cond = encode_batch(batch, first_stage, flow)
    if not flow.needs_posterior_mean:
        return x1, cond, None
    if "estimate" in batch:
        estimate = batch["estimate"]
    elif upsampler.restorer is not None:
        estimate = first_stage.encode(upsampler.restorer(batch["lr"]))
    else:
        estimate = upsampler.estimate(cond, first_stage.latent_mean, first_stage.latent_std)
    return x1, flow.conditioning(cond, estimate), estimate


def train_step(batch: dict, upsampler: Upsampler, optimization: Optimization, accelerator: Accelerator,
               config: TrainConfig, step: int) -> StepOutput:
    """One micro-batch of the upsampler under training (its model the prepared network): image → latents
    (+ the estimate) → coupling → loss → backward; on accumulation boundaries also clip, step the optimizer and
    LR schedule, and update the EMA."""
    model, optimizer, ema = upsampler.model, optimization.optimizer, optimization.ema
    x1, cond, estimate = batch_latents(batch, upsampler)
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = upsampler.flow.loss(model, x1, cond, estimate=estimate)  # samples t and the source x0 inside
        losses = accelerator.gather(loss.detach()[None])
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteLossError(f"non-finite loss {losses.tolist()} at step {step + 1}; stopping. The last "
                                     f"checkpoint in {config.output_dir} is untouched (lower learning_rate, or "
                                     "use mixed_precision: no / bf16)")
        accelerator.backward(loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        optimization.lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if accelerator.sync_gradients and ema is not None:
        ema.step(model.parameters())
    return StepOutput(losses.mean().item(), None if grad_norm is None else float(grad_norm))


def build_first_stage(config: TrainConfig, device: torch.device) -> FirstStage:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision) \
        if config.first_stage in DIFFUSERS_KINDS and device.type == "cuda" else None
    first_stage = load_first_stage(config.first_stage, config.first_stage_path, config.first_stage_subfolder, dtype)
    return first_stage.to(device).eval().requires_grad_(False)


def load_estimate(config: TrainConfig, device: torch.device) -> PosteriorMean | Restorer:
    """The frozen estimate: the `restorer` weights file (of the same scale), or R from `posterior_mean_model`, a
    regression upsampler of the same scale and first stage."""
    if config.restorer:
        restorer = Restorer.load(config.restorer, device)
        if restorer.scale != config.scale:
            raise ValueError(f"restorer {config.restorer} up-scales ×{restorer.scale}, this run ×{config.scale}")
        return restorer
    try:
        upsampler = Upsampler.from_pretrained(config.posterior_mean_model)
    except FileNotFoundError as err:
        raise ValueError(f"posterior_mean_model: {err}") from None
    if upsampler.scale != config.scale or upsampler.first_stage.spec["kind"] != config.first_stage:
        raise ValueError(f"posterior_mean_model {config.posterior_mean_model} up-samples ×{upsampler.scale} in "
                         f"{upsampler.first_stage.spec['kind']!r} latents; this run needs ×{config.scale} in "
                         f"{config.first_stage!r}")
    return PosteriorMean.from_upsampler(upsampler).to(device)


def build_model(config: TrainConfig, latent_channels: int) -> CFMUNet:
    overrides = {k: tuple(v) if isinstance(v, list) else v for k in ("block_out_channels", "layers_per_block",
                 "attention_levels") if (v := getattr(config, k)) is not None}
    if "block_out_channels" in overrides and "attention_levels" not in overrides:  # no attention unless asked
        overrides["attention_levels"] = tuple(False for _ in overrides["block_out_channels"])
    model = CFMUNet.from_preset(config.model_preset, latent_channels=latent_channels, padding_mode=config.padding_mode,
                                **overrides)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def build_optimizer(config: TrainConfig, model: torch.nn.Module, num_processes: int = 1):
    """AdamW + a diffusers schedule (warm-up, then `lr_scheduler`); the scheduler is stepped by every process."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * num_processes,
                                 num_training_steps=config.max_train_steps * num_processes)
    return optimizer, lr_scheduler


def build_dataset(config: TrainConfig, records, first_stage: FirstStage, flow: CouplingFlowMatcher,
                  accelerator: Accelerator, estimate: PosteriorMean | Restorer | None = None):
    """Training dataset (cached latents, with the estimates for posterior-mean flows, or on-the-fly image pairs);
    sets the first stage's latent stats."""
    if config.use_latent_cache:
        cache_dir, elsewhere = cache_location(config)
        cache = build_or_load(records, config, first_stage, flow, cache_dir, accelerator, elsewhere)  # all processes
        status = "hit" if cache.hit else f"built, encoding {cache.encode_samples_per_second:.2f} samples/s"
        accelerator.print(f"latent cache {status}: {cache.num_samples} samples in {cache.path}")
        estimates = None
        if isinstance(estimate, Restorer):
            estimates = restorer_estimate_file(cache, estimate, records, config, first_stage, state=accelerator)
        elif estimate is not None:
            estimates = posterior_mean_file(cache, estimate, first_stage, state=accelerator)
        return CachedLatentDataset(cache, config, estimates), cache
    mean, std = training_latent_stats(records, config, first_stage)
    first_stage.set_latent_stats(mean, std)
    return PairDataset(records, config), None


def run_summary(config: TrainConfig, model: CFMUNet, num_samples: int, num_images: int,
                num_val_images: int, num_processes: int) -> str:
    """One line a log reader needs before the progress bar: what trains, on how much data, for how long."""
    params = model.num_parameters()
    batch = config.train_batch_size * num_processes * config.gradient_accumulation_steps
    return (f"training a {config.objective} upsampler of {params / 1e6:.3g} M parameters: {num_samples} samples of "
            f"{num_images} images ({num_val_images} held out for validation), batch {batch}, "
            f"{config.max_train_steps} steps ({config.max_train_steps * batch / num_samples:.1f} epochs) on "
            f"{num_processes} process{'es' if num_processes > 1 else ''} ({config.train_batch_size} samples each)")


def tracker_config(config: TrainConfig) -> dict:
    """TensorBoard hparams accept only scalars and strings."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


def make_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator over every launched process. Without a GPU (or other accelerator) Accelerate would
    run each of N processes that torchrun started as a lone single-process run, all writing the same
    output_dir: there `cpu=True` selects gloo; any other mismatch with WORLD_SIZE is an error."""
    rank, world_size = launched_as()
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        cpu=world_size > 1 and not has_device(),
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision,
        log_with=None if config.report_to in (None, "none") else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / config.logging_dir)))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(f"rank {rank}: launched as one of {world_size} processes, but Accelerate runs "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}); check the launcher")
    return accelerator


def train(config: TrainConfig) -> Path:
    """Run the whole training; returns the saved Upsampler folder."""
    output_dir = Path(config.output_dir)
    accelerator = make_accelerator(config)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed, device_specific=True)  # seed + rank: each process draws its own t and x0
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temporaries(output_dir)
    train_records, val_records = split_records(image_records(config), config)
    first_stage, flow = build_first_stage(config, accelerator.device), config.flow()
    estimate = load_estimate(config, accelerator.device) if flow.needs_posterior_mean else None
    dataset, _ = build_dataset(config, train_records, first_stage, flow, accelerator, estimate)
    if len(dataset) < config.train_batch_size:
        raise ValueError(f"{len(dataset)} training samples < train_batch_size {config.train_batch_size}; "
                         "raise crops_per_image or add images")
    val_pairs = validation_pairs(val_records, config, config.crop_size, 1) if val_records else None

    model = build_model(config, first_stage.latent_channels)
    accelerator.print(run_summary(config, model, len(dataset), len(train_records), len(val_records),
                                  accelerator.num_processes))
    optimizer, lr_scheduler = build_optimizer(config, model, accelerator.num_processes)
    sampler = EpochSampler(dataset, config.seed)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                             drop_last=True, num_workers=config.dataloader_num_workers,
                                             generator=torch.Generator().manual_seed(config.seed))
    # ^ its own generator: creating an epoch's iterator must not draw from the global RNG, whose state
    #   the checkpoints restore (else a resumed run would see different noise)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    ema = None
    if config.use_ema:
        ema = EMAModel(model.parameters(), decay=config.ema_decay, model_cls=CFMUNet,
                       model_config=accelerator.unwrap_model(model).config)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    # the upsampler under training: the prepared network with what it will be saved with
    upsampler = Upsampler(model, first_stage, flow, config.scale, config.sampler_config(), estimate)
    optimization = Optimization(optimizer, lr_scheduler, ema)

    state = ckpt.TrainerState(0, 0, 0, accelerator.num_processes)
    resume = [ckpt.resolve_checkpoint(output_dir, config.resume_from_checkpoint) if accelerator.is_main_process
              else None]
    resume = broadcast_object_list(resume)[0]  # rank 0's choice: every rank loads the same checkpoint
    if resume is not None:
        saved_by = ckpt.read_trainer_state(resume).num_processes
        state = ckpt.load_checkpoint(accelerator, resume, network_config(accelerator.unwrap_model(model)))
        accelerator.step = state.global_step * config.gradient_accumulation_steps
        sync_lr_schedule(lr_scheduler, state.global_step, accelerator.num_processes)
        accelerator.print(f"resumed from {resume} at step {state.global_step}"
                          + (f" (saved by {saved_by} processes, continued by {accelerator.num_processes}: the step, "
                             "epoch, position in the epoch's sample order and LR schedule carry over, the noise draws "
                             "do not)"
                             if saved_by not in (None, accelerator.num_processes) else ""))
    accelerator.init_trackers("fmboost", config=tracker_config(config))
    final = run_loop(upsampler, optimization, accelerator, config, dataloader, state, val_pairs)
    return save_upsampler(upsampler, optimization.ema, accelerator, config, final, val_records)


def network_config(model: CFMUNet) -> dict:
    """The (unwrapped) CFMUNet's constructor arguments: its diffusers config without bookkeeping keys, as JSON
    would give them back."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def sync_lr_schedule(lr_scheduler, global_step: int, num_processes: int) -> None:
    """Put the schedule at `global_step`: the prepared scheduler advances `num_processes` times per step (see
    `build_optimizer`), so a checkpoint saved by another world size holds another count."""
    scheduler = lr_scheduler.scheduler
    scheduler.last_epoch = global_step * num_processes - 1
    scheduler.step()  # recomputes every group's LR at last_epoch + 1


def run_loop(upsampler: Upsampler, optimization: Optimization, accelerator: Accelerator, config: TrainConfig,
             dataloader, state: ckpt.TrainerState, val_pairs) -> ckpt.TrainerState:
    """Epochs of `train_step` of the upsampler under training until `max_train_steps`, with logging, validation
    and checkpoints."""
    faults = ckpt.injected_faults()
    progress = tqdm(total=config.max_train_steps, initial=state.global_step, desc="train",
                    disable=not accelerator.is_main_process)
    samples = config.train_batch_size * accelerator.num_processes
    start, samples_done = time.perf_counter(), 0
    model = upsampler.model
    model.train()
    while state.global_step < config.max_train_steps:
        if state.batches_in_epoch >= len(dataloader):  # a checkpoint at the very end of an epoch
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        dataloader.set_epoch(state.epoch)  # the loader re-applies its epoch to the sampler and dataset
        epoch_loader = accelerator.skip_first_batches(dataloader, state.batches_in_epoch) \
            if state.batches_in_epoch else dataloader
        epoch_loader.set_epoch(state.epoch)
        for batch in epoch_loader:
            out = train_step(batch, upsampler, optimization, accelerator, config, state.global_step)
            state.batches_in_epoch += 1
            samples_done += samples
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            rate = samples_done / (time.perf_counter() - start)
            logs = {"loss": out.loss, "lr": optimization.lr_scheduler.get_last_lr()[0], "samples_per_second": rate}
            if out.grad_norm is not None:
                logs["grad_norm"] = out.grad_norm
            progress.update(1)
            progress.set_postfix(loss=f"{out.loss:.4f}", samples_s=f"{rate:.1f}")
            accelerator.log(logs, step=state.global_step)
            if state.global_step % config.checkpointing_steps == 0 or state.global_step == config.max_train_steps:
                ckpt.save_checkpoint(accelerator, config.output_dir, state, config.checkpoints_total_limit,
                                     network_config(accelerator.unwrap_model(model)))
            if val_pairs is not None and (state.global_step % config.validation_steps == 0
                                          or state.global_step == config.max_train_steps):
                run_validation(upsampler, optimization.ema, accelerator, config, val_pairs, state.global_step)
            if f"{KILL_AFTER}{state.global_step}" in faults:
                os.kill(os.getpid(), signal.SIGKILL)
            if state.global_step >= config.max_train_steps:
                break
        else:
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    progress.close()
    return state


def unwrapped(upsampler: Upsampler, accelerator: Accelerator) -> Upsampler:
    """The upsampler under training on the bare network (no data-parallel wrapper): what validation samples and
    what is saved."""
    return dataclasses.replace(upsampler, model=accelerator.unwrap_model(upsampler.model))


def run_validation(upsampler: Upsampler, ema: EMAModel | None, accelerator: Accelerator, config: TrainConfig,
                   val_pairs, step: int) -> None:
    if not accelerator.is_main_process:
        return
    bare = unwrapped(upsampler, accelerator)
    if ema is not None:  # validate the EMA weights, then put the training weights back
        ema.store(bare.model.parameters())
        ema.copy_to(bare.model.parameters())
    result = validate(bare, val_pairs, step, config.output_dir, config.seed)
    if ema is not None:
        ema.restore(bare.model.parameters())
    accelerator.log({"val_psnr": result.psnr, "val_ssim": result.ssim}, step=step)
    tqdm.write(f"step {step}: validation PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.4f} → {result.grid}")


def save_upsampler(upsampler: Upsampler, ema: EMAModel | None, accelerator: Accelerator, config: TrainConfig,
                   state: ckpt.TrainerState, val_records=()) -> Path:
    """The (EMA) weights as an `Upsampler` folder: CFMUNet + boost_config.json (incl. latent stats), and R
    for posterior-mean flows, so the folder runs on its own — with its render settings fitted on the validation
    images (`fit_render_settings`): the back-projection steps that measure best, and for posterior-mean flows
    the per-band fidelity dial."""
    accelerator.wait_for_everyone()
    target = Path(config.output_dir) / "upsampler"
    bare = unwrapped(upsampler, accelerator)
    replicas = ""
    if accelerator.num_processes > 1:
        digest = replicas_digest(accelerator, ema.shadow_params if ema is not None else bare.model.parameters())
        replicas = f" (weights sha256 {digest}, identical on all {accelerator.num_processes} processes)"
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to(bare.model.parameters())
        if val_records:
            bare = fit_render_settings(bare, val_records, config)
        bare.save_pretrained(target)
        accelerator.print(f"saved the {'EMA ' if ema else ''}upsampler after {state.global_step} steps to {target}"
                          + replicas)
    accelerator.wait_for_everyone()  # no rank tears the process group down while another is still in it
    accelerator.end_training()
    return target


def fit_render_settings(upsampler: Upsampler, val_records, config: TrainConfig) -> Upsampler:
    """`fmboost.models.calibration` on CALIBRATION_CROPS patches of each validation image, images the flow
    and R never trained on: the folder's back-projection steps, and (posterior-mean flows, `calibrate_detail`)
    the per-band dial, its band order measured with LPIPS (`detail_path: lpips`) when the LPIPS weights load,
    else all bands together (said why). Returns the upsampler with them."""
    lpips = None
    dial = config.calibrate_detail and upsampler.flow.needs_posterior_mean
    if dial and config.detail_path == "lpips" and config.crop_size < LPIPS_MIN_SIZE:
        tqdm.write(f"detail path: uniform, LPIPS needs patches of at least {LPIPS_MIN_SIZE}², crop_size is "
                   f"{config.crop_size}")
    elif dial and config.detail_path == "lpips":
        try:
            lpips = load_lpips(None, next(upsampler.model.parameters()).device)
        except MetricUnavailable as err:
            tqdm.write(f"detail path: uniform, the LPIPS weights are missing ({err})")
    pairs = validation_pairs(val_records, config, config.crop_size, CALIBRATION_CROPS)
    was_training = upsampler.model.training
    upsampler.model.eval()
    result = fit_calibration(upsampler, zip(pairs["lr"].split(1), pairs["hr"].split(1)), seed=config.seed,
                             total=len(pairs["hr"]), lpips=lpips, fit_dial=dial)
    upsampler.model.train(was_training)
    tqdm.write("render settings fitted on the validation images:\n" + describe(result, upsampler.scale))
    return result.apply(upsampler)


def replicas_digest(accelerator: Accelerator, params) -> str:
    """The digest of `params`, checked equal on every process: data parallelism keeps the replicas
    bit-identical, so a difference means some rank trained on its own, and nothing is saved."""
    digests = gather_object([weights_digest(params)])
    if len(set(digests)) > 1:
        raise RuntimeError("the weights differ between processes (sha256 by rank: "
                           + ", ".join(f"{rank}: {d[:12]}" for rank, d in enumerate(digests)) + "); not saving")
    return digests[0]


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The config a command line names: `--config` and the overrides, the options of `fmboost train`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="flat YAML config (keys = fmboost.train.config.TrainConfig fields)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return load_config(args.config, overrides_from_args(args))


def main(argv: list[str] | None = None) -> int:
    rank, world_size = launched_as()
    where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    try:
        config = parse_args(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"error{where}: {err}", file=sys.stderr)
        return 2
    try:
        train(config)
    except NonFiniteLossError as err:
        print(f"error{where}: {err}", file=sys.stderr)
        return 1
    except Exception:
        if world_size > 1:  # the traceback follows; say whose it is
            print(f"error{where}: training failed", file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    code = main()
    if launched_as()[1] > 1:
        # Everything is saved and the process group is destroyed. Skip the interpreter's teardown: freeing DDP's
        # gloo Reducer there can deadlock (its ProcessGroupGloo destructor, run with the GIL held, waits on gloo's
        # worker thread, which waits for the GIL to release the tensors of the last collective).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
