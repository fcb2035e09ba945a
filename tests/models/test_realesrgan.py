"""Tests for fmboost.models.realesrgan: the RRDBNet structure and key names, tiling, and the pretrained x4plus weights.

The weights test needs $FMBOOST_SHARED/weights/realesrgan (default ../shared) and skips, naming it, when absent.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fmboost.models.assets import SHARED_ENV
from fmboost.models.metrics import MetricUnavailable
from fmboost.models.realesrgan import REALESRGAN_SHARED_PATH, RRDBNet, load_realesrgan, realesrgan_upscale
from PIL import Image

from ..conftest import require_shared

#: Least PSNR (8-bit) of our unpadded forward against the shared reference output. Measured: 89.0 dB (one channel
#: value of 192·192·3 off by one, from the [-1, 1] round trip); the raw [0, 1] forward matches it bit for bit.
REFERENCE_MIN_PSNR_DB = 45.0


def _tiny_net(num_block: int = 2, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(num_feat=8, num_block=num_block, num_grow_ch=4).eval()


def _read_png(path: Path) -> torch.Tensor:
    """An 8-bit RGB PNG as a (1, 3, H, W) float tensor in [0, 255]."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def test_tiny_rrdbnet_shape_and_basicsr_keys(generator):
    net = _tiny_net()
    lr = torch.rand(2, 3, 7, 10, generator=generator) * 2 - 1
    out = realesrgan_upscale(net, lr)
    assert out.shape == (2, 3, 28, 40) and out.dtype == lr.dtype
    assert out.min().item() >= -1 and out.max().item() <= 1
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 6, generator=generator)).shape == (1, 3, 20, 24)

    keys = set(net.state_dict())
    expected = {
        f"{name}.{p}"
        for name in ("conv_first", "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last")
        for p in ("weight", "bias")
    }
    expected |= {
        f"body.{n}.rdb{r}.conv{c}.{p}"
        for n in range(2)
        for r in (1, 2, 3)
        for c in range(1, 6)
        for p in ("weight", "bias")
    }
    assert keys == expected
    # Dense growth: conv k of a dense block sees the 8 block features plus 4 per earlier conv.
    assert net.state_dict()["body.1.rdb3.conv4.weight"].shape == (4, 8 + 3 * 4, 3, 3)
    assert net.state_dict()["body.0.rdb1.conv5.weight"].shape == (8, 8 + 4 * 4, 3, 3)


def test_upscale_tiling(generator):
    net = _tiny_net(num_block=1)
    lr = torch.rand(1, 3, 40, 33, generator=generator) * 2 - 1
    full = realesrgan_upscale(net, lr)
    # One RRDB: 17 convs at low resolution plus the ×4 tail see < 20 px, so a 20 px overlap makes tiling exact.
    torch.testing.assert_close(realesrgan_upscale(net, lr, tile=16, tile_overlap=20), full)
    assert realesrgan_upscale(net, lr, tile=16, tile_overlap=2).shape == full.shape
    assert realesrgan_upscale(net, lr[..., :5, :6], tile=16).shape == (1, 3, 20, 24)


@pytest.mark.shared
def test_pretrained_weights_reproduce_reference_output():
    weights = require_shared(REALESRGAN_SHARED_PATH)
    model = load_realesrgan(weights)
    assert all(p.dtype == torch.float32 for p in model.parameters()) and not model.training
    folder = weights.parent
    lr = _read_png(folder / "reference_input_48.png") / 127.5 - 1
    reference = _read_png(folder / "reference_output_192.png")

    out = realesrgan_upscale(model, lr)
    assert out.shape == (1, 3, 192, 192)
    ours = ((out + 1) * 127.5).round()
    mse = (ours - reference).pow(2).mean().item()
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    print(f"Real-ESRGAN x4plus vs reference_output_192.png: {psnr:.2f} dB")
    assert psnr >= REFERENCE_MIN_PSNR_DB, f"{psnr:.2f} dB"


def test_missing_weights_raise_metric_unavailable(tmp_path, monkeypatch):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(MetricUnavailable, match="nope.safetensors"):
        load_realesrgan(missing)
    # The default path comes from $FMBOOST_SHARED; an assets folder without the weights names the full path.
    monkeypatch.setenv(SHARED_ENV, str(tmp_path))
    with pytest.raises(MetricUnavailable, match=re.escape(str(tmp_path / REALESRGAN_SHARED_PATH))):
        load_realesrgan()
