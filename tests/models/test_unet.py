import pytest
import torch
from fmboost.models import PRESETS, CFMUNet


def test_shapes_and_conditioning_is_used(generator):
    net = CFMUNet.from_preset("tiny", latent_channels=4).eval()
    x = torch.randn(2, 4, 16, 24, generator=generator)
    cond = torch.randn(2, 4, 16, 24, generator=generator)
    out = net(x, torch.tensor([0.1, 0.9]), cond)
    assert out.shape == x.shape
    assert not torch.allclose(out, net(x, torch.tensor([0.1, 0.9]), torch.zeros_like(cond)))
    assert not torch.allclose(out, net(x, 0.5, cond))  # time is used


def test_bad_inputs_name_the_argument():
    net = CFMUNet.from_preset("tiny", latent_channels=4)
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match="x_t must be"):
        net(torch.zeros(1, 3, 16, 16), 0.5, torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="cond must"):
        net(x, 0.5, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="divisible by 2"):
        net(torch.zeros(1, 4, 15, 16), 0.5, torch.zeros(1, 4, 15, 16))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        net(x, 1.5, x)
    with pytest.raises(ValueError, match="preset must be one of"):
        CFMUNet.from_preset("huge")
    with pytest.raises(ValueError, match="attention_levels"):
        CFMUNet(latent_channels=4, block_out_channels=(16, 32), attention_levels=(False,), norm_num_groups=8)


def test_reference_preset_is_the_paper_size():
    with torch.device("meta"):
        net = CFMUNet.from_preset("reference", latent_channels=4)
    n = sum(p.numel() for p in net.parameters())
    assert 300e6 < n < 330e6, n  # ADM reference ≈ 306 M; diffusers blocks give 323 M
    assert net.unet.config.in_channels == 8 and net.unet.config.out_channels == 4
    assert [type(b).__name__ for b in net.unet.down_blocks][-1] == "AttnDownBlock2D"
    assert set(PRESETS) >= {"reference", "small", "tiny"}


def test_gradient_checkpointing_gives_the_same_gradients(generator):
    net = CFMUNet.from_preset("tiny", latent_channels=4).train()
    x = torch.randn(2, 4, 16, 16, generator=generator)

    def grads():
        net.zero_grad()
        net(x, torch.tensor([0.2, 0.7]), x).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    net.enable_gradient_checkpointing()
    assert net.is_gradient_checkpointing
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)


def test_save_pretrained_round_trip(tmp_path, generator):
    net = CFMUNet.from_preset("tiny", latent_channels=3).eval()
    net.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = CFMUNet.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 8, 8, generator=generator)
    torch.testing.assert_close(net(x, 0.3, x), loaded(x, 0.3, x))
    assert list(loaded.config.block_out_channels) == list(net.config.block_out_channels)
