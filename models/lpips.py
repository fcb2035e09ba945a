"""LPIPS (AlexNet backbone, v0.1 linear heads) as a self-contained module.

The reference implementation (the ``lpips`` package) builds its backbone from torchvision and
downloads ImageNet weights.  This module rebuilds the *same* layer structure without
torchvision, so that a full state dict (backbone + linear heads, e.g. the offline file
``lpips_alex_v0.1_full_state_dict.pth``) loads with ``strict=True``, and so does the one assembled from
the downloaded torchvision AlexNet and the published heads.

State-dict layout (identical to ``lpips.LPIPS(net="alex")``)::

    scaling_layer.shift / .scale            (1, 3, 1, 1) buffers
    net.slice{1..5}.<i>.weight / .bias      torchvision ``alexnet().features[i]`` convs
    lin{0..4}.model.1.weight                (1, C_k, 1, 1), no bias; model.0 is Dropout
    lins.{0..4}.model.1.weight              the same modules again (``lins`` is a ModuleList of lin0..4)

Loading the weights (offline file, else the download) and the [0, 1] convenience wrapper live in
:mod:`fmboost.models.metrics`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

#: Channels of the five AlexNet ReLU outputs that LPIPS compares.
ALEX_CHANNELS = (64, 192, 384, 256, 256)

#: Per-channel input normalisation of LPIPS v0.1, in [-1, 1] units.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] RGB to the backbone's ImageNet-like input statistics: ``(x - shift) / scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class AlexFeatures(nn.Module):
    """torchvision's AlexNet ``features`` split after relu1..relu5 into ``slice1..slice5``.

    Layer indices are kept (``slice2.3`` is ``features[3]``) so the state-dict keys match.
    ``forward`` returns the five ReLU outputs: list of (B, C_k, H_k, W_k), C_k = ``ALEX_CHANNELS``.
    """

    def __init__(self) -> None:
        super().__init__()
        features = [
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
        ]
        bounds = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))
        for k, (start, stop) in enumerate(bounds, start=1):
            layers = OrderedDict((str(i), features[i]) for i in range(start, stop))
            self.add_module(f"slice{k}", nn.Sequential(layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for k in range(1, 6):
            x = getattr(self, f"slice{k}")(x)
            outputs.append(x)
        return outputs


class NetLinLayer(nn.Module):
    """Learned non-negative channel weights of one layer: Dropout, then a bias-free 1x1 conv to 1 channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def _unit_normalize(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scales every spatial feature vector (B, C, H, W) to unit L2 norm along C, as LPIPS does."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 distance with the AlexNet backbone (structure of ``lpips.LPIPS(net="alex")``).

    ``forward(x, y)`` takes two (B, 3, H, W) images in **[-1, 1]** (H, W >= 32) and returns the
    (B,) distances: for each of the five ReLU layers, unit-normalise features along channels,
    square the difference, weight channels with the learned 1x1 head, average over space; then
    sum over layers.  Identical inputs give exactly 0.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = AlexFeatures()
        self.lins = nn.ModuleList(NetLinLayer(c) for c in ALEX_CHANNELS)
        for k, lin in enumerate(self.lins):
            self.add_module(f"lin{k}", lin)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x = self.net(self.scaling_layer(x))
        feats_y = self.net(self.scaling_layer(y))
        distance = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, feats_x, feats_y):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)).pow(2)
            distance = distance + lin.model(diff).mean(dim=(1, 2, 3))
        return distance
