"""Borders and tiles on held-out real photos ($FMBOOST_SHARED/data/photos), with upsamplers trained here in
seconds on the wheel sample photos (the demo's data, zero-padded CFMUNet: the setting that shows the frame).

Measures, each on the same crops as its reference so image content cancels:
  border  PSNR of the 8-px border band minus the interior's (≥ 16 px in), against bicubic's on the same
          crops: `upscale` within BORDER_MARGIN_DB of it; the network without context (`upscale` on a canvas
          without margin, BORDER_CONTEXT = 0) is not — the frame this test exists to catch. Both without
          back-projection, which would mend some of the frame after the fact: the margin is what is tested.
  tiles   tiled vs untiled `upscale` of a photo: PSNR ≥ TILES[model][2], and the gradient energy across
          tile edges within SEAM_MARGIN of the untiled image's at the same columns / rows. TAEF2's decoder
          normalises (GroupNorm) over what it sees, so its tiles differ more from one whole pass.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fmboost.models import Upsampler
from fmboost.models import upsampler as upsampler_module
from fmboost.models.consistency import downsample
from fmboost.train.cfm_upsampler import train
from fmboost.train.config import load_config
from fmboost.train.demo import DEMO_CONFIG
from PIL import Image

from ..conftest import require_shared

pytestmark = [pytest.mark.shared, pytest.mark.slow]

BORDER_MARGIN_DB = 0.1
#: per model: tile size, overlap (output px), least PSNR of tiled vs untiled (dB)
TILES = {"pixel_upsampler": (128, 32, 35.0), "taef2_upsampler": (256, 64, 30.0)}
SEAM_MARGIN = 1.10
QUICK = dict(max_train_steps=150, crops_per_image=32, lr_warmup_steps=10, model_preset="tiny", padding_mode="zeros",
             block_out_channels=[16, 32, 32], attention_levels=[False, False, False])


def quick_upsampler(tmp_path_factory, **overrides) -> Upsampler:
    out = tmp_path_factory.mktemp("quick")
    return Upsampler.from_pretrained(train(load_config(None, {**DEMO_CONFIG, **QUICK, "output_dir": str(out),
                                                              **overrides})))


@pytest.fixture(scope="module")
def pixel_upsampler(tmp_path_factory):
    return quick_upsampler(tmp_path_factory)


@pytest.fixture(scope="module")
def taef2_upsampler(tmp_path_factory):
    require_shared("weights/taef2")
    return quick_upsampler(tmp_path_factory, first_stage="taef2", crop_size=64, crops_per_image=16,
                           latent_stats_images=32, block_out_channels=[32, 64], attention_levels=[False, False])


def load_photo(path, short: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    ratio = short / min(image.size)
    image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.fixture(scope="module")
def photos():
    folder = require_shared("data/photos")
    return sorted(folder.glob("*.jpg"))[5::20][:8]


def crops(photos, scale: int = 4, short: int = 256, size: int = 128):
    """(hr (N, 3, size, size), lr (N, 3, size/s, size/s)): a corner and the centre of each photo, lr cut from the
    down-sampled whole photo (as a low-res generator's output would be)."""
    hr, lr = [], []
    for path in photos:
        x = load_photo(path, short)
        H, W = (n // 64 * 64 for n in x.shape[-2:])
        x = x[:, :H, :W]
        small = downsample(x[None], (H // scale, W // scale))[0]
        for top, left in ((0, 0), (H // 2 - size // 2, W // 2 - size // 2)):
            hr.append(x[:, top:top + size, left:left + size])
            lr.append(small[:, top // scale:(top + size) // scale, left // scale:(left + size) // scale])
    return torch.stack(hr), torch.stack(lr)


def border_gap_db(pred: torch.Tensor, hr: torch.Tensor, band: int = 8, interior: int = 16) -> float:
    """PSNR of the band-px border band minus that of the pixels ≥ `interior` px from every edge (negative: worse
    at the border)."""
    n = hr.shape[-1]
    a = torch.arange(n)
    dist = torch.minimum(torch.minimum(a[:, None], a[None]), torch.minimum(n - 1 - a[:, None], n - 1 - a[None]))
    se = ((pred.clamp(-1, 1) - hr) / 2) ** 2
    return 10 * math.log10(se[..., dist >= interior].mean().item() / se[..., dist < band].mean().item())


def check_borders(upsampler: Upsampler, photos, frame_without_context: bool, monkeypatch):
    hr, lr = crops(photos)
    bicubic = border_gap_db(F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False), hr)
    fixed = border_gap_db(upsampler.upscale(lr, torch.Generator().manual_seed(0), back_project=0).image, hr)
    saved = border_gap_db(upsampler.upscale(lr, torch.Generator().manual_seed(0)).image, hr)
    with monkeypatch.context() as patch:
        patch.setattr(upsampler_module, "BORDER_CONTEXT", 0)
        assert upsampler.canvas(lr).image.shape == lr.shape  # no margin: the network sees the crop alone
        bare = border_gap_db(upsampler.upscale(lr, torch.Generator().manual_seed(0), back_project=0).image, hr)
    print(f"border band − interior PSNR: bicubic {bicubic:+.2f} dB, upscale {fixed:+.2f} (with the folder's "
          f"{upsampler.sampler.back_project} back-projection steps {saved:+.2f}), no context {bare:+.2f}")
    assert fixed >= bicubic - BORDER_MARGIN_DB
    if frame_without_context:  # the network alone shows the frame: the measure sees it
        assert bare < bicubic - BORDER_MARGIN_DB


def test_no_frame_pixel_space(pixel_upsampler, photos, monkeypatch):
    check_borders(pixel_upsampler, photos, frame_without_context=True, monkeypatch=monkeypatch)


def test_no_frame_taef2(taef2_upsampler, photos, monkeypatch):
    # too briefly trained to show a frame without context
    check_borders(taef2_upsampler, photos, frame_without_context=False, monkeypatch=monkeypatch)


def tile_edges(upsampler: Upsampler, lr: torch.Tensor, tile_size: int, tile_overlap: int) -> tuple[list, list]:
    """Output rows and columns where a tile starts or ends (inside the image)."""
    canvas = upsampler.canvas(lr, tile_size, tile_overlap)
    tiling, f, s = canvas.upsampler.model.tiling, upsampler.first_stage.downsample_factor, upsampler.scale
    top, left, h, w = canvas.box
    edges = []
    for length, offset, n in ((canvas.image.shape[-2], top, h), (canvas.image.shape[-1], left, w)):
        spans = tiling.spans(length * s // f)
        cut = {e * f - offset * s for span in spans for e in span}
        edges.append(sorted(c for c in cut if 0 < c < n * s))
    return edges


def gradient_energy(image: torch.Tensor, rows: list, cols: list) -> float:
    """Mean squared step across the given rows (between row r−1 and r) and columns."""
    dy = (image[..., rows, :] - image[..., [r - 1 for r in rows], :]) ** 2
    dx = (image[..., :, cols] - image[..., :, [c - 1 for c in cols]]) ** 2
    return (dy.sum() + dx.sum()).item() / (dy.numel() + dx.numel())


@pytest.mark.parametrize("model", ["pixel_upsampler", "taef2_upsampler"])
def test_tiled_matches_untiled_without_seams(model, photos, request):
    upsampler = request.getfixturevalue(model)
    x = load_photo(photos[0], 384)
    lr = downsample(x[None], (x.shape[-2] // 4, x.shape[-1] // 4))[..., :93, :135]  # odd sizes
    tile_size, tile_overlap, least_psnr = TILES[model]
    whole = upsampler.upscale(lr, torch.Generator().manual_seed(0), tile_size=0).image
    tiled = upsampler.upscale(lr, torch.Generator().manual_seed(0), tile_size=tile_size, tile_overlap=tile_overlap)
    assert whole.shape == tiled.image.shape == (1, 3, 372, 540) and tiled.tiles > 4
    psnr = 10 * math.log10(4 / F.mse_loss(tiled.image, whole).item())
    rows, cols = tile_edges(upsampler, lr, tile_size, tile_overlap)
    seam = gradient_energy(tiled.image, rows, cols) / gradient_energy(whole, rows, cols)
    print(f"{model}: tiled vs untiled {psnr:.1f} dB over {tiled.tiles} tiles; gradient energy at tile edges "
          f"{seam:.3f}× the untiled image's")
    assert psnr >= least_psnr and seam <= SEAM_MARGIN
