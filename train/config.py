"""Training configuration: one flat YAML file → one frozen dataclass, plus `--key value` overrides.

Every YAML key is a `TrainConfig` field; an unknown key or a value of the wrong type is a
`ValueError` that names the key, so a typo never silently falls back to a default. A renamed key
(`RENAMED_KEYS`) is an error naming its new name; the older sampler keys (`solver`, `upsample_steps`,
`schedule`) still load into `sampler`, with a FutureWarning naming it.
"""

from __future__ import annotations

import argparse
import types
import typing
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import yaml
from fmboost.models import FIRST_STAGES, PRESETS, CouplingFlowMatcher, SamplerConfig
from fmboost.models.degradations import Degradation
from fmboost.models.detail_bands import DETAIL_PATHS
from fmboost.models.unet import PADDING_MODES
from fmboost.pipelines.cli_options import add_option

MIXED_PRECISIONS = ("no", "fp16", "bf16")
#: storage dtypes of the latent cache (`latent_cache_dtype`)
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: old key → new key: the old one is refused with a message naming the new one (never read silently).
RENAMED_KEYS = {"num_inference_steps": "upsample_steps"}  # CFM ODE steps; the base model's steps are elsewhere
#: older keys of the sampler → the SamplerConfig field each sets in `sampler` (they load, with a FutureWarning)
SAMPLER_KEYS = {"solver": "solver", "upsample_steps": "num_steps", "schedule": "schedule"}


@dataclass(frozen=True)
class TrainConfig:
    # ---- data: pairs are made on the fly, high-res at `resolution` → low-res by ÷`scale`
    train_data_dir: str | list | None = None  # an image folder (datasets' imagefolder), or a list of them
    dataset_name: str | None = None  # a Hugging Face dataset (hub id or local path), or "sample_photos"
    image_column: str = "image"
    resolution: int = 1024  # square high-res image side; 0 keeps the native size (no resize)
    crop_size: int = 256  # high-res patch side (patch training); == resolution trains on whole images
    scale: int = 4
    center_crop: bool = False  # the square `resolution` crop of each image: centred, else random
                               # (patches inside it are always at random aligned positions)
    random_flip: bool = True
    degradation: str = "bicubic"  # how the low-res input is made: bicubic | jpeg:Q | second-order (real photos;
                                  # `fmboost.models.degradations`), seeded per image, keyed into the latent cache
    num_validation_images: int = 2  # the last N valid images are held out as the fixed validation split
    max_train_samples: int | None = None  # use only the first N training images (quick runs, benchmarks)
    dataloader_num_workers: int = 0
    # ---- latent cache: first-stage latents computed once, read by later epochs and runs
    use_latent_cache: bool = False
    latent_cache_dir: str | None = None  # default: <output_dir>/latent_cache, or a finished entry of the same key
                                         # in a run beside it (<output_dir>/../*/latent_cache)
    crops_per_image: int = 8  # how many patches of each image the cache holds
    latent_cache_dtype: str = "float16"  # storage dtype (float16 | bfloat16 | float32); training reads float32
    latent_cache_shard_images: int = 64  # images per cache shard: the unit of parallel work and of resuming
    latent_stats_images: int = 32  # training patches used for the per-channel latent statistics
    # ---- first stage and network
    first_stage: str = "identity"
    first_stage_path: str | None = None
    first_stage_subfolder: str | None = None
    model_preset: str = "small"
    block_out_channels: list | None = None  # overrides of the preset
    layers_per_block: int | None = None
    attention_levels: list | None = None  # one bool per level; default with block_out_channels: none
    gradient_checkpointing: bool = False
    padding_mode: str = "replicate"  # of the CFMUNet's convolutions; "zeros" (diffusers') leaves a frame at borders
    # ---- the method (CouplingFlowMatcher fields)
    upsample: str = "psu"
    noising_step: int = 400
    noise_sigma: float | None = None
    source: str = "coupling"  # "posterior_mean": from R(cond) + σ_s ε, R = posterior_mean_model
    posterior_mean_model: str | None = None  # a regression upsampler folder (objective: regression), frozen
    restorer: str | None = None  # or a pretrained restorer's weights file (Real-ESRGAN x4plus, any spandrel model)
    condition_on: str = "input"  # the network's conditioning: the up-sampled input, or the estimate (restorers)
    posterior_mean_sigma: float = 0.1  # σ_s, in normalised latent units
    concat_cond: bool = True  # feed the clean up-sampled latent beside x_t (False: PMRF's unconditional flow)
    calibrate_detail: bool = True  # posterior-mean flows: fit the per-band fidelity dial on the validation images
    detail_path: str = "lpips"  # its band order: "lpips" (measured; uniform without LPIPS weights) or "uniform"
    objective: str = "cfm"
    time_sampling: str = "uniform"
    logit_normal_mu: float = 0.0
    logit_normal_std: float = 1.0
    # ---- the CFM sampler: used by validation, saved as the Upsampler's default SamplerConfig
    sampler: str = "euler:linear:4"  # solver:schedule:steps, or an adaptive solver (dopri5), as --sampler reads it
    # ---- optimisation
    output_dir: str = "runs/cfm_upsampler"
    seed: int = 0
    train_batch_size: int = 8
    max_train_steps: int = 1000
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    allow_tf32: bool = False
    # ---- bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 500
    report_to: str | None = None  # "tensorboard", "wandb", "all" or none
    logging_dir: str = "logs"

    def __post_init__(self):
        _check_types(self)
        choices = {"first_stage": FIRST_STAGES, "model_preset": tuple(PRESETS), "mixed_precision": MIXED_PRECISIONS,
                   "latent_cache_dtype": tuple(CACHE_DTYPES),
                   "padding_mode": PADDING_MODES, "detail_path": DETAIL_PATHS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {list(allowed)}, got {getattr(self, key)!r}")
        for key in ("scale", "crop_size", "train_batch_size", "max_train_steps", "gradient_accumulation_steps",
                    "checkpointing_steps", "validation_steps", "crops_per_image", "latent_cache_shard_images"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        try:
            Degradation.parse(self.degradation)
        except ValueError as err:
            raise ValueError(f"degradation: {err}") from None
        if self.crop_size % self.scale:
            raise ValueError(f"crop_size {self.crop_size} must be a multiple of scale {self.scale}")
        if self.resolution and (self.resolution % self.scale or self.crop_size > self.resolution):
            raise ValueError(f"resolution {self.resolution} must be a multiple of scale and >= crop_size")
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of train_data_dir and dataset_name")
        self.flow()  # validates upsample, noising_step, objective, time_sampling, ...
        self.sampler_config()  # validates the sampler
        estimates = [key for key in ("posterior_mean_model", "restorer") if getattr(self, key)]
        if self.flow().needs_posterior_mean and len(estimates) != 1:
            raise ValueError("source 'posterior_mean' needs posterior_mean_model (the folder of a regression "
                             "upsampler, trained with objective: regression) or restorer (a pretrained restorer's "
                             f"weights file), exactly one; got {estimates or 'neither'}")
        if estimates and not self.flow().needs_posterior_mean:
            raise ValueError(f"{estimates[0]} is only used with source 'posterior_mean' and objective 'cfm'")

    def flow(self) -> CouplingFlowMatcher:
        return CouplingFlowMatcher(upsample=self.upsample, noising_step=self.noising_step,
                                   noise_sigma=self.noise_sigma, source=self.source, objective=self.objective,
                                   posterior_mean_sigma=self.posterior_mean_sigma, concat_cond=self.concat_cond,
                                   condition_on=self.condition_on,
                                   time_sampling=self.time_sampling, logit_normal_mu=self.logit_normal_mu,
                                   logit_normal_std=self.logit_normal_std)

    def sampler_config(self) -> SamplerConfig:
        """How validation samples, saved with the Upsampler as its default (with the back-projection steps measured
        best on the validation images, `fmboost.models.calibration`)."""
        try:
            return SamplerConfig.parse(self.sampler)
        except ValueError as err:
            raise ValueError(f"sampler: {err}") from None

    @property
    def upsample_steps(self) -> int:
        """Deprecated: the ODE steps of `sampler`."""
        warnings.warn("TrainConfig.upsample_steps is now part of TrainConfig.sampler", DeprecationWarning,
                      stacklevel=2)
        return self.sampler_config().num_steps

    def to_dict(self) -> dict:
        return asdict(self)


_FIELD_NAMES = frozenset(f.name for f in fields(TrainConfig))


def _allowed_types(annotation) -> tuple[type, ...]:
    """`int | None` → (int, NoneType); floats also accept ints (YAML writes 1e-4 as a float, 1 as an int)."""
    hint = typing.get_type_hints(TrainConfig)[annotation]
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    allowed = tuple(typing.get_origin(a) or a for a in args)
    return allowed + ((int,) if float in allowed else ())


def _check_types(config: TrainConfig) -> None:
    for f in fields(config):
        value, allowed = getattr(config, f.name), _allowed_types(f.name)
        wrong_bool = isinstance(value, bool) and bool not in allowed  # bool is an int subclass
        if wrong_bool or not isinstance(value, allowed):
            names = " or ".join("null" if a is type(None) else a.__name__ for a in allowed)
            raise ValueError(f"config key {f.name!r} must be {names}, got {value!r} ({type(value).__name__})")


def check_keys(keys, source: str) -> None:
    """Renamed keys name their new name; other unknown keys are listed."""
    renamed = sorted(set(keys) & set(RENAMED_KEYS))
    if renamed:
        raise ValueError(f"config key(s) {renamed} in {source} renamed: "
                         + ", ".join(f"{old!r} is now {RENAMED_KEYS[old]!r}" for old in renamed)
                         + " (itself now part of 'sampler', e.g. sampler: euler:linear:4)")
    unknown = sorted(set(keys) - _FIELD_NAMES - set(SAMPLER_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {source}; see fmboost.train.config.TrainConfig for the keys")


def upgrade_sampler_keys(values: dict, sampler: str, source: str) -> dict:
    """`values` with the older sampler keys (`SAMPLER_KEYS`) folded into 'sampler' (the one in `values`, else
    `sampler`, the value so far), with a FutureWarning naming the new key."""
    old = {key: values[key] for key in SAMPLER_KEYS if key in values}
    if not old:
        return dict(values)
    values = {k: v for k, v in values.items() if k not in old}
    if isinstance(old.get("upsample_steps"), int) and old["upsample_steps"] < 1:
        raise ValueError(f"upsample_steps must be >= 1, got {old['upsample_steps']}")
    base = SamplerConfig.parse(values.get("sampler", sampler))
    try:
        spec = base.replace(**{SAMPLER_KEYS[k]: v for k, v in old.items()}).format()
    except ValueError as err:
        raise ValueError(f"{', '.join(old)} in {source}: {err}") from None
    warnings.warn(f"config key(s) {sorted(old)} in {source} are deprecated: write 'sampler: {spec}'", FutureWarning,
                  stacklevel=3)
    values["sampler"] = spec
    return values


def config_from_dict(values: dict, source: str = "config") -> TrainConfig:
    values = dict(values)
    check_keys(values, source)
    values = upgrade_sampler_keys(values, TrainConfig.sampler, source)
    for key, value in values.items():  # YAML 1.1 reads "3e-4" (no dot) as a string: accept it as a float
        if isinstance(value, str) and float in _allowed_types(key):
            try:
                values[key] = float(value)
            except ValueError:
                pass  # reported with the key by the type check
    return TrainConfig(**values)


def parse_overrides(overrides: list[str]) -> dict:
    """['--key', 'value', '--flag=value', ...] → {key: YAML-parsed value} ('--key' alone means true)."""
    values, i = {}, 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ValueError(f"expected --key value, got {token!r}")
        key, _, value = token[2:].partition("=")
        if not value:
            if i + 1 < len(overrides) and not overrides[i + 1].startswith("--"):
                value, i = overrides[i + 1], i + 1
            else:
                value = "true"
        key, parsed = key.replace("-", "_"), yaml.safe_load(value)
        if key in _FIELD_NAMES and str in _allowed_types(key) and not isinstance(parsed, _allowed_types(key)):
            parsed = value  # e.g. `--mixed_precision no`: YAML would read a bool
        values[key] = parsed
        i += 1
    return values


def config_flag(key: str) -> str:
    """The command-line flag of a TrainConfig key: the key hyphenated (`--max-train-steps`), and output_dir as on
    every command, `--output` (also `-o`)."""
    return "--output" if key == "output_dir" else "--" + key.replace("_", "-")


def add_config_arguments(parser, output: bool = True) -> None:
    """One `--key VALUE` option per config field (`config_flag`; values parsed like YAML), for command lines; the
    key's own underscore spelling (`--max_train_steps`) is accepted for a release, with a warning naming the new
    one. `output`: whether the options include output_dir (-o/--output); the benchmarks' -o is their JSON file,
    and they write no run folder."""
    group = parser.add_argument_group("config overrides (any TrainConfig key, hyphenated; YAML values)")
    for f in fields(TrainConfig):
        if f.name == "output_dir" and not output:
            continue
        flags = ("-o", config_flag(f.name)) if f.name == "output_dir" else (config_flag(f.name),)
        old = () if f"--{f.name}" in flags else (f"--{f.name}",)
        add_option(group, *flags, old=old, dest=f"override_{f.name}", metavar="VALUE", default=argparse.SUPPRESS)
    for old in (*RENAMED_KEYS, *SAMPLER_KEYS):  # accepted by the parser only so `load_config` can name the new key
        group.add_argument(f"--{old}", dest=f"override_{old}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def overrides_from_args(args) -> list[str]:
    """The `--key value` tokens given through `add_config_arguments`, for `load_config`."""
    tokens = []
    for key, value in vars(args).items():
        if key.startswith("override_"):
            tokens += [f"--{key[len('override_'):]}", value]
    return tokens


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> TrainConfig:
    """`base` dict, then the YAML file at `path`, then `overrides` (CLI tokens or a dict), later wins."""
    values = dict(base or {})
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a flat mapping of keys to values")
        check_keys(loaded, str(path))
        values.update(upgrade_sampler_keys(loaded, values.get("sampler", TrainConfig.sampler), str(path)))
    if overrides:
        overrides = parse_overrides(overrides) if isinstance(overrides, list) else overrides
        values.update(upgrade_sampler_keys(overrides, values.get("sampler", TrainConfig.sampler), "the overrides"))
    return config_from_dict(values, str(path or "config"))


def with_overrides(config: TrainConfig, **changes) -> TrainConfig:
    return replace(config, **changes)
