"""End-to-end learning check on real photos (pixel space, PSU = bicubic coupling): no mocks.

A small CFMUNet trained for a few hundred CPU steps must (1) lower its loss clearly, (2) produce Euler
samples on held-out crops that are closer to the targets than the source x0 is, and the regression
objective on the same data must beat bilinear up-sampling in PSNR.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fmboost.models import CFMUNet, CouplingFlowMatcher, IdentityAutoencoder
from fmboost.train.sample_photos import load_sample_photos

CROP, SCALE, STEPS, BATCH = 32, 4, 200, 16


def random_crops(image, count, generator):
    """(count, 3, CROP, CROP) crops in [-1, 1] of a PIL image shown at half size (less JPEG noise)."""
    image = image.resize((image.width // 2, image.height // 2), resample=3)
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1
    tops = torch.randint(0, x.shape[1] - CROP + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, x.shape[2] - CROP + 1, (count,), generator=generator).tolist()
    return torch.stack([x[:, i:i + CROP, j:j + CROP] for i, j in zip(tops, lefts)])


def low_res(x):
    return F.interpolate(x, scale_factor=1 / SCALE, mode="bicubic", antialias=True).clamp(-1, 1)


def psnr(a, b):
    return 10 * torch.log10(4 / ((a.clamp(-1, 1) - b) ** 2).mean()).item()


@pytest.fixture(scope="module")
def crops():
    generator = torch.Generator().manual_seed(0)
    photos = load_sample_photos()
    held_out = photos.pop("china")
    train = torch.cat([random_crops(photo, 48, generator) for photo in photos.values()])
    return train, random_crops(held_out, 32, generator)


def train(objective, train_crops):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    fm, first_stage = CouplingFlowMatcher(objective=objective), IdentityAutoencoder()
    net = CFMUNet.from_preset("tiny", latent_channels=3)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(STEPS):
        x1 = train_crops[torch.randint(0, len(train_crops), (BATCH,), generator=generator)]
        cond = fm.condition(None, (CROP, CROP), first_stage, lr_image=low_res(x1))
        loss = fm.loss(net, x1, cond, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return fm, net.eval(), losses


def test_cfm_learns_super_resolution_on_real_photos(crops):
    train_crops, test_crops = crops
    fm, net, losses = train("cfm", train_crops)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20]), (losses[:20], losses[-20:])
    cond = fm.condition(None, (CROP, CROP), IdentityAutoencoder(), lr_image=low_res(test_crops))
    result = fm.sample(net, cond, generator=torch.Generator().manual_seed(2), num_steps=8)
    x0 = fm.couple(cond, generator=torch.Generator().manual_seed(2)).x0
    assert result.nfe == 8
    assert F.mse_loss(result.x1, test_crops) < 0.5 * F.mse_loss(x0, test_crops)


def test_regression_baseline_beats_bilinear(crops):
    train_crops, test_crops = crops
    fm, net, _ = train("regression", train_crops)
    lr = low_res(test_crops)
    with torch.no_grad():
        prediction = fm.sample(net, fm.condition(None, (CROP, CROP), IdentityAutoencoder(), lr_image=lr)).x1
    bilinear = F.interpolate(lr, size=(CROP, CROP), mode="bilinear", align_corners=False)
    assert psnr(prediction, test_crops) > psnr(bilinear, test_crops) + 0.2
