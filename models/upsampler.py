"""Upsampler: a trained CFMUNet bundled with everything needed to use it, saved as one folder.

    <dir>/config.json, diffusion_pytorch_model.safetensors   the CFMUNet (diffusers save_pretrained)
    <dir>/boost_config.json                                  first stage (+ latent stats), scale,
                                                             CouplingFlowMatcher, SamplerConfig
    <dir>/posterior_mean/                                    R, for posterior-mean flows only (frozen
                                                             regression CFMUNet + its latent stats)
    boost_config.json "detail_calibration"                  optional, posterior-mean flows: the per-band
                                                             fidelity dial (`fmboost calibrate-detail`)

Training writes it; `BoostPipeline`, `fmboost upscale` and `fmboost eval-sr` load it, so inference
uses exactly the coupling and latent normalisation the model was trained with.

`upscale` takes an image of any size: it pads it (replicating the edge pixels) to a canvas the networks
accept with a margin of context on every side, runs PSU encode, the ODE and decode over overlapping tiles
when the canvas is large (`fmboost.models.tiling`), and crops the result back to scale × the input. The
margin is the fix for a frame along the image edges: the networks (zero-padded convolutions; diffusers'
stride-2 down-sampling pads the top and left only) err in the outermost pixels of whatever they see —
on held-out photos the demo model's error in the outermost pixel ring was 1.8× the interior's, 1.0× with
the margin (BENCHMARKS.md, "Borders and tiles").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .autoencoders import FirstStage, first_stage_from_config
from .detail_bands import DetailCalibration
from .flow import CouplingFlowMatcher
from .mixed_precision import MixedPrecisionVelocity
from .posterior_mean import PosteriorMean
from .sampler_config import SamplerConfig
from .sampling import SampleResult
from .tiling import TiledFirstStage, TiledModule, Tiling

BOOST_CONFIG_NAME = "boost_config.json"
POSTERIOR_MEAN_FOLDER = "posterior_mean"
Generators = torch.Generator | list[torch.Generator] | None
#: A stage timer: called with a stage name ('upsample': condition, source and ODE; 'decode'), it returns the context
#: the stage runs in (e.g. BoostPipeline's wall-clock timer).
Stages = Callable[[str], contextlib.AbstractContextManager] | None
#: `upscale` tiles outputs larger than this (pixels, either side) into tiles of this size by default.
DEFAULT_TILE_SIZE = 1024
#: Default overlap of neighbouring tiles, in output pixels.
DEFAULT_TILE_OVERLAP = 128
#: Context margin around the image, in units of the CFMUNet's size multiple (latent pixels of its coarsest level).
BORDER_CONTEXT = 2


@dataclass
class FlowSource:
    """Where sampling starts. cond: (N, C, H, W) the clean conditioning; x0: (N, C, H, W) the ODE's state at t = 0
    (None for regression upsamplers, which make one pass on cond); posterior_mean: (N, C, H, W) R(cond) for
    posterior-mean flows, else None. samples: independent source draws per input, stacked sample-major
    (N = samples · B; the two-sample dial, `DetailCalibration.samples`); the first B rows are the 1-sample source."""

    cond: torch.Tensor
    x0: torch.Tensor | None
    posterior_mean: torch.Tensor | None = None
    samples: int = 1

    @property
    def inputs(self) -> int:
        """B, the number of inputs."""
        return self.cond.shape[0] // self.samples


@dataclass
class Canvas:
    """An image prepared for `Upsampler.upscale`. image: (B, 3, h', w') the input padded by edge replication to
    sizes the networks accept, with context on every side; upsampler: the view that runs on it (tiled, or the
    upsampler itself); box: (top, left, height, width) of the input inside image; tiles: tiles per pass."""

    image: torch.Tensor
    upsampler: "Upsampler"
    box: tuple[int, int, int, int]
    tiles: int

    def crop(self, output: torch.Tensor) -> torch.Tensor:
        """(B, 3, s·h', s·w') output of the canvas → (B, 3, s·height, s·width), the input's region."""
        s = self.upsampler.scale
        top, left, height, width = self.box
        return output[..., top * s:(top + height) * s, left * s:(left + width) * s]


@dataclass
class Rendered:
    """image: (B, 3, H, W) decoded in [-1, 1]; nfe: network evaluations (R's pass included); latent: (B, C, h, w)
    the flow's latent result (for a calibrated dial below 1: the full sample the image was blended from)."""

    image: torch.Tensor
    nfe: int
    latent: torch.Tensor


@dataclass
class UpscaleResult:
    """image: (B, 3, s·h, s·w) in [-1, 1]; nfe: network evaluations per sample, as untiled (each tile of a
    tiled pass runs every one of them); tiles: tiles per pass (1: untiled)."""

    image: torch.Tensor
    nfe: int
    tiles: int


@dataclass
class Upsampler:
    """model: v_θ; first_stage: the latent space it works in; scale: pixel up-sampling factor (e.g. 4);
    posterior_mean: R, required by (and only by) flows with source 'posterior_mean'.

    sampler: the saved default `SamplerConfig` — ODE solver, steps, schedule, tolerances, and `detail`, the
    fidelity dial of posterior-mean flows (0: R's estimate, best PSNR; 1, the default: full detail).
    detail_calibration: optional, posterior-mean flows only: images (`render`, `upscale`) then turn the dial per
    frequency band in pixel space (`fmboost.models.detail_bands`; detail 0 is the calibrated estimate) instead
    of blending latents. Latent outputs (`upsample`, `sample`) keep the latent blend."""

    model: torch.nn.Module
    first_stage: FirstStage
    flow: CouplingFlowMatcher
    scale: int
    sampler: SamplerConfig = SamplerConfig()
    posterior_mean: PosteriorMean | None = None
    detail_calibration: DetailCalibration | None = None

    def __post_init__(self):
        if self.flow.needs_posterior_mean and self.posterior_mean is None:
            raise ValueError("a flow with source 'posterior_mean' needs its posterior-mean model R "
                             "(PosteriorMean.from_upsampler(<regression Upsampler>))")
        if not isinstance(self.sampler, SamplerConfig):
            raise TypeError(f"sampler must be a SamplerConfig (SamplerConfig.from_dict for a dict), "
                            f"got {self.sampler!r}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")
        if self.detail_calibration is not None and not self.flow.needs_posterior_mean:
            raise ValueError("detail_calibration needs a posterior-mean flow (source 'posterior_mean'): it weighs "
                             "the flow's detail against R's estimate")

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.posterior_mean is not None:
            self.posterior_mean.save_pretrained(directory / POSTERIOR_MEAN_FOLDER)
        (directory / BOOST_CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))

    def config(self) -> dict:
        """What boost_config.json holds: first stage (+ latent stats), scale, flow and sampler."""
        config = {"first_stage": self.first_stage.config(), "scale": self.scale, "flow": self.flow.to_dict(),
                  "sampler": self.sampler.to_dict()}
        if self.detail_calibration is not None:
            config["detail_calibration"] = self.detail_calibration.to_dict()
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, first_stage: FirstStage | None = None) -> "Upsampler":
        """Load a saved upsampler; pass `first_stage` to reuse one already in memory (e.g. a pipeline's VAE)."""
        from .unet import CFMUNet

        directory = Path(directory)
        config_path = directory / BOOST_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {BOOST_CONFIG_NAME} in {directory}: not an fmboost upsampler folder "
                                    "(train one with `fmboost train` or `accelerate launch train/cfm_upsampler.py`)")
        config = json.loads(config_path.read_text())
        if first_stage is None:
            first_stage = first_stage_from_config(config["first_stage"])
        else:
            stats = config["first_stage"]
            first_stage.set_latent_stats(torch.tensor(stats["latent_mean"]), torch.tensor(stats["latent_std"]))
        model = CFMUNet.from_pretrained(directory).eval()
        flow = CouplingFlowMatcher.from_dict(config["flow"])
        posterior_mean = PosteriorMean.from_pretrained(directory / POSTERIOR_MEAN_FOLDER) \
            if flow.needs_posterior_mean else None
        sampler = SamplerConfig.from_dict(config.get("sampler", {}))  # older files: a partial dict
        calibration = config.get("detail_calibration")
        return cls(model, first_stage, flow, config["scale"], sampler, posterior_mean,
                   None if calibration is None else DetailCalibration.from_dict(calibration))

    def to(self, device: torch.device | str) -> "Upsampler":
        """Move the networks (CFMUNet, first stage, R) to `device`; returns self."""
        self.model.to(device)
        self.first_stage.to(device)
        if self.posterior_mean is not None:
            self.posterior_mean.to(device)
        return self

    def cast(self, dtype: torch.dtype) -> "Upsampler":
        """Store v_θ and R in `dtype` (e.g. torch.float16 on a GPU; the first stage keeps its own, and
        `mixed_precision` runs them on an fp32 state); returns self."""
        networks = [self.model] + ([] if self.posterior_mean is None else [self.posterior_mean.model])
        for network in networks:
            if network.dtype != dtype:
                network.to(dtype)
        return self

    def mixed_precision(self) -> "Upsampler":
        """A view of this upsampler whose v_θ and R run in their weights' dtype (fp16 / bf16 on a GPU) while the
        ODE state stays fp32, and whose `model.counting(**bar)` shows a progress bar per network evaluation
        (`MixedPrecisionVelocity`). BoostPipeline and `fmboost bench upscale` run half-precision weights so."""
        if isinstance(self.model, MixedPrecisionVelocity):
            return self
        posterior_mean = self.posterior_mean
        if posterior_mean is not None:
            posterior_mean = PosteriorMean(MixedPrecisionVelocity(posterior_mean.model), posterior_mean.latent_mean,
                                           posterior_mean.latent_std)
        return dataclasses.replace(self, model=MixedPrecisionVelocity(self.model), posterior_mean=posterior_mean)

    @property
    def image_multiple(self) -> int:
        """Low-res image sides `upsample` accepts are multiples of this: f · (CFMUNet multiple / gcd(scale, it))."""
        multiple = self.model.size_multiple
        return self.first_stage.downsample_factor * multiple // math.gcd(self.scale, multiple)

    # ------------------------------------------------------------------ images of any size, tiled

    def tiling(self, output_size: tuple[int, int], tile_size: int | None = None,
               tile_overlap: int | None = None) -> Tiling | None:
        """The tiling `upscale` uses for an output of `output_size` (H, W) pixels, or None for one pass.

        tile_size, tile_overlap: in output pixels (the size rounded down to whole latents of the CFMUNet's size
        multiple, the overlap up to whole latents and to at most half the tile). tile_size None: tiles of
        DEFAULT_TILE_SIZE when the output is larger than that on either side; 0: never tile. tile_overlap
        None: DEFAULT_TILE_OVERLAP."""
        if tile_size is None:
            tile_size = DEFAULT_TILE_SIZE if max(output_size) > DEFAULT_TILE_SIZE else 0
        if tile_size == 0:
            return None
        overlap = DEFAULT_TILE_OVERLAP if tile_overlap is None else tile_overlap
        if tile_size < 0 or overlap < 0:
            raise ValueError(f"tile_size and tile_overlap must be >= 0, got {tile_size}, {overlap}")
        f, multiple = self.first_stage.downsample_factor, self.model.size_multiple
        size = max(multiple, tile_size // f // multiple * multiple)
        overlap = min(-(-overlap // f), size // 2)
        return Tiling(size, overlap, multiple)

    def canvas(self, lr_image: torch.Tensor, tile_size: int | None = None,
               tile_overlap: int | None = None) -> Canvas:
        """Pad lr_image (B, 3, h, w), any h and w, into a `Canvas`: BORDER_CONTEXT coarsest-level latents of
        context on each side (edge pixels replicated), sides rounded up to `image_multiple`; tiled per
        `tiling` (the output size decides, not the padded one)."""
        if lr_image.ndim != 4 or lr_image.shape[1] != 3:
            raise ValueError(f"lr_image must be (B, 3, h, w), got {tuple(lr_image.shape)}")
        h, w = lr_image.shape[-2:]
        f, g = self.first_stage.downsample_factor, self.image_multiple
        margin = -(-BORDER_CONTEXT * self.model.size_multiple * f // self.scale)  # low-res pixels
        pads = []
        for n in (h, w):
            total = -(-(n + 2 * margin) // g) * g
            pads.append(((total - n) // 2, total - n - (total - n) // 2))
        (top, bottom), (left, right) = pads
        image = F.pad(lr_image, (left, right, top, bottom), mode="replicate")
        tiling = self.tiling((h * self.scale, w * self.scale), tile_size, tile_overlap)
        view, tiles = self, 1
        if tiling is not None:
            latent = (image.shape[-2] * self.scale // f, image.shape[-1] * self.scale // f)
            tiles = tiling.count(*latent)
            view = dataclasses.replace(
                self, model=TiledModule(self.model, tiling), first_stage=TiledFirstStage(self.first_stage, tiling),
                posterior_mean=None if self.posterior_mean is None else TiledModule(self.posterior_mean, tiling))
        return Canvas(image, view, (top, left, h, w), tiles)

    @torch.no_grad()
    def upscale(self, lr_image: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | None = None,
                tile_size: int | None = None, tile_overlap: int | None = None, stages: Stages = None,
                **overrides) -> UpscaleResult:
        """(B, 3, h, w) image in [-1, 1], any size → (B, 3, s·h, s·w) in [-1, 1]: `canvas` → PSU encode → source →
        ODE → decode → crop, each network stage tile by tile on large outputs (see `tiling` for tile_size /
        tile_overlap, in output pixels). Sampler arguments as in `upsample`; `stages` times them (see `Stages`).
        The source noise is drawn once for the whole canvas; tiles blend at every velocity evaluation, so they
        agree along the trajectory."""
        stages = stages or _untimed
        with stages("upsample"):
            canvas = self.canvas(lr_image, tile_size, tile_overlap)
            view = canvas.upsampler
            cond = view.condition(lr_image=canvas.image)
        rendered = view.render(cond, generator, sampler, stages, **overrides)
        return UpscaleResult(canvas.crop(rendered.image), rendered.nfe, canvas.tiles)

    @torch.no_grad()
    def render(self, cond: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | None = None,
               stages: Stages = None, **overrides) -> Rendered:
        """The decoded image of a sample from the conditioning cond (B, C, H, W): `draw_source` → `transport`
        (with `image_sampler`) → `decode_sample`; `stages` times them (see `Stages`)."""
        stages = stages or _untimed
        sampler = (sampler or self.sampler).replace(**overrides)
        with stages("upsample"):
            source = self.draw_source(cond, generator, self.image_samples(sampler))
            result = self.transport(source, self.image_sampler(sampler))
        with stages("decode"):
            image = self.decode_sample(source, result, sampler)
        return Rendered(image, result.nfe, result.x1[:source.inputs])

    def calibrated(self, sampler: SamplerConfig) -> bool:
        """Whether images from `sampler` take the per-band dial: a detail_calibration and detail < 1."""
        return self.detail_calibration is not None and sampler.detail < 1.0

    def image_samples(self, sampler: SamplerConfig) -> int:
        """How many samples per input an image from `sampler` is made of: the calibrated dial's
        (`DetailCalibration.samples`), else 1. Pass it to `draw_source`."""
        return self.detail_calibration.samples if self.calibrated(sampler) else 1

    def image_sampler(self, sampler: SamplerConfig) -> SamplerConfig:
        """What to `transport` with when the result will be decoded to an image: the per-band dial blends the
        full sample (detail 1) with R's estimate in pixels, so the flow runs to the end."""
        return sampler.replace(detail=1.0) if self.calibrated(sampler) else sampler

    def decode_sample(self, source: FlowSource, result: SampleResult, sampler: SamplerConfig,
                      first_stage: FirstStage | None = None) -> torch.Tensor:
        """Image (B, 3, H, W) of a `transport` result made with `image_sampler(sampler)` from a source drawn with
        `image_samples(sampler)`: one decode, or — per-band dial — R's estimate and the full sample(s) decoded
        (one decode each) and blended at `sampler.detail`."""
        decoder = first_stage or self.first_stage
        if not self.calibrated(sampler):
            return decoder.decode(result.x1)
        if source.samples != self.detail_calibration.samples:
            raise ValueError(f"the dial blends {self.detail_calibration.samples} sample(s) per input, the source "
                             f"has {source.samples}: draw it with image_samples(sampler)")
        estimate, samples = self._decode_estimate_and_samples(source, result, decoder)
        return self.detail_calibration.combine(estimate, samples, sampler.detail, self.scale)

    @staticmethod
    def _decode_estimate_and_samples(source: FlowSource, result: SampleResult, decoder: FirstStage,
                                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """R's estimate (B, 3, H, W) and each of the source's samples (B, 3, H, W), decoded: one decode each."""
        return (decoder.decode(source.posterior_mean[:source.inputs]),
                [decoder.decode(x1) for x1 in result.x1.chunk(source.samples)])

    @torch.no_grad()
    def estimate_and_sample(self, cond: torch.Tensor, generator: Generators = None,
                            sampler: SamplerConfig | None = None, samples: int | None = None,
                            ) -> tuple[torch.Tensor, list[torch.Tensor], SampleResult]:
        """(R's estimate, the flow's full samples, their `transport` result) from cond (B, C, H, W), the images
        (B, 3, H', W') decoded: what the per-band dial blends (eval-sr sweeps it from one set per image) and is
        fitted on (`fmboost calibrate-detail`). `samples` per input (default: the calibrated dial's, else 1);
        `sampler` (default: the saved one) runs at detail 1; the NFE counts every sample."""
        if samples is None:
            samples = self.detail_calibration.samples if self.detail_calibration is not None else 1
        source = self.draw_source(cond, generator, samples)
        result = self.transport(source, (sampler or self.sampler).replace(detail=1.0))
        return (*self._decode_estimate_and_samples(source, result, self.first_stage), result)

    # ------------------------------------------------------------------ sampling, in its steps

    @torch.no_grad()
    def upsample(self, lr_latent: torch.Tensor | None = None, lr_image: torch.Tensor | None = None,
                 generator: Generators = None, sampler: SamplerConfig | None = None,
                 return_intermediates: bool = False, **overrides) -> SampleResult:
        """High-res latent (B, C, s·h, s·w) from a low-res latent (B, C, h, w) and/or image (B, 3, f·h, f·w):
        `condition` → `draw_source` → `transport`.

        Samples with `sampler` (default: the saved one) changed by `overrides`, any SamplerConfig field
        (e.g. num_steps=8, detail=0.5), for this call only.
        """
        return self.sample(self.condition(lr_latent, lr_image), generator, sampler, return_intermediates,
                           **overrides)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | None = None,
               return_intermediates: bool = False, **overrides) -> SampleResult:
        """x1 (B, C, H, W) from a conditioning made by `condition`; arguments as in `upsample`."""
        return self.transport(self.draw_source(cond, generator), sampler, return_intermediates, **overrides)

    @torch.no_grad()
    def condition(self, lr_latent: torch.Tensor | None = None, lr_image: torch.Tensor | None = None) -> torch.Tensor:
        """The clean up-sampled latent (B, C, s·h, s·w) the model is conditioned on.

        Split from `sample` because it holds the expensive part for PSU (encoding the s×-up-sampled image):
        callers that draw several samples or compare samplers on one input compute it once.
        """
        if lr_latent is None and lr_image is None:
            raise ValueError("upsample needs lr_latent or lr_image")
        if lr_latent is not None:
            h, w = lr_latent.shape[-2:]
        else:
            f = self.first_stage.downsample_factor
            if lr_image.shape[-2] % f or lr_image.shape[-1] % f:
                raise ValueError(f"lr_image size {tuple(lr_image.shape[-2:])} must be a multiple of {f}")
            h, w = lr_image.shape[-2] // f, lr_image.shape[-1] // f
        return self.flow.condition(lr_latent, (h * self.scale, w * self.scale), self.first_stage, lr_image)

    @torch.no_grad()
    def draw_source(self, cond: torch.Tensor, generator: Generators = None, samples: int = 1) -> FlowSource:
        """The source x0 the ODE starts from — cond noise-augmented at the trained step, or R(cond) + σ_s ε
        for posterior-mean flows (R runs here, once). `generator`: one, or a list with one per sample, so that
        each sample is reproducible on its own whatever batch it is drawn in. `samples` > 1 (posterior-mean
        flows): that many independent noises per input, drawn one after another from each generator and
        stacked sample-major, so the first is the 1-sample source and one ODE solve transports them all."""
        if samples < 1:
            raise ValueError(f"samples must be ≥ 1, got {samples}")
        if samples > 1 and not self.flow.needs_posterior_mean:
            raise ValueError(f"{samples} samples per input need a posterior-mean flow (the dial blends them with R's "
                             "estimate); this upsampler draws one")
        estimate = None
        if self.flow.needs_posterior_mean:
            estimate = self.posterior_mean(cond, self.first_stage.latent_mean, self.first_stage.latent_std)
        if not isinstance(generator, list):
            draws = [self.flow.draw_source(cond, generator, estimate) for _ in range(samples)]
        else:
            if len(generator) != cond.shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {cond.shape[0]}")
            rows = [[self.flow.draw_source(cond[i:i + 1], g, None if estimate is None else estimate[i:i + 1])
                     for _ in range(samples)] for i, g in enumerate(generator)]
            draws = [None if rows[0][k] is None else torch.cat([row[k] for row in rows]) for k in range(samples)]
        if samples == 1:
            return FlowSource(cond, draws[0], estimate)
        repeat = (samples,) + (1,) * (cond.dim() - 1)
        return FlowSource(cond.repeat(repeat), torch.cat(draws), estimate.repeat(repeat), samples)

    @torch.no_grad()
    def transport(self, source: FlowSource, sampler: SamplerConfig | None = None, return_intermediates: bool = False,
                  **overrides) -> SampleResult:
        """x1 (B, C, H, W), the ODE solved from x0 with `sampler` (default: the saved one) changed by
        `overrides`. The NFE counts every sample's evaluations, and R's pass for posterior-mean flows."""
        sampler = (sampler or self.sampler).replace(**overrides)
        result = self.flow.transport(self.model, source.cond, source.x0, source.posterior_mean, sampler.detail,
                                     sampler.temperature,
                                     return_intermediates=return_intermediates, **sampler.solve_kwargs())
        result.nfe *= source.samples
        if source.posterior_mean is not None:
            result.nfe += 1
        return result


def _untimed(stage: str) -> contextlib.AbstractContextManager:
    """The `Stages` default: run the stage untimed."""
    return contextlib.nullcontext()
