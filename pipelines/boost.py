"""BoostPipeline: prompt → SD1.5/LCM latent at 256² → CFM upsampler → VAE decode at 1024².

A diffusers `DiffusionPipeline`, so `save_pretrained` / `from_pretrained`, `.to()`,
`enable_model_cpu_offload` and `set_progress_bar_config` work as users expect. Components:

    text_encoder, tokenizer, unet, scheduler   the base text-to-image model (any SD-family pipeline)
    vae                                        its autoencoder (also the upsampler's, for SD-VAE upsamplers)
    cfm_unet                                   the CFMUNet v_θ
    regression_unet                            R, the frozen regression CFMUNet a posterior-mean flow
                                               starts from (None for the paper's coupling, and for flows
                                               that start from a pretrained restorer: its weights file is
                                               recorded in boost_config and found again, `Restorer.find`)
    boost_config (model_index.json)            the upsampler's boost_config.json: first stage + latent
                                               stats, scale, CouplingFlowMatcher, SamplerConfig (and R's
                                               latent stats)

The boost stage is one `fmboost.models.Upsampler` (`pipe.upsampler`: coupling + ODE): the one `from_base` /
`from_upsampler` were given, held as it is (a saved pipeline builds it once, `Upsampler.from_config`), following a
component that is replaced; the VAE goes through `DiffusersAutoencoder`, where the scaling factor lives. A call
reads as the recipe: 1. base latent (or the given image) → 2. condition → 3. source x0 → 4. ODE → 5. decode →
6. dial → 7. back-projection, steps 2–7 being `Upsampler.upscale`, the render path every
command and evaluation uses. With `image=` the base stage is skipped: the image (or its latents) is
super-resolved directly.

`enable_fast_path()` compiles the base UNet, v_θ and R the way diffusers compiles a pipeline's UNet
(`fmboost.pipelines.fast_path`); LoRA loading (`load_lora_weights`, `fuse_lora`) is diffusers' SD mixin, which
`fmboost.pipelines.lcm.load_lcm_lora` uses for an LCM-LoRA base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import is_compiled_module
from fmboost.models import (
    DiffusersAutoencoder,
    FirstStage,
    SamplerConfig,
    Upsampler,
    first_stage_from_config,
)
from fmboost.models.posterior_mean import PosteriorMean
from fmboost.pipelines.fast_path import FAST_PATH_COMPONENTS, compile_networks
from fmboost.pipelines.lcm import base_defaults
from fmboost.pipelines.render import full_precision_vae

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
#: The call's older ODE keywords → SamplerConfig fields (deprecated: `sampler=` says it all).
RENAMED_SOLVE = {"upsample_steps": "num_steps", "solver": "solver", "schedule": "schedule",
                 "schedule_params": "schedule_params"}
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class BoostPipelineOutput(BaseOutput):
    """images: PIL list, (B, H, W, 3) array or (B, 3, H, W) tensor in [0, 1], or the image's latents in the
    upsampler's normalised space for output_type="latent"; nfe: network evaluations per image (all passes, R's
    included; a tiled pass runs each of them on every tile); timings: seconds per stage (base; upsample: up to
    the ODE; decode: decode, dial and back-projection; encode: latent outputs only); tiles: tiles of the last
    pass (1: untiled)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int
    timings: dict[str, float]
    tiles: int = 1


class _Timer:
    """Wall-clock seconds per stage, synchronising CUDA so asynchronous kernels are counted."""

    def __init__(self, device: torch.device):
        self.device, self.timings = device, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        yield
        sync()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


class BoostPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet->regression_unet->cfm_unet->vae"
    _optional_components = ["text_encoder", "tokenizer", "unet", "scheduler", "vae", "regression_unet"]

    def __init__(self, cfm_unet, text_encoder=None, tokenizer=None, unet=None, scheduler=None, vae=None,
                 regression_unet=None, boost_config: dict | None = None, upsampler: Upsampler | None = None):
        """The components, and the upsampler they form: `upsampler` when given (`from_base` / `from_upsampler`
        pass the one they hold), else built from boost_config with `Upsampler.from_config` (a saved pipeline)."""
        super().__init__()
        if boost_config is None:
            raise ValueError("BoostPipeline needs boost_config (an upsampler's boost_config.json); "
                             "build it with BoostPipeline.from_base(base_pipeline, Upsampler.from_pretrained(dir))")
        self.register_modules(text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              vae=vae, cfm_unet=cfm_unet, regression_unet=regression_unet)
        self.register_to_config(boost_config=dict(boost_config))
        self._announce_compile = False  # enable_fast_path was called and no call has said it compiles yet
        if upsampler is None:
            estimate = None if regression_unet is None else \
                PosteriorMean.from_stats(regression_unet, boost_config["posterior_mean_stats"])
            upsampler = Upsampler.from_config(boost_config, cfm_unet, estimate=estimate, vae=vae)
        self._hold(upsampler)
        self._follow_components()  # a base VAE of another latent width fails here

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_base(cls, base_pipeline: DiffusionPipeline, upsampler: Upsampler) -> BoostPipeline:
        """Boost any SD-family pipeline (SD1.5, LCM, LCM-LoRA): its parts + the upsampler, no copies."""
        parts = base_pipeline.components
        missing = [k for k in ("text_encoder", "tokenizer", "unet", "scheduler", "vae") if parts.get(k) is None]
        if missing:
            raise ValueError(f"base pipeline {type(base_pipeline).__name__} lacks {missing}: not an SD-family pipeline")
        return cls(upsampler.model, parts["text_encoder"], parts["tokenizer"], parts["unet"], parts["scheduler"],
                   parts["vae"], _regression_unet(upsampler), boost_config=_boost_config(upsampler),
                   upsampler=upsampler)

    @classmethod
    def from_upsampler(cls, upsampler: Upsampler) -> BoostPipeline:
        """Image-only pipeline (super-resolution with `image=`): no base model."""
        vae = upsampler.first_stage.vae if isinstance(upsampler.first_stage, DiffusersAutoencoder) else None
        return cls(upsampler.model, vae=vae, regression_unet=_regression_unet(upsampler),
                   boost_config=_boost_config(upsampler), upsampler=upsampler)

    def _hold(self, upsampler: Upsampler) -> None:
        """Keep `upsampler` (v_θ and R run in their own dtype on an fp32 ODE state: `mixed_precision`) with the
        components it wraps, to follow them when one is replaced."""
        self._upsampler, self._upsampler_parts = upsampler.mixed_precision(), _parts(upsampler)

    @property
    def upsampler(self) -> Upsampler:
        """The `fmboost.models.Upsampler` the pipeline holds: v_θ (and R) run in their own dtype while the ODE
        state stays fp32, the first stage, the flow and the saved SamplerConfig. When a component it wraps is
        replaced (`pipe.vae = ...`, the fast path's compiled networks) it is the same upsampler on the new one."""
        return self._follow_components()

    def _follow_components(self) -> Upsampler:
        held = self._upsampler
        first_stage, estimate = held.first_stage, held.estimate
        diffusers = isinstance(first_stage, DiffusersAutoencoder)
        if (self.cfm_unet, self.regression_unet, self.vae if diffusers else None) != self._upsampler_parts:
            if diffusers:
                first_stage = _on_vae(first_stage, self.vae)
            if isinstance(estimate, PosteriorMean):
                estimate = PosteriorMean(self.regression_unet, estimate.latent_mean, estimate.latent_std)
            self._hold(dataclasses.replace(held, model=self.cfm_unet, first_stage=first_stage, estimate=estimate))
        return self._upsampler

    def first_stage(self) -> FirstStage:
        """The upsampler's latent space: the pipeline's VAE (SD-VAE upsamplers) or its own (TAEF2, identity)."""
        return self.upsampler.first_stage

    # ------------------------------------------------------------------ memory options

    def enable_vae_tiling(self) -> None:
        """Decode (and encode) in overlapping tiles: bounded memory at 1024² and 2048²."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_vae_slicing(self) -> None:
        """Decode one image of the batch at a time."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    # ------------------------------------------------------------------ the fast path

    def enable_fast_path(self, **compile_kwargs) -> bool:
        """Compile the base UNet, v_θ and R (each when present) as diffusers compiles a pipeline's UNet: channels-last
        weights, `torch.compile(mode="reduce-overhead", fullgraph=True)`, static shapes (`compile_kwargs` change
        these settings). Call it after `.to(device)`. The first call at each size compiles (slow; the first call
        says so); later calls at the same sizes reuse the compiled networks without recompiling.

        Where torch.compile cannot run on this device (no C++ compiler for inductor on a CPU, no Triton on a GPU,
        torch.compile itself raising) it warns and every component stays eager. The image is eager's up to float
        rounding: on a CPU in fp32 the largest difference is below 1e-4 of the [0, 1] range (tested; the measured
        difference is in README.md, "The fast path"). Returns whether the networks are now compiled."""
        compiled = compile_networks([(self, name) for name in FAST_PATH_COMPONENTS], self._execution_device,
                                    **compile_kwargs)
        self._announce_compile = compiled
        return compiled

    def disable_fast_path(self) -> None:
        """Back to the eager networks (contiguous weights), e.g. to compare with the fast path or to stop compiling
        for every new size."""
        for name in FAST_PATH_COMPONENTS:
            module = getattr(self, name, None)
            if module is not None and is_compiled_module(module):
                setattr(self, name, module._orig_mod.to(memory_format=torch.contiguous_format))
        self._announce_compile = False

    @property
    def fast_path(self) -> bool:
        """Whether the networks run compiled (`enable_fast_path`)."""
        return any(is_compiled_module(getattr(self, name, None)) for name in FAST_PATH_COMPONENTS)

    def _check_precision(self, device: torch.device) -> None:
        if device.type != "cpu":
            return
        for name in ("unet", "text_encoder", "vae", "cfm_unet"):
            module = getattr(self, name, None)
            if module is not None and module.dtype in HALF_DTYPES:
                raise ValueError(f"{name} is in {module.dtype} but the pipeline runs on the CPU: half precision "
                                 "needs a GPU (pipe.to('cuda')); on CPU load with torch_dtype=torch.float32")

    # ------------------------------------------------------------------ stages

    def _base_latents(self, prompt, negative_prompt, base_size, num_inference_steps, guidance_scale,
                      num_images_per_prompt, generator, latents, callback_on_step_end, **kwargs) -> torch.Tensor:
        """Raw scaled base latents (B, 4, base/8, base/8) from diffusers' own SD loop (LCM included); steps and
        guidance default to `fmboost.pipelines.lcm.base_defaults` (25 at 7.5; LCM: 4, no guidance batch)."""
        from diffusers import StableDiffusionPipeline

        if any(getattr(self, k) is None for k in ("text_encoder", "tokenizer", "unet", "scheduler", "vae")):
            raise ValueError("text-to-image needs a base model: build with BoostPipeline.from_base(...) "
                             "or pass image= to super-resolve an image")
        base = StableDiffusionPipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, self.scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        base.set_progress_bar_config(**{"desc": "base", **getattr(self, "_progress_bar_config", {})})
        default_steps, default_guidance = base_defaults(self.unet, self.scheduler)
        num_inference_steps = default_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = default_guidance if guidance_scale is None else guidance_scale
        height, width = (base_size, base_size) if isinstance(base_size, int) else base_size
        out = base(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                   output_type="latent", callback_on_step_end=callback_on_step_end, **kwargs)
        return out.images.float()

    def _image_to_tensor(self, image, first_stage: FirstStage, device: torch.device) -> tuple[str, torch.Tensor]:
        """("latent", (B, C, h, w)) or ("image", (B, 3, H, W) in [-1, 1], any size) from PIL / np / torch input.

        np arrays and 3-channel tensors are in [0, 1] (diffusers' convention, as output_type "np"/"pt"
        return them); a tensor with the first stage's channel count (≠ 3) is taken as its latents.
        """
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, list):
            if not all(isinstance(i, PIL.Image.Image) for i in image):
                raise ValueError("image list must contain PIL images")
            if len({i.size for i in image}) != 1:
                raise ValueError(f"images in a batch must share one size, got {sorted({i.size for i in image})}")
            image = np.stack([np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0 for i in image])
        if isinstance(image, np.ndarray):
            array = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
            array = array[None] if array.ndim == 3 else array
            if array.ndim != 4 or array.shape[-1] != 3:
                raise ValueError(f"np image must be (H, W, 3) or (B, H, W, 3), got {image.shape}")
            image = torch.from_numpy(array).permute(0, 3, 1, 2)
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"image must be a PIL image, list, np array or tensor, got {type(image).__name__}")
        image = image[None] if image.ndim == 3 else image
        if image.ndim != 4:
            raise ValueError(f"image tensor must be (B, C, H, W), got {tuple(image.shape)}")
        image = image.to(device, torch.float32)
        if image.shape[1] == first_stage.latent_channels and first_stage.latent_channels != 3:
            return "latent", image
        if image.shape[1] != 3:
            raise ValueError(f"image must have 3 channels (RGB) or {first_stage.latent_channels} (latents), "
                             f"got {image.shape[1]}")
        return "image", image * 2 - 1

    @staticmethod
    def _preview_first_stage(preview_vae: torch.nn.Module, first_stage: FirstStage) -> FirstStage:
        """A cheaper decoder for the same latent space (TAESD for the SD VAE), with the same stats."""
        if not isinstance(first_stage, DiffusersAutoencoder):
            raise ValueError("preview_vae needs an upsampler that works in a diffusers VAE's latent space")
        preview = DiffusersAutoencoder(preview_vae, {"kind": "autoencoder_tiny"})
        if preview.latent_channels != first_stage.latent_channels:
            raise ValueError(f"preview_vae has {preview.latent_channels} latent channels, "
                             f"the upsampler {first_stage.latent_channels}")
        preview.set_latent_stats(first_stage.latent_mean, first_stage.latent_std)
        # TAESD decodes unscaled SD latents: undo the *main* VAE's scaling (it defines the latent space).
        preview.scaling_factor, preview.shift_factor = first_stage.scaling_factor, first_stage.shift_factor
        return preview

    def _low_res_image(self, z: torch.Tensor | None, image, first_stage: FirstStage, device: torch.device,
                       num_images_per_prompt: int, timer: _Timer) -> torch.Tensor:
        """The low-res image (B, 3, h, w) in [-1, 1] the render path starts from, and back-projects onto: the base
        model's latents z decoded by its VAE (text → image), or the given `image` (latents in the upsampler's
        space decoded by its first stage)."""
        if image is None:
            with timer("base"):
                return DiffusersAutoencoder(self.vae, {"kind": "autoencoder_kl"}).decode(z)
        kind, tensor = self._image_to_tensor(image, first_stage, device)
        tensor = tensor.repeat_interleave(num_images_per_prompt, dim=0)
        if kind == "image":
            return tensor
        with timer("upsample"):
            return first_stage.decode(tensor)

    # ------------------------------------------------------------------ the recipe

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, image=None, negative_prompt=None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 base_size: int | tuple = 256,
                 sampler: SamplerConfig | str | None = None, detail: float | None = None,
                 back_project: int | None = None, noising_step: int | None = None, cascade: int = 1,
                 tile_size: int | None = None, tile_overlap: int | None = None,
                 preview_vae: torch.nn.Module | None = None, num_images_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end=None, **base_kwargs):
        """Text → image (prompt) or super-resolution (image); `cascade` passes of ×scale each.

        num_inference_steps, guidance_scale, base_size: the base model's (default 25 steps at guidance 7.5; an
        LCMScheduler base 4 steps without a guidance batch, `fmboost.pipelines.lcm.base_defaults`).
        The upsampler renders with its saved SamplerConfig overridden by `sampler` (a SamplerConfig, or a spec
        string such as 'midpoint:logit_normal:3' for the ODE solve alone), `detail` and `back_project`
        (`SamplerConfig.override`): `detail` ∈ [0, 1] is the fidelity dial of posterior-mean upsamplers (0: the
        estimate, best PSNR; 1: the flow's full detail), `back_project` the steps of back-projection onto the
        low-res image (in text → image: the base model's decoded image). The older keywords upsample_steps /
        solver / schedule / schedule_params still change the ODE solve, with a DeprecationWarning.
        `noising_step` replaces the coupling's trained noise level (an ablation knob); `preview_vae` (e.g. TAESD,
        an `AutoencoderTiny`) decodes instead of the VAE for a fast preview; `base_kwargs` (prompt_embeds, eta,
        guidance_rescale, ...) go to the base SD loop.

        Every pass is `Upsampler.upscale`, the one render path: the low-res image padded with context at the
        borders, tiled — PSU encode, every ODE step and decode — when the output is larger than `tile_size`
        output pixels (default: tiles of 1024 px above 1024 px; 0: never), neighbours overlapping by
        `tile_overlap` output pixels (default 128); then the dial and back-projection. output_type "latent"
        returns the final image's latents in the upsampler's normalised space (one more encode), so every
        output type holds the same image.
        """
        if (prompt is not None or "prompt_embeds" in base_kwargs) == (image is not None):
            raise ValueError("give exactly one of prompt (text → image) or image (super-resolution)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if not isinstance(cascade, int) or cascade < 1:
            raise ValueError(f"cascade must be a positive int (number of passes), got {cascade!r}")
        device = self._execution_device
        self._check_precision(device)
        if self._announce_compile:
            self._announce_compile = False
            logger.warning("fast path: compiling %s with torch.compile; this first call is slow (and so is the "
                           "first at any new size), later calls at the same sizes are fast",
                           ", ".join(n for n in FAST_PATH_COMPONENTS if getattr(self, n, None) is not None))
        upsampler = self.upsampler
        if noising_step is not None:
            flow = dataclasses.replace(upsampler.flow, noising_step=noising_step, noise_sigma=None)
            upsampler = dataclasses.replace(upsampler, flow=flow)
        # checked by `Upsampler.settings` in each pass
        sampler = upsampler.sampler.override(sampler, detail=detail, back_project=back_project,
                                             **_renamed_solve(base_kwargs))
        first_stage = upsampler.first_stage
        if not isinstance(first_stage, DiffusersAutoencoder):  # the pipeline's VAE is placed by .to() / offload
            first_stage.to(device)
        if upsampler.restorer is not None:  # not a pipeline component (its weights file is recorded, not copied)
            upsampler.restorer.to(device)
        decoder = None if preview_vae is None else self._preview_first_stage(preview_vae, first_stage)
        timer = _Timer(device)
        bar = {"desc": "upsample", **getattr(self, "_progress_bar_config", {})}
        # 1. the low-res input: the base model's image (text → image), or the given image / latents
        z = None
        if image is None:
            with timer("base"):
                z = self._base_latents(prompt, negative_prompt, base_size, num_inference_steps, guidance_scale,
                                       num_images_per_prompt, generator, latents, callback_on_step_end, **base_kwargs)
        with full_precision_vae(self.vae):
            lr_image = self._low_res_image(z, image, first_stage, device, num_images_per_prompt, timer)
            if output_type == "latent":
                f = first_stage.downsample_factor
                out_h, out_w = (side * upsampler.scale ** cascade for side in lr_image.shape[-2:])
                if out_h % f or out_w % f:
                    raise ValueError(f"output {out_w}x{out_h} (WxH) is not a multiple of {f} (the autoencoder's "
                                     "down-sampling factor), so it has no latents: ask for an image output_type, "
                                     "or crop the input")
            # 2.–7. each pass: `Upsampler.upscale` (canvas → condition → source → ODE → decode → dial → back-projection)
            nfe = 0
            for _ in range(cascade):
                with upsampler.model.counting(**bar):
                    result = upsampler.upscale(lr_image, generator, sampler, tile_size, tile_overlap, timer, decoder)
                lr_image, nfe = result.image, nfe + result.nfe
            if output_type == "latent":
                with timer("encode"):
                    images = first_stage.encode(lr_image)
            else:
                images = VaeImageProcessor().postprocess(lr_image, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nfe, timer.timings
        return BoostPipelineOutput(images=images, nfe=nfe, timings=timer.timings, tiles=result.tiles)


def _renamed_solve(base_kwargs: dict) -> dict:
    """The call's older ODE keywords (`RENAMED_SOLVE`), taken out of `base_kwargs`, as SamplerConfig fields (with a
    DeprecationWarning)."""
    old = {k: base_kwargs.pop(k) for k in list(base_kwargs) if k in RENAMED_SOLVE}
    if old:
        warnings.warn(f"BoostPipeline: the keywords {sorted(old)} are deprecated: pass sampler=, a SamplerConfig or "
                      "a spec such as 'euler:linear:4'", DeprecationWarning, stacklevel=3)
    return {RENAMED_SOLVE[k]: v for k, v in old.items()}


def _boost_config(upsampler: Upsampler) -> dict:
    """The upsampler's boost_config.json, with R's latent stats for posterior-mean flows (R's weights are the
    pipeline's `regression_unet` component; a restorer's file is recorded in it)."""
    config = upsampler.config()
    if isinstance(upsampler.estimate, PosteriorMean):
        config["posterior_mean_stats"] = upsampler.estimate.stats()
    return config


def _regression_unet(upsampler: Upsampler) -> torch.nn.Module | None:
    """R's CFMUNet, registered as the pipeline's `regression_unet` component (None for coupling flows and restorers)."""
    return upsampler.estimate.model if isinstance(upsampler.estimate, PosteriorMean) else None


def _parts(upsampler: Upsampler) -> tuple:
    """The pipeline components an upsampler wraps: (v_θ, R's network, the diffusers VAE of its first stage), None
    where it has none."""
    first_stage = upsampler.first_stage
    return (upsampler.model, _regression_unet(upsampler),
            first_stage.vae if isinstance(first_stage, DiffusersAutoencoder) else None)


def _on_vae(first_stage: DiffusersAutoencoder, vae: torch.nn.Module | None) -> DiffusersAutoencoder:
    """The same latent space (kind, latent stats) on the pipeline's `vae`."""
    if vae is None:
        raise ValueError("this upsampler works in the SD-VAE latent space but the pipeline has no vae")
    if vae.config.latent_channels != first_stage.latent_channels:
        raise ValueError(f"the upsampler works on {first_stage.latent_channels}-channel latents but the base "
                         f"VAE has {vae.config.latent_channels}")
    return first_stage_from_config(first_stage.config(), vae=vae)
