"""Upsampler: a trained CFMUNet bundled with everything needed to use it, saved as one folder.

    <dir>/config.json, diffusion_pytorch_model.safetensors   the CFMUNet (diffusers save_pretrained)
    <dir>/boost_config.json                                  first stage (+ latent stats), scale,
                                                             CouplingFlowMatcher, SamplerConfig
    <dir>/posterior_mean/                                    R, for posterior-mean flows only (frozen
                                                             regression CFMUNet + its latent stats)
    boost_config.json "restorer"                             or, for flows that start from a pretrained
                                                             restorer, its weights file's name and sha256
                                                             (found again on load, `Restorer.find`)
    boost_config.json "detail_calibration"                  optional, posterior-mean flows: the per-band
                                                             fidelity dial (`fmboost calibrate-detail`)

Training writes it; `BoostPipeline`, `fmboost upscale` and `fmboost eval-sr` load it, so inference
uses exactly the coupling and latent normalisation the model was trained with.

`upscale` is the one render path from a low-res image to the output, used by every command, the pipeline,
evaluation, calibration, validation and the benchmarks:

    canvas (edge padding, tiles) → condition → source → ODE → decode → crop   (`draft`)
        → fidelity dial → back-projection onto the low-res input               (`finish`)

It takes an image of any size: it pads it (replicating the edge pixels) to a canvas the networks
accept with a margin of context on every side, runs PSU encode, the ODE and decode over overlapping tiles
when the canvas is large (`fmboost.models.tiling`), and crops the result back to scale × the input. The
margin is the fix for a frame along the image edges: the networks (zero-padded convolutions; diffusers'
stride-2 down-sampling pads the top and left only) err in the outermost pixels of whatever they see, and
the margin keeps those pixels outside the image (measured: BENCHMARKS.md, "Borders and tiles").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .autoencoders import FirstStage, first_stage_from_config, stats_from_record
from .consistency import back_project, downsample
from .deprecated import renamed_keywords
from .detail_bands import DetailCalibration
from .flow import CouplingFlowMatcher
from .mixed_precision import MixedPrecisionVelocity
from .posterior_mean import PosteriorMean
from .restorer import Restorer
from .sampler_config import SamplerConfig
from .tiling import TiledFirstStage, TiledModule, Tiling
from .upgrade import upgrade_boost_config

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
class Canvas:
    """An image prepared for `Upsampler.upscale`. image: (B, 3, h', w') the input padded by edge replication to
    sizes the networks accept, with context on every side; upsampler: the view that runs on it (tiled, or the
    upsampler itself); box: (top, left, height, width) of the input inside image; tiles: tiles per pass;
    tiling: the tiles' layout (None: one pass)."""

    image: torch.Tensor
    upsampler: "Upsampler"
    box: tuple[int, int, int, int]
    tiles: int
    tiling: Tiling | None = None

    def crop(self, output: torch.Tensor) -> torch.Tensor:
        """(B, 3, s·h', s·w') output of the canvas → (B, 3, s·height, s·width), the input's region."""
        s = self.upsampler.scale
        top, left, height, width = self.box
        return output[..., top * s:(top + height) * s, left * s:(left + width) * s]

    def pad(self, output: torch.Tensor) -> torch.Tensor:
        """(B, 3, s·height, s·width), an output of the input's region → (B, 3, s·h', s·w'), edge-replicated the
        way the canvas pads the input (`crop` undoes it)."""
        s, (top, left, height, width) = self.upsampler.scale, self.box
        bottom, right = self.image.shape[-2] - top - height, self.image.shape[-1] - left - width
        return F.pad(output, (left * s, right * s, top * s, bottom * s), mode="replicate")


@dataclass
class Draft:
    """What the render path makes before the dial, cropped to the input's region: lr (B, 3, h, w) the low-res
    input; estimate (B, 3, s·h, s·w) R's estimate decoded, or a restorer's image itself (posterior-mean flows, when
    asked for), else None; anchor (B, 3, h, w) the restorer's image reduced to the input's size (back-projection's
    target with anchor 'estimate'), None without a restorer; sample (B, 3, s·h, s·w) the flow's full sample (or
    the regression output) decoded, None when not asked for; estimate_nfe: R's pass (1 or 0); flow_nfe: the ODE's
    (or regression's) evaluations; tiles: tiles per pass (1: untiled)."""

    lr: torch.Tensor
    estimate: torch.Tensor | None
    sample: torch.Tensor | None
    estimate_nfe: int
    flow_nfe: int
    tiles: int
    anchor: torch.Tensor | None = None


@dataclass
class UpscaleResult:
    """image: (B, 3, s·h, s·w) in [-1, 1]; nfe: network evaluations per image, as untiled (each tile of a tiled
    pass runs every one of them; R's pass included, the flow's only when the image uses it); tiles: tiles per
    pass (1: untiled)."""

    image: torch.Tensor
    nfe: int
    tiles: int


@dataclass
class Upsampler:
    """model: v_θ; first_stage: the latent space it works in; scale: pixel up-sampling factor (e.g. 4);
    estimate: what makes the estimate a flow with source 'posterior_mean' starts from (required by those, only
    them): R, a regression CFMUNet on the latent condition (`PosteriorMean`), or a `Restorer`, a pretrained
    pixel-space upscaler whose image's latent is the estimate (detail 0 is then that image itself).

    sampler: the saved default `SamplerConfig` — ODE solver, steps, schedule, tolerances, `detail`, the
    fidelity dial of posterior-mean flows (0: R's estimate, best PSNR; 1: full detail), and `back_project`,
    the low-res back-projection steps applied last (training saves the count measured best on validation).
    detail_calibration: optional, posterior-mean flows only: the dial turned per frequency band
    (`fmboost.models.detail_bands`; detail 0 is the calibrated estimate); without it the one-band dial.

    `upscale` is the one render path: every command, the pipeline, evaluation, calibration, validation and
    the benchmarks make images through it (`draft` and `finish` are its two halves). `from_config` builds one
    from a boost_config.json dict (`from_pretrained`, `BoostPipeline`); training builds it from its parts."""

    model: torch.nn.Module
    first_stage: FirstStage
    flow: CouplingFlowMatcher
    scale: int
    sampler: SamplerConfig = SamplerConfig()
    estimate: PosteriorMean | Restorer | None = None
    detail_calibration: DetailCalibration | None = None

    def __post_init__(self):
        _check_estimate(self.flow, self.estimate)
        if not isinstance(self.sampler, SamplerConfig):
            raise TypeError(f"sampler must be a SamplerConfig (SamplerConfig.from_dict for a dict), "
                            f"got {self.sampler!r}")
        if not isinstance(self.scale, int) or self.scale < 1:
            raise ValueError(f"scale must be a positive int, got {self.scale!r}")
        if self.restorer is not None and self.restorer.scale != self.scale:
            raise ValueError(f"the restorer {self.restorer.name} up-scales ×{self.restorer.scale}, the upsampler "
                             f"×{self.scale}")
        if self.detail_calibration is not None and not self.flow.needs_posterior_mean:
            raise ValueError("detail_calibration needs a posterior-mean flow (source 'posterior_mean'): it weighs "
                             "the flow's detail against R's estimate")

    @property
    def restorer(self) -> Restorer | None:
        """The pretrained restorer this flow starts from, if its estimate is one."""
        return self.estimate if isinstance(self.estimate, Restorer) else None

    @property
    def posterior_mean(self) -> PosteriorMean | Restorer | None:
        """Deprecated: the old name of `estimate`."""
        warnings.warn("Upsampler.posterior_mean is now Upsampler.estimate", DeprecationWarning, stacklevel=2)
        return self.estimate

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.model.save_pretrained(directory)
        if self.estimate is not None and self.restorer is None:
            self.estimate.save_pretrained(directory / POSTERIOR_MEAN_FOLDER)
        (directory / BOOST_CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))

    def config(self) -> dict:
        """What boost_config.json holds: first stage (+ latent stats), scale, flow and sampler."""
        config = {"first_stage": self.first_stage.config(), "scale": self.scale, "flow": self.flow.to_dict(),
                  "sampler": self.sampler.to_dict()}
        if self.restorer is not None:
            config["restorer"] = self.restorer.record()
        if self.detail_calibration is not None:
            config["detail_calibration"] = self.detail_calibration.to_dict()
        return config

    @classmethod
    def from_pretrained(cls, directory: str | Path, first_stage: FirstStage | None = None,
                        restorer: str | Path | Restorer | None = None, vae: torch.nn.Module | None = None
                        ) -> "Upsampler":
        """Load a saved upsampler (`from_config` on its boost_config.json). Pass `first_stage` to reuse one already
        in memory, or `vae` (e.g. a pipeline's) to serve as a diffusers first stage. A folder that starts from a
        restorer finds its weights file again (`Restorer.find`: in the folder, $FMBOOST_RESTORERS, the working
        directory, the shared assets), or takes `restorer` (a path, or one loaded); either way the file must be the
        one it was trained with (sha256)."""
        from .unet import CFMUNet

        directory = Path(directory)
        config_path = directory / BOOST_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {BOOST_CONFIG_NAME} in {directory}: not an fmboost upsampler folder "
                                    "(train one with `fmboost train` or `accelerate launch train/cfm_upsampler.py`)")
        return cls.from_config(json.loads(config_path.read_text()), CFMUNet.from_pretrained(directory).eval(),
                               first_stage, restorer=restorer, vae=vae, directory=directory)

    @classmethod
    def from_config(cls, config: dict, model: torch.nn.Module, first_stage: FirstStage | None = None,
                    estimate: PosteriorMean | Restorer | None = None, *, restorer: str | Path | Restorer | None = None,
                    vae: torch.nn.Module | None = None, directory: str | Path | None = None) -> "Upsampler":
        """The one way from a boost_config.json dict (`config()`, any older form: `upgrade_boost_config`) and the
        networks in memory to an Upsampler: `model` is v_θ; `first_stage` one to reuse (its latent stats are set
        from the config), else built from the config (on `vae` for a diffusers first stage, when given);
        `estimate` R for posterior-mean flows (a pipeline's regression_unet; default: `directory`'s
        posterior_mean/); a flow that starts from a restorer finds the recorded file (`restorer`; `directory`,
        where to look first)."""
        config = upgrade_boost_config(config)
        flow = CouplingFlowMatcher.from_dict(config["flow"])
        if "restorer" in config:
            estimate = _found_restorer(config["restorer"], directory, restorer)
        elif estimate is None and flow.needs_posterior_mean and directory is not None:
            estimate = PosteriorMean.from_pretrained(Path(directory) / POSTERIOR_MEAN_FOLDER)
        _check_estimate(flow, estimate)  # before loading a first stage
        if first_stage is None:
            first_stage = first_stage_from_config(config["first_stage"], vae=vae)
        else:
            first_stage.set_latent_stats(*stats_from_record(config["first_stage"]))
        calibration = config.get("detail_calibration")
        return cls(model, first_stage, flow, config["scale"], SamplerConfig.from_dict(config["sampler"]), estimate,
                   None if calibration is None else DetailCalibration.from_dict(calibration))

    def to(self, device: torch.device | str) -> "Upsampler":
        """Move the networks (CFMUNet, first stage, R) to `device`; returns self."""
        self.model.to(device)
        self.first_stage.to(device)
        if self.estimate is not None:
            self.estimate.to(device)
        return self

    def cast(self, dtype: torch.dtype) -> "Upsampler":
        """Store v_θ and R in `dtype` (e.g. torch.float16 on a GPU; the first stage keeps its own, and
        `mixed_precision` runs them on an fp32 state); returns self."""
        networks = [self.model] + ([] if self.estimate is None else [self.estimate.model])  # R / restorer
        for network in networks:
            if next(network.parameters()).dtype != dtype:
                network.to(dtype)
        return self

    def mixed_precision(self) -> "Upsampler":
        """A view of this upsampler whose v_θ and R run in their weights' dtype (fp16 / bf16 on a GPU) while the
        ODE state stays fp32, and whose `model.counting(**bar)` shows a progress bar per network evaluation
        (`MixedPrecisionVelocity`). BoostPipeline and `fmboost bench upscale` run half-precision weights so."""
        if isinstance(self.model, MixedPrecisionVelocity):
            return self
        estimate = self.estimate
        if isinstance(estimate, PosteriorMean):
            estimate = PosteriorMean(MixedPrecisionVelocity(estimate.model), estimate.latent_mean, estimate.latent_std)
        return dataclasses.replace(self, model=MixedPrecisionVelocity(self.model), estimate=estimate)

    @property
    def image_multiple(self) -> int:
        """Low-res image sides the networks accept are multiples of this (`canvas` pads to them):
        f · (CFMUNet multiple / gcd(scale, it))."""
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
                estimate=TiledModule(self.estimate, tiling) if isinstance(self.estimate, PosteriorMean)
                else self.estimate)
        return Canvas(image, view, (top, left, h, w), tiles, tiling)

    # ------------------------------------------------------------------ the render path

    @property
    def dial(self) -> DetailCalibration | None:
        """The fidelity dial images are made with: the fitted calibration, else the one-band dial
        (`DetailCalibration.uniform`) for posterior-mean flows; None for upsamplers without an estimate."""
        if not self.flow.needs_posterior_mean:
            return None
        return self.detail_calibration or DetailCalibration.uniform()

    def settings(self, sampler: SamplerConfig | str | None = None, **overrides) -> SamplerConfig:
        """The saved sampler overridden by `sampler` (a SamplerConfig, or a spec string for the ODE solve) and
        `overrides` (any SamplerConfig field; None means keep: `SamplerConfig.override`), checked against this
        upsampler: detail < 1 needs a posterior-mean flow, and a dial used with another sampler or back-projection
        than it was fitted with warns."""
        sampler = self.sampler.override(sampler, **overrides)
        if sampler.anchor == "estimate" and sampler.back_project and self.restorer is None:
            raise ValueError("back-projection onto the estimate (anchor 'estimate') needs an upsampler that starts "
                             "from a restorer's image")
        if sampler.detail < 1.0 and self.dial is None:
            raise ValueError(f"detail {sampler.detail:g} < 1 needs a posterior-mean upsampler (source "
                             f"'posterior_mean'); this one's source is {self.flow.source!r} ({self.flow.objective})")
        calibration = self.detail_calibration
        if calibration is not None and sampler.detail < 1.0 and \
                not calibration.fitted_for(sampler.format(), sampler.back_project):
            warnings.warn(f"the detail dial was fitted on {calibration.sampler} samples with "
                          f"{calibration.back_project} back-projection steps; used with {sampler.format()} and "
                          f"{sampler.back_project}, its band weights and order are not the measured ones "
                          "(fmboost calibrate-detail refits it)", stacklevel=3)
        return sampler

    @torch.no_grad()
    def upscale(self, lr_image: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | str | None = None,
                tile_size: int | None = None, tile_overlap: int | None = None, stages: Stages = None,
                decoder: FirstStage | None = None, **overrides) -> UpscaleResult:
        """(B, 3, h, w) image in [-1, 1], any size → (B, 3, s·h, s·w) in [-1, 1], the one render path: `canvas`
        (edge padding, tiles) → condition → source → ODE → decode → crop (`draft`) → dial → back-projection
        (`finish`). Samples with `sampler` (default: the saved one) changed by `overrides` (e.g. num_steps=8,
        detail=0.5, back_project=2; see `settings`); tile_size / tile_overlap in output pixels (see `tiling`);
        `stages` times 'upsample' (up to the ODE) and 'decode' (the rest); `decoder` replaces the first stage's
        decoder (a cheaper one for previews). The source noise is drawn once for the whole canvas; tiles blend
        at every velocity evaluation, so they agree along the trajectory. Stages the dial does not use are
        skipped: at detail 0 without a calibration the flow, at detail 1 R's decode."""
        sampler = self.settings(sampler, **overrides)
        _, uses_estimate, uses_sample = self._dial_uses(sampler)
        draft = self.draft(lr_image, generator, sampler, tile_size, tile_overlap, stages, decoder,
                           estimate=uses_estimate, sample=uses_sample)
        with (stages or _untimed)("decode"):
            return self.finish(draft, sampler)

    @torch.no_grad()
    def draft(self, lr_image: torch.Tensor, generator: Generators = None, sampler: SamplerConfig | None = None,
              tile_size: int | None = None, tile_overlap: int | None = None, stages: Stages = None,
              decoder: FirstStage | None = None, estimate: bool = True, sample: bool = True) -> Draft:
        """The render path up to the dial (arguments as in `upscale`): R's estimate (posterior-mean flows, if
        `estimate`) and the full sample (if `sample`), decoded and cropped to the input's region. `finish`
        turns it into the image for any detail and back-projection: evaluation sweeps the dial over one draft,
        calibration fits the dial on drafts."""
        stages = stages or _untimed
        sampler = sampler or self.sampler
        with stages("upsample"):
            canvas = self.canvas(lr_image, tile_size, tile_overlap)
            view = canvas.upsampler
            restored = self.restorer(lr_image) if self.restorer is not None else None  # the restorer's own image
            cond = None if restored is not None and self.flow.condition_on == "estimate" \
                else view._condition(canvas.image)
            r = None
            if restored is not None:
                r = view.first_stage.encode(canvas.pad(restored))
            elif self.flow.needs_posterior_mean:
                r = view._estimate(cond)
            cond = self.flow.conditioning(cond, r)
            x1, flow_nfe = None, 0
            if sample:
                x0 = view._draw_source(cond, generator, r)
                result = self.flow.transport(view.model, cond, x0, **sampler.solve_kwargs())
                x1, flow_nfe = result.x1, result.nfe
        with stages("decode"):
            decoder = decoder or self.first_stage
            if canvas.tiling is not None:
                decoder = TiledFirstStage(decoder, canvas.tiling)
            decoded_estimate = None
            if r is not None and estimate:
                decoded_estimate = restored if restored is not None else canvas.crop(decoder.decode(r))
            decoded_sample = canvas.crop(decoder.decode(x1)) if x1 is not None else None
            anchor = None if restored is None else downsample(restored.float(), tuple(lr_image.shape[-2:])).clamp(-1, 1)
        return Draft(lr_image, decoded_estimate, decoded_sample, int(r is not None), flow_nfe, canvas.tiles, anchor)

    def finish(self, draft: Draft, sampler: SamplerConfig | None = None) -> UpscaleResult:
        """The render path after the decode: the dial at `sampler.detail` (R + Σ_b gain_b (S − R)_b; the sample
        itself where every gain is 1, the estimate where every gain is 0), then `sampler.back_project` steps of
        back-projection onto the low-res input. The NFE counts the flow only if the image uses the sample.
        `sampler` is taken as given: `upscale` and eval-sr's methods check it with `settings` first."""
        sampler = sampler or self.sampler
        gains, uses_estimate, uses_sample = self._dial_uses(sampler)
        if not uses_estimate:
            image, nfe = _needed(draft.sample, "sample"), draft.estimate_nfe + draft.flow_nfe
        elif not uses_sample:
            image, nfe = _needed(draft.estimate, "estimate"), draft.estimate_nfe
        else:
            image = self.dial.combine_gains(_needed(draft.estimate, "estimate"), _needed(draft.sample, "sample"),
                                            gains, self.scale)
            nfe = draft.estimate_nfe + draft.flow_nfe
        target = draft.lr if sampler.anchor == "input" else _needed(draft.anchor, "anchor")
        image = back_project(image.float().clamp(-1, 1), target.float(), sampler.back_project)
        return UpscaleResult(image, nfe, draft.tiles)

    def _dial_uses(self, sampler: SamplerConfig) -> tuple[torch.Tensor | None, bool, bool]:
        """(the dial's gains at sampler.detail — None without a dial —, whether the image uses R's estimate,
        whether it uses the flow's sample): what `upscale` asks `draft` for and `finish` blends. Without a dial
        the image is the sample; every gain 1, the sample; every gain 0, the estimate."""
        dial = self.dial
        if dial is None:
            return None, False, True
        gains = dial.gains(sampler.detail)
        return gains, bool((gains < 1).any()), bool((gains > 0).any())

    # ------------------------------------------------------------------ the path's latent steps

    def _condition(self, lr_image: torch.Tensor) -> torch.Tensor:
        """The clean up-sampled latent (B, C, s·h/f, s·w/f) the model is conditioned on, from lr_image (B, 3, h, w)
        whose sides are multiples of the first stage's factor f (a canvas's are)."""
        f = self.first_stage.downsample_factor
        if lr_image.shape[-2] % f or lr_image.shape[-1] % f:
            raise ValueError(f"lr_image size {tuple(lr_image.shape[-2:])} must be a multiple of {f}")
        h, w = lr_image.shape[-2] // f, lr_image.shape[-1] // f
        return self.flow.condition(None, (h * self.scale, w * self.scale), self.first_stage, lr_image)

    def _estimate(self, cond: torch.Tensor) -> torch.Tensor:
        """R(cond) (B, C, H, W) in this upsampler's latent normalisation: one network evaluation."""
        return self.estimate(cond, self.first_stage.latent_mean, self.first_stage.latent_std)

    def _draw_source(self, cond: torch.Tensor, generator: Generators, estimate: torch.Tensor | None
                     ) -> torch.Tensor | None:
        """x0 (B, C, H, W), where the ODE starts (None for regression). `generator`: one, or a list with one per
        input, so that each image is reproducible on its own whatever batch it is drawn in."""
        if not isinstance(generator, list):
            return self.flow.draw_source(cond, generator, estimate)
        if len(generator) != cond.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {cond.shape[0]}")
        rows = [self.flow.draw_source(cond[i:i + 1], g, None if estimate is None else estimate[i:i + 1])
                for i, g in enumerate(generator)]
        return None if rows[0] is None else torch.cat(rows)


# `posterior_mean=`, the old name of `estimate`, still builds one (and `dataclasses.replace` takes it) for a release.
Upsampler.__init__ = renamed_keywords(posterior_mean="estimate")(Upsampler.__init__)


def _check_estimate(flow: CouplingFlowMatcher, estimate: PosteriorMean | Restorer | None) -> None:
    if flow.needs_posterior_mean and estimate is None:
        raise ValueError("a flow with source 'posterior_mean' needs its posterior-mean model R "
                         "(PosteriorMean.from_upsampler(<regression Upsampler>); a BoostPipeline needs its "
                         "regression_unet) or a Restorer")


def _found_restorer(record: dict, directory: str | Path | None, given: str | Path | Restorer | None) -> Restorer:
    """The folder's restorer: `given` when it is the recorded file (a loaded one is checked by its sha256), else
    the recorded file found again (`Restorer.find`)."""
    if isinstance(given, Restorer):
        if given.sha256 != record["sha256"]:
            raise ValueError(f"the restorer given ({given.name}, sha256 {given.sha256[:16]}…) is not the one "
                             f"{directory or 'this upsampler'} was trained with ({record['file']}, sha256 "
                             f"{record['sha256'][:16]}…)")
        return given
    return Restorer.find(record, directory, given)


def _needed(image: torch.Tensor | None, what: str) -> torch.Tensor:
    if image is None:
        raise ValueError(f"this draft has no {what}: make it with draft(..., {what}=True)")
    return image


def _untimed(stage: str) -> contextlib.AbstractContextManager:
    """The `Stages` default: run the stage untimed."""
    return contextlib.nullcontext()
