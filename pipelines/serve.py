"""`fmboost serve --upsampler DIR [--base-model ID_OR_DIR]`: a web page to upscale photos and generate images.

*Upscale*: upload a photo → the CFM result beside a reference on a before / after slider — bicubic, or Real-ESRGAN
x4plus (the upscaler most people already use; offered for ×4 upsamplers when its weights are found) — with the
sampler (ODE solver, steps), the fidelity dial `detail` (posterior-mean upsamplers only), back-projection, the
seed, a progress bar and the full-resolution PNG to download. *Generate*: prompt → base image → CFM →
high-resolution image, when the pipeline has a base text-to-image model (`--base-model`, or a saved BoostPipeline
folder as `--upsampler`); without one the tab says so and its button is disabled.

`BoostService` holds the models and does the work on PIL images (tested without a browser); `build_app`
lays out the Gradio page and names its events `/upscale` and `/generate` for `gradio_client`. Gradio is an
optional dependency (`pip install "fmboost[serve]"`), imported only when the page is built.

Requests share one device, so they wait in Gradio's queue; `--concurrency N` renders N at a time and the queue
holds at most `--max-queue` (a request beyond it is answered at once that the queue is full). An upload that is
too large, empty, truncated or not an image is refused before it enters the queue (Gradio's validator runs
outside it), with a message naming the problem; the upscale event therefore receives the raw upload and decodes
it itself (`BoostService.open_upload`) instead of letting Gradio's preprocessing fail with a generic message.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from fmboost.models.degradations import to_uint8
from fmboost.models.realesrgan import REALESRGAN_SCALE, default_realesrgan_path, load_realesrgan, realesrgan_upscale
from fmboost.pipelines.cli import UserError
from fmboost.pipelines.cli_options import (
    BASE_PARTS,
    add_device_arguments,
    add_fast_argument,
    add_render_arguments,
    device_and_dtype,
    is_boost_pipeline,
    load_image_upsampler,
    load_pipeline,
    render_settings,
)
from fmboost.pipelines.collection import BadInput, read_image
from fmboost.pipelines.lcm import base_defaults
from fmboost.pipelines.render import upscale_images
from fmboost.train.image_sources import ImageRecord

NO_BASE_MODEL = ("Generate needs a base text-to-image model: start the server with `--base-model ID_OR_DIR` "
                 "(a Stable Diffusion-family pipeline: hub id or folder saved with save_pretrained), or pass a "
                 "saved BoostPipeline folder as `--upsampler`.")
MAX_STEPS = 64
#: The back-projection slider's end: measured gains stop after a few steps (RESULTS.md).
MAX_BACK_PROJECT = 8
IMAGE_HEIGHT = 480  # px on the page; the slider zooms, the download is full resolution
#: What the slider can show beside fmboost's result.
REFERENCES = ("bicubic", "Real-ESRGAN")
#: The reference name of an upsampler's own restorer (its detail 0), followed by the weights file's name.
RESTORER_REFERENCE = "restorer:"
#: Real-ESRGAN's tile side (low-res px): bounds its memory at --max-megapixels inputs (4 KiB per input pixel
#: per feature map of its ×4 tail, `fmboost.models.realesrgan`).
REALESRGAN_TILE = 256
#: Bytes an upload may hold per pixel of --max-megapixels: 8 covers 16-bit RGBA stored uncompressed.
UPLOAD_BYTES_PER_PIXEL = 8


def import_gradio():
    """The gradio module, or a UserError naming the extra that installs it."""
    try:
        import gradio
    except ImportError:
        raise UserError('the web app needs Gradio: pip install "fmboost[serve]" (in a checkout: '
                        'pip install -e ".[serve]")') from None
    return gradio


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--upsampler", required=True, help="upsampler folder (e.g. runs/demo/upsampler) or a saved "
                                                           "BoostPipeline folder")
    parser.add_argument("--base-model", default=None,
                        help="SD-family text-to-image pipeline (hub id or folder) for the Generate tab")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--max-megapixels", type=float, default=0.25,
                        help="largest input the Upscale tab accepts, in megapixels (memory grows with the output)")
    add_device_arguments(parser)
    parser.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="requests rendered at a time (default 1: one request uses the whole device, every CPU "
                             "core or the GPU; raise it on a GPU with memory to spare)")
    parser.add_argument("--max-queue", type=int, default=16, metavar="N",
                        help="requests that may wait; beyond that a request is told the queue is full (default 16)")
    add_render_arguments(parser)  # where the page's controls start
    add_fast_argument(parser)


@dataclass
class Upscaled:
    """One upscale: the input (RGB), the reference (bicubic or Real-ESRGAN) and CFM at the output size (exactly
    scale × the input), and a one-line summary (sizes, sampler, NFE, seconds)."""

    input: PIL.Image.Image
    reference: PIL.Image.Image
    result: PIL.Image.Image
    summary: str


class BoostService:
    """The models behind the page, already on `device`: the Upscale tab renders with `upsampler` (`Upsampler.upscale`
    through `fmboost.pipelines.render`), the Generate tab with `pipe`, a BoostPipeline with a base text-to-image
    model (None: no Generate), whose upsampler is the one the Upscale tab uses. Inputs above `max_megapixels` are
    refused with a message (the output, scale² times larger, is what costs memory). `realesrgan_path`: the
    Real-ESRGAN x4plus weights for the reference (default: the shared-assets copy)."""

    def __init__(self, upsampler, device: torch.device, max_megapixels: float = 0.25,
                 realesrgan_path: str | Path | None = None, pipe=None):
        self._upsampler, self.pipe = upsampler, pipe
        self.device, self.max_megapixels = torch.device(device), max_megapixels
        self.realesrgan_path = Path(realesrgan_path) if realesrgan_path else default_realesrgan_path()
        self._realesrgan = None  # loaded at the first Real-ESRGAN reference
        #: Where the controls start: the upsampler's saved SamplerConfig (`fmboost serve --sampler / --detail /
        #: --back-project` change it).
        self.default_sampler = self.upsampler.sampler

    @classmethod
    def load(cls, upsampler: str, base_model: str | None = None, device: str | None = None,
             dtype: str | None = None, max_megapixels: float = 0.25, fast: bool = False) -> BoostService:
        """From folders / hub ids as the command line takes them; a missing model is a UserError. A base model, or a
        saved BoostPipeline folder as `upsampler`, loads a BoostPipeline for the Generate tab; an upsampler folder
        alone loads just the upsampler (`load_image_upsampler`). `fast`: the fast path
        (`fmboost.pipelines.fast_path`)."""
        device, torch_dtype = device_and_dtype(argparse.Namespace(device=device, dtype=dtype))
        if not base_model and not is_boost_pipeline(upsampler):
            return cls(load_image_upsampler(upsampler, device, torch_dtype, fast), device, max_megapixels)
        pipe = load_pipeline(base_model, upsampler, torch_dtype) if base_model else \
            load_pipeline(upsampler, None, torch_dtype)
        pipe.set_progress_bar_config(leave=False)
        pipe.to(device)
        if fast:
            pipe.enable_fast_path()
        return cls(None, device, max_megapixels, pipe=pipe)

    # ------------------------------------------------------------------ what the controls offer

    @property
    def upsampler(self):
        """The `Upsampler` the Upscale tab renders with (with a pipeline: the pipeline's, on its components)."""
        return self._upsampler if self.pipe is None else self.pipe.upsampler

    @property
    def scale(self) -> int:
        return self.upsampler.scale

    @property
    def has_detail(self) -> bool:
        """Whether the `detail` dial does anything: only posterior-mean flows have it."""
        return self.upsampler.flow.needs_posterior_mean

    @property
    def realesrgan_unavailable(self) -> str | None:
        """Why the Real-ESRGAN reference is not offered, or None when it is."""
        if self.scale != REALESRGAN_SCALE:
            return f"Real-ESRGAN x4plus up-samples ×{REALESRGAN_SCALE}, this upsampler ×{self.scale}"
        if self.realesrgan_path is None or not self.realesrgan_path.is_file():
            return (f"Real-ESRGAN x4plus weights not found at {self.realesrgan_path or '$FMBOOST_SHARED/weights'}: "
                    "see the README's assets section")
        return None

    @property
    def references(self) -> tuple[str, ...]:
        """The references the slider offers: bicubic, Real-ESRGAN where it is available, and the restorer the
        upsampler starts from (its detail 0), named by its weights file, where it has one."""
        restorer = self.upsampler.restorer
        own = () if restorer is None else (f"{RESTORER_REFERENCE} {restorer.name}",)
        return (REFERENCES if self.realesrgan_unavailable is None else REFERENCES[:1]) + own

    def reference(self, image: PIL.Image.Image, name: str = "bicubic") -> PIL.Image.Image:
        """`image` up-sampled ×scale by the reference `name` (one of REFERENCES): what the result is compared with."""
        size = (image.width * self.scale, image.height * self.scale)
        if name == "bicubic":
            return image.resize(size, PIL.Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        if name.startswith(RESTORER_REFERENCE) and name in self.references:
            restorer = self.upsampler.restorer
            return PIL.Image.fromarray(to_uint8(restorer(pixels.to(self.device)).cpu())[0])
        if name not in REFERENCES:
            raise UserError(f"reference must be one of {list(self.references)}, got {name!r}")
        if self.realesrgan_unavailable:
            raise UserError(self.realesrgan_unavailable)
        if self._realesrgan is None:
            self._realesrgan = load_realesrgan(self.realesrgan_path, self.device)
        upscaled = realesrgan_upscale(self._realesrgan, pixels, tile=REALESRGAN_TILE)
        return PIL.Image.fromarray(to_uint8(upscaled)[0])

    @property
    def generate_unavailable(self) -> str | None:
        """Why the Generate tab is disabled, or None when there is a pipeline with a base model."""
        return NO_BASE_MODEL if any(getattr(self.pipe, k, None) is None for k in BASE_PARTS) else None

    def sampler(self, solver: str | None = None, steps: int | None = None, detail: float | None = None,
                back_project: int | None = None):
        """The default sampler with the controls' solver, steps, detail and back-projection steps, checked by
        `Upsampler.settings` (a bad value is a ValueError)."""
        return self.upsampler.settings(
            self.default_sampler, solver=solver, num_steps=None if steps is None else int(steps), detail=detail,
            back_project=None if back_project is None else int(back_project))

    def open_upload(self, upload) -> PIL.Image.Image:
        """An uploaded image as RGB: a PIL image, a file path or Gradio's file data ({"path": ...}); a UserError
        naming the problem for an empty, truncated, non-image or too-large (above max_megapixels) upload. The
        page runs it before the queue and again in the event."""
        if isinstance(upload, PIL.Image.Image):
            return upload
        path = upload.get("path") if isinstance(upload, dict) else upload
        if not path:
            raise UserError("upload an image first")
        name = (upload.get("orig_name") if isinstance(upload, dict) else None) or os.path.basename(path)
        try:
            return read_image(ImageRecord(name, str(path)), self.max_megapixels)
        except BadInput as bad:
            advice = ("downscale it or restart with --max-megapixels" if bad.kind == "too-large" else
                      "upload a PNG, JPEG or WebP image")
            raise UserError(f"{name}: {bad.reason}: {advice}") from None

    # ------------------------------------------------------------------ the two jobs

    def upscale(self, image: PIL.Image.Image, solver: str | None = None, steps: int | None = None,
                detail: float | None = None, back_project: int | None = None, seed: int = 0,
                reference: str = "bicubic") -> Upscaled:
        """Super-resolve `image` (any size up to max_megapixels; the output is exactly scale × the input), beside
        the `reference` up-sampling of it."""
        megapixels = image.width * image.height / 1e6
        if megapixels > self.max_megapixels:
            raise UserError(f"the image is {image.width}x{image.height} ({megapixels:.2f} MP), above this server's "
                            f"limit of {self.max_megapixels:g} MP: downscale it or restart with --max-megapixels")
        image = image.convert("RGB")
        sampler = self.sampler(solver, steps, detail, back_project)
        start = time.perf_counter()
        out = upscale_images(self.upsampler, [image], self._generator(seed), sampler, progress={"leave": False})
        result = out.images[0]
        summary = self._summary(image, result, sampler, out.nfe, start)
        return Upscaled(image, self.reference(image, reference), result, f"{summary}; slider: {reference} ↔ fmboost")

    def generate(self, prompt: str, negative_prompt: str | None = None, base_steps: int | None = None,
                 guidance: float | None = None, base_size: int = 256, solver: str | None = None,
                 steps: int | None = None, detail: float | None = None, back_project: int | None = None, seed: int = 0,
                 ) -> tuple[PIL.Image.Image, str]:
        """Text → base image (base_size²) → boosted image, and a one-line summary; a UserError when there is no
        base model. base_steps / guidance default to the base's (`fmboost.pipelines.lcm.base_defaults`)."""
        if self.generate_unavailable:
            raise UserError(self.generate_unavailable)
        if not prompt or not prompt.strip():
            raise UserError("write a prompt first")
        sampler = self.sampler(solver, steps, detail, back_project)
        start = time.perf_counter()
        out = self.pipe(prompt, negative_prompt=negative_prompt or None,
                        num_inference_steps=None if base_steps is None else int(base_steps),
                        guidance_scale=guidance, base_size=int(base_size), sampler=sampler,
                        generator=self._generator(seed))
        result = out.images[0]
        return result, f"{result.width}x{result.height}, {self._sampler_text(sampler)}, NFE {out.nfe}, " \
                       f"{time.perf_counter() - start:.1f} s"

    def _generator(self, seed) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(int(seed))

    def _sampler_text(self, sampler) -> str:
        return f"sampler {sampler.format()}" + (f", detail {sampler.detail:g}" if self.has_detail else "") + \
            f", back-projection {sampler.back_project}"

    def _summary(self, image, result, sampler, nfe: int, start: float) -> str:
        return (f"{image.width}x{image.height} → {result.width}x{result.height}, {self._sampler_text(sampler)}, "
                f"NFE {nfe}, {time.perf_counter() - start:.1f} s")


# ---------------------------------------------------------------------- the page


def build_app(service: BoostService, output_dir: str | Path | None = None, concurrency: int = 1):
    """The Gradio Blocks page over `service`; results for download are written to `output_dir` (a new temporary
    folder by default). Events: `/upscale` (image, solver, steps, detail, back-projection steps, seed, reference →
    slider, PNG, summary) and `/generate` (prompt, negative prompt, base steps, guidance, base size, solver, steps,
    detail, back-projection steps, seed → image, summary); the two share `concurrency` renders at a time."""
    gr = import_gradio()
    output_dir = Path(output_dir or tempfile.mkdtemp(prefix="fmboost-serve-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    default = service.default_sampler
    progress_bar = gr.Progress(track_tqdm=True)  # Gradio finds it as a parameter default; tracks the NFE bar

    def sampler_controls():
        with gr.Row():
            solver = gr.Dropdown(list(_solvers()), value=default.solver, label="sampler (ODE solver)")
            steps = gr.Slider(1, MAX_STEPS, value=default.num_steps, step=1, label="steps",
                              info="ignored by adaptive solvers (dopri5, …)")
            detail = gr.Slider(0.0, 1.0, value=default.detail, step=0.05, label="fidelity ↔ detail",
                               interactive=service.has_detail,
                               info="0: the regression estimate (best PSNR, smooth); 1: full detail" if
                               service.has_detail else "only posterior-mean upsamplers have this dial")
            back_project = gr.Slider(0, MAX_BACK_PROJECT, value=default.back_project, step=1,
                                     label="back-projection steps",
                                     info="make the result agree with the input when scaled back down; 0: none")
            seed = gr.Number(0, precision=0, label="seed")
        return [solver, steps, detail, back_project, seed]

    def check_upload(image, *controls):
        """Gradio's validator: runs before the queue, so a bad upload is refused without waiting for a worker."""
        try:
            service.open_upload(image)
        except UserError as err:
            return [gr.validate(False, str(err))] + [gr.validate(True, "")] * len(controls)
        return [gr.validate(True, "")] * (1 + len(controls))

    def upscale(image, solver, steps, detail, back_project, seed, reference, progress=progress_bar):
        progress(0, desc="upscaling")
        try:
            done = service.upscale(service.open_upload(image), solver, steps, detail, back_project, seed, reference)
        except (UserError, ValueError) as err:
            raise gr.Error(str(err)) from None
        path = output_dir / f"fmboost_{done.result.width}x{done.result.height}_seed{int(seed)}.png"
        done.result.save(path)
        return (done.reference, done.result), str(path), done.summary

    def generate(prompt, negative_prompt, base_steps, guidance, base_size, solver, steps, detail, back_project,
                 seed, progress=progress_bar):
        progress(0, desc="generating")
        try:
            return service.generate(prompt, negative_prompt, base_steps, guidance, base_size, solver, steps, detail,
                                    back_project, seed)
        except (UserError, ValueError) as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title="fmboost", analytics_enabled=False) as app:
        gr.Markdown(f"# fmboost\nCoupling flow matching upsampler, ×{service.scale} "
                    f"({default.format()} by default).")
        with gr.Tab("Upscale"):
            with gr.Row():
                image = gr.Image(type="pil", image_mode="RGB", label="input", elem_id="upscale-input",
                                 sources=["upload", "clipboard"], height=IMAGE_HEIGHT)
                slider = gr.ImageSlider(type="pil", format="png", label="reference ↔ fmboost",
                                        elem_id="upscale-slider", height=IMAGE_HEIGHT)
            upscale_controls = sampler_controls()
            reference = gr.Radio(list(service.references), value="bicubic", label="compare with",
                                 elem_id="upscale-reference",
                                 info="the left side of the slider" + (
                                     f" (Real-ESRGAN unavailable: {service.realesrgan_unavailable})"
                                     if service.realesrgan_unavailable else ""))
            button = gr.Button("Upscale", variant="primary", elem_id="upscale-button")
            with gr.Row():
                summary = gr.Textbox(label="result", interactive=False, elem_id="upscale-summary")
                download = gr.File(label="download (PNG, full resolution)", elem_id="upscale-download")
            # preprocess=False: the event gets the raw upload and decodes it itself (`open_upload`)
            button.click(upscale, [image, *upscale_controls, reference], [slider, download, summary],
                         api_name="upscale", preprocess=False, validator=check_upload,
                         concurrency_limit=concurrency, concurrency_id="render")
        with gr.Tab("Generate"):
            reason = service.generate_unavailable
            if reason:
                gr.Markdown(f"**Unavailable.** {reason}", elem_id="generate-unavailable")
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", interactive=not reason, elem_id="generate-prompt")
                    negative = gr.Textbox(label="negative prompt", interactive=not reason)
                    with gr.Row():
                        default_steps, default_guidance = base_defaults(getattr(service.pipe, "unet", None),
                                                                        getattr(service.pipe, "scheduler", None))
                        base_steps = gr.Slider(1, 50, value=default_steps, step=1, label="base steps")
                        guidance = gr.Slider(0.0, 15.0, value=default_guidance, step=0.5, label="guidance",
                                             info="≤ 1: no classifier-free guidance batch (LCM bases start there)")
                        base_size = gr.Slider(64, 1024, value=256, step=64, label="base size (px)")
                    generate_controls = sampler_controls()
                    go = gr.Button("Generate", variant="primary", interactive=not reason, elem_id="generate-button")
                with gr.Column():
                    generated = gr.Image(type="pil", format="png", label="boosted image", interactive=False)
                    generated_summary = gr.Textbox(label="result", interactive=False)
            go.click(generate, [prompt, negative, base_steps, guidance, base_size, *generate_controls],
                     [generated, generated_summary], api_name="generate", concurrency_limit=concurrency,
                     concurrency_id="render")
    return app


def _solvers() -> tuple[str, ...]:
    from fmboost.models.sampling import SOLVERS

    return SOLVERS


def run(args: argparse.Namespace) -> int:
    import_gradio()  # before loading models: a missing extra fails at once
    if args.concurrency < 1 or args.max_queue < 1:
        raise UserError(f"--concurrency and --max-queue must be >= 1, got {args.concurrency} and {args.max_queue}")
    service = BoostService.load(args.upsampler, args.base_model, args.device, args.dtype, args.max_megapixels,
                                args.fast)
    service.default_sampler = service.upsampler.settings(render_settings(args, service.default_sampler))
    print(f"fmboost serve: ×{service.scale} upsampler from {args.upsampler}"
          + (f", base model {args.base_model}" if args.base_model else "") + f", on {service.device}")
    if args.fast and args.concurrency > 1 and service.device.type == "cuda":
        raise UserError("--fast replays CUDA graphs, one call at a time: use --concurrency 1 with --fast")
    max_file_size = int(args.max_megapixels * 1e6 * UPLOAD_BYTES_PER_PIXEL) + 2 ** 20
    build_app(service, concurrency=args.concurrency).queue(max_size=args.max_queue).launch(
        server_name=args.host, server_port=args.port, show_error=True, max_file_size=max_file_size)
    return 0
