import pytest
import torch

from fm.ema import EMA
from fm.models import MLP, UNet, build_model


def test_unet_shapes_and_conditioning():
    model = UNet(
        image_size=8,
        in_channels=1,
        model_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.1,
        num_heads=2,
        num_classes=10,
    ).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    # zero-initialised output: a fresh model predicts 0; perturb so the class embedding matters
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    for block in model.modules():
        if hasattr(block, "conv2"):
            torch.nn.init.normal_(block.conv2.weight, std=0.1)
    out_y = model(x, t, torch.tensor([1, 2, 3]))
    out_null = model(x, t, None)
    assert out_y.shape == x.shape
    assert not torch.allclose(out_y, out_null)
    torch.testing.assert_close(model(x, t, torch.full((3,), 10)), out_null)  # index 10 is the null class
    # samples do not interact: a sub-batch gives the same outputs. Compared in float64, where the claim is exact up to
    # rounding: in float32 the kernels a CPU picks for a batch of 1 and of 3 differ (AVX2 vs AVX-512) by ~3e-6.
    model, x, t = model.double(), x.double(), t.double()
    torch.testing.assert_close(model(x[:1], t[:1], None), model(x, t, None)[:1], rtol=0, atol=1e-12)


def test_unet_cifar_size_and_grad():
    model = UNet(
        image_size=32,
        in_channels=3,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
    )
    x = torch.randn(2, 3, 32, 32)
    out = model(x, torch.rand(2))
    out.sum().backward()
    assert out.shape == x.shape
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_build_model_from_json_like_kwargs():
    model = build_model(
        "unet",
        image_size=8,
        in_channels=1,
        model_channels=8,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        num_heads=1,
    )
    assert isinstance(model, UNet)
    assert isinstance(build_model("mlp", dim=3), MLP)
    with pytest.raises(ValueError, match="unknown model .resnet.; allowed: mlp, unet, gaussian_ot"):
        build_model("resnet")
    with pytest.raises(ValueError, match="bad arguments for model 'mlp'"):
        build_model("mlp", width=3)
    with pytest.raises(ValueError, match="image_size 10 must be divisible by"):
        UNet(image_size=10, channel_mult=(1, 2, 2))


def test_bad_model_input():
    model = UNet(
        image_size=8,
        in_channels=1,
        model_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        num_classes=3,
    )
    with pytest.raises(ValueError, match=r"UNet expects \[B, 1, 8, 8\]; got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[2\]"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\]"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 7]))


def test_ema_tracks_the_average():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = EMA(model, decay=0.5, warmup=False)
    for value in (1.0, 1.0, 1.0):
        with torch.no_grad():
            model.weight.fill_(value)
        ema.update(model)
    # 0 -> 0.5 -> 0.75 -> 0.875
    torch.testing.assert_close(ema.module.weight, torch.full((1, 2), 0.875))
    restored = EMA(model, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.module.weight, ema.module.weight)
    assert restored.num_updates == 3
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(model, decay=1.0)
