"""Tests of the DDPM U-Net: size, shapes, embedding, gradients, dropout, attention, configs, formats, files."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from ddpmkit.errors import ConfigError
from ddpmkit.diffusion import NoiseSchedule
from ddpmkit.models import UNET_PRESETS, UNet, timestep_embedding, unet_from_preset
from ddpmkit.models.unet import AttnBlock



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models here are tiny: one thread runs them as fast as two, and stays fast on a busy machine
    (several OpenMP threads competing with other processes for few cores can be 10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A small configuration that still has every kind of part: skip 1x1 convs, attention, up/down sampling.
TINY = dict(image_size=16, in_channels=3, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(8,), dropout=0.0, num_groups=4, num_heads=2)


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values, so that zero-initialised layers do not hide anything."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_scale else 0.0))
    return model


def _inputs(model: UNet, batch: int = 2, size: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = size or model.config["image_size"]
    x = torch.randn(batch, model.config["in_channels"], s, s, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ----------------------------------------------------------------------------- size and shapes
def test_cifar10_parameter_count_is_the_papers():
    model = UNet(image_size=32, in_channels=3)
    assert sum(p.numel() for p in model.parameters()) == 35_746_307
    assert model.num_parameters() == 35_746_307
    assert unet_from_preset("cifar10").num_parameters() == 35_746_307
    assert list(model.buffers()) == []  # nothing but parameters in the state


@pytest.mark.parametrize(
    "kw, size, out_ch",
    [
        (dict(TINY), 16, 3),
        (dict(TINY, out_channels=6), 16, 6),
        (dict(TINY, in_channels=1), 16, 1),
        (dict(TINY, image_size=8, channel_mults=(1, 2), attention_resolutions=(4,)), 8, 3),
        (dict(TINY, image_size=12, channel_mults=(1, 1, 2), attention_resolutions=()), 12, 3),
        (dict(TINY, channel_mults=(1,), attention_resolutions=(16,)), 16, 3),
        (dict(TINY, num_res_blocks=2, channel_mults=(1, 2, 3, 4), attention_resolutions=(16, 2)), 16, 3),
        (dict(TINY), 32, 3),  # another size divisible by 4 runs too
    ],
)
def test_output_shapes(kw, size, out_ch):
    model = UNet(**kw).eval()
    x, t = _inputs(model, batch=3, size=size)
    with torch.no_grad():
        y = model(x, t)
    assert y.shape == (3, out_ch, size, size)
    assert y.dtype == torch.float32


def test_bad_input_shapes_are_rejected():
    model = UNet(**TINY)
    with pytest.raises(ValueError):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2, dtype=torch.long))  # wrong channel count
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 18, 18), torch.zeros(2, dtype=torch.long))  # 18 not divisible by 4
    with pytest.raises(ValueError):
        model(torch.randn(2, 3, 16, 16), torch.zeros(3, dtype=torch.long))  # t of the wrong length


def test_class_labels_have_a_place_but_no_embedding_yet():
    # forward(x, t, y): the place for class labels; this U-Net is unconditional, so a y is a clear error
    model = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), num_groups=4).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    assert torch.equal(model(x, t), model(x, t, None))
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- time embedding
def test_timestep_embedding_closed_form():
    # dim=4: half=2, freqs = exp(-ln(1e4) * k / 1) for k=0,1 = [1, 1e-4]; sines first, then cosines.
    e = timestep_embedding(torch.tensor([1]), 4)
    expected = [math.sin(1.0), math.sin(1e-4), math.cos(1.0), math.cos(1e-4)]
    assert e.shape == (1, 4)
    assert e[0].tolist() == pytest.approx(expected, abs=1e-6)

    # dim=6, t=3: half=3, freqs = 10000^(-k/2) = [1, 0.01, 1e-4]
    e = timestep_embedding(torch.tensor([0, 3]), 6)
    assert e[0].tolist() == pytest.approx([0, 0, 0, 1, 1, 1], abs=1e-7)
    expected = [math.sin(3), math.sin(0.03), math.sin(3e-4), math.cos(3), math.cos(0.03), math.cos(3e-4)]
    assert e[1].tolist() == pytest.approx(expected, abs=1e-6)

    # odd width: zero-padded by one column
    e = timestep_embedding(torch.tensor([5]), 7)
    assert e.shape == (1, 7) and e[0, -1] == 0


def test_timestep_embedding_large_t_and_width():
    t = torch.tensor([999])
    e = timestep_embedding(t, 128)
    k = torch.arange(64, dtype=torch.float64)
    args = 999.0 * torch.exp(-math.log(10000.0) * k / 63)
    ref = torch.cat([torch.sin(args), torch.cos(args)])
    assert torch.allclose(e[0].double(), ref, atol=1e-4)


def test_timestep_embedding_other_conventions():
    # freq_shift=0: freqs = exp(-ln(1e4) k / half); dim 4, t=1 -> freqs [1, 0.01]; flip puts the cosines first
    e = timestep_embedding(torch.tensor([1]), 4, flip_sin_to_cos=True, freq_shift=0.0)
    assert e[0].tolist() == pytest.approx([math.cos(1.0), math.cos(0.01), math.sin(1.0), math.sin(0.01)], abs=1e-6)
    with pytest.raises(ValueError, match="freq_shift"):
        timestep_embedding(torch.tensor([1]), 4, freq_shift=2.0)


def test_asymmetric_downsample_pads_bottom_right_only():
    # TF 'SAME' for a stride-2 3x3 conv on an even side: output pixel (i, j) reads input rows 2i..2i+2 and
    # columns 2j..2j+2, zero beyond the bottom/right edge; symmetric padding reads rows 2i-1..2i+1 instead
    torch.manual_seed(0)
    model = UNet(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
                 num_groups=4, downsample_padding="asymmetric")
    with torch.no_grad():  # the zero-initialised output convs would hide any difference
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    down = next(m for m in model.down if type(m).__name__ == "Downsample")
    x = torch.randn(1, 8, 8, 8)
    w, b = down.conv.weight, down.conv.bias
    xp = torch.zeros(1, 8, 9, 9)
    xp[:, :, :8, :8] = x
    ref = torch.empty(1, 8, 4, 4)
    for i in range(4):
        for j in range(4):
            patch = xp[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref[0, :, i, j] = (w * patch).sum(dim=(1, 2, 3)) + b
    assert torch.allclose(down(x), ref, atol=1e-5)
    sym = UNet(**{**model.config, "downsample_padding": "symmetric"})
    sym.load_state_dict(model.state_dict())  # the same parameters, a different model
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(sym(x, torch.tensor([5, 9])), model(x, torch.tensor([5, 9])))


def test_float_and_scalar_timesteps_match_integer_ones():
    model = _randomise(UNet(**TINY)).eval()
    x, t = _inputs(model)
    with torch.no_grad():
        a = model(x, t)
        b = model(x, t.float())
        c = model(x[:1], int(t[0]))
    assert torch.equal(a, b)
    assert torch.allclose(a[:1], c, atol=1e-5)  # batch size changes the summation order slightly


# ----------------------------------------------------------------------------- training behaviour
def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(**TINY).train()
    x, t = _inputs(model, batch=4)
    eps = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The zero-initialised layers (output conv, each ResBlock's last conv, attention output projections)
    # block the gradient of what lies before them until they have moved: at the first step only
    # conv_out gets a gradient, and it takes two optimizer steps for every parameter to get one.
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        loss = (model(x, t) - eps).pow(2).mean()
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
        if step == 0:
            assert model.conv_out.weight.grad.abs().sum() > 0
        if step < 2:
            opt.step()
    zero = [name for name, p in model.named_parameters() if p.grad.abs().sum() == 0]
    assert zero == []


def test_dropout_only_in_train_mode():
    model = _randomise(UNet(**dict(TINY, dropout=0.3)))
    x, t = _inputs(model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x, t), model(x, t))
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model(x, t), model(x, t))
    # without dropout, train mode is deterministic too (GroupNorm has no running statistics)
    model0 = _randomise(UNet(**TINY)).train()
    with torch.no_grad():
        assert torch.equal(model0(x, t), model0(x, t))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(), dropout=0.0, num_groups=4).train()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    ab = NoiseSchedule.linear(1000).alpha_bar[t].view(-1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # DDPM eq. 4, closed-form q(x_t | x_0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(120):
        loss = (model(xt, t) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# ----------------------------------------------------------------------------- attention placement
def _attention_sides(model: UNet, size: int) -> list[int]:
    sides = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sides.append(inp[0].shape[-1]))
             for m in model.modules() if isinstance(m, AttnBlock)]
    x, t = _inputs(model, batch=1, size=size)
    with torch.no_grad():
        model(x, t)
    for h in hooks:
        h.remove()
    return sides


def test_attention_runs_at_the_configured_resolutions():
    # CIFAR-10 layout (narrow): 2 down blocks and 3 up blocks at 16, plus the middle at 4.
    model = UNet(32, base_channels=8, num_groups=4).eval()
    sides = _attention_sides(model, 32)
    assert sorted(sides) == [4, 16, 16, 16, 16, 16]
    assert sides == [16, 16, 4, 16, 16, 16]  # in execution order: down, middle, up

    model = UNet(32, base_channels=8, num_groups=4, attention_resolutions=(32, 8), num_res_blocks=1).eval()
    sides = _attention_sides(model, 32)
    assert sides == [32, 8, 4, 8, 8, 32, 32]

    model = UNet(32, base_channels=8, num_groups=4, attention_resolutions=()).eval()
    assert _attention_sides(model, 32) == [4]  # the middle always has attention


def test_attention_heads():
    model = UNet(**dict(TINY, num_heads=4))
    assert {m.num_heads for m in model.modules() if isinstance(m, AttnBlock)} == {4}
    # one head with width C equals the official single-head block: check it against a plain computation
    attn = _randomise(AttnBlock(8, num_heads=2, num_groups=2))
    x = torch.randn(2, 8, 3, 3)
    h = attn.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = (h @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    outs = []
    for head in range(2):
        sl = slice(4 * head, 4 * head + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / 2.0, dim=-1)  # 1/sqrt(d), d=4
        outs.append(w @ v[..., sl])
    o = torch.cat(outs, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    ref = x + o.transpose(1, 2).reshape(2, 8, 3, 3)
    assert torch.allclose(attn(x), ref, atol=1e-5)


# ----------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "kw, fragment",
    [
        (dict(image_size=30), "divisible"),
        (dict(image_size=0), "image_size"),
        (dict(base_channels=48), "num_groups"),
        (dict(num_groups=0), "num_groups"),
        (dict(attention_resolutions=(12,)), "never occurs"),
        (dict(attention_resolutions=(64,)), "never occurs"),
        (dict(num_heads=3), "num_heads"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(channel_mults=(1, 0)), "channel_mults"),
        (dict(channel_mults="12"), "channel_mults"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(dropout="0.1"), "dropout"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=2.5), "out_channels"),
        (dict(image_size=True), "image_size"),
        (dict(base_channels=2, num_groups=1), "base_channels"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(downsample_padding="same"), "downsample_padding"),
        (dict(flip_sin_to_cos=1), "flip_sin_to_cos"),
        (dict(freq_shift=32), "freq_shift"),
    ],
)
def test_bad_configs_raise_config_error(kw, fragment):
    args = dict(image_size=32, base_channels=64)
    args.update(kw)
    with pytest.raises(ConfigError, match=fragment) as info:
        UNet(**args)
    assert "\n" not in str(info.value)


def test_config_round_trips_through_json():
    model = UNet(**TINY)
    cfg = json.loads(json.dumps(model.config))
    assert cfg == model.config
    assert cfg["out_channels"] == 3 and cfg["channel_mults"] == [1, 2, 2]
    again = UNet.from_config(cfg)
    assert again.config == model.config
    with pytest.raises(ConfigError, match="unknown"):
        UNet.from_config({**cfg, "resamp_with_conv": True})
    with pytest.raises(ConfigError, match="image_size"):
        UNet.from_config({k: v for k, v in cfg.items() if k != "image_size"})


def test_presets():
    for name, kw in UNET_PRESETS.items():
        assert set(kw) == set(UNet(**kw).config), name  # every constructor argument is spelled out
        json.dumps(kw)
    # the constructor's defaults are the paper's CIFAR-10 model, and the cifar10 preset is derived from them
    assert UNET_PRESETS["cifar10"] == UNet(image_size=32).config
    assert UNET_PRESETS["digits"]["base_channels"] == 32 and UNET_PRESETS["digits"]["channel_mults"] == [1, 2]
    digits = unet_from_preset("digits")
    assert digits.config["image_size"] == 8 and digits.config["in_channels"] == 1
    assert unet_from_preset("digits", dropout=0.2).config["dropout"] == 0.2
    with pytest.raises(ConfigError, match="unknown UNet preset"):
        unet_from_preset("imagenet")
    with pytest.raises(ConfigError, match="unknown"):
        unet_from_preset("digits", widht=3)


# ----------------------------------------------------------------------------- formats and files
def test_channels_last_gives_the_same_result():
    model = _randomise(UNet(**TINY)).eval()
    x, t = _inputs(model, batch=3)
    with torch.no_grad():
        ref = model(x, t)
        y1 = model(x.contiguous(memory_format=torch.channels_last), t)
        model_cl = model.to(memory_format=torch.channels_last)
        y2 = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    assert torch.allclose(ref, y1, atol=1e-5)
    assert torch.allclose(ref, y2, atol=1e-5)
    assert y2.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_gradients_match():
    model = _randomise(UNet(**TINY)).train()
    x, t = _inputs(model, batch=2)
    model(x, t).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model = model.to(memory_format=torch.channels_last)
    model(x.contiguous(memory_format=torch.channels_last), t).square().mean().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-5), n


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _randomise(UNet(**TINY)).eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    (tmp_path / "config.json").write_text(json.dumps(model.config))
    again = UNet.from_config(json.loads((tmp_path / "config.json").read_text())).eval()
    again.load_state_dict(load_file(str(path)))
    x, t = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model(x, t), again(x, t))
    # channels_last weights save too (safetensors wants contiguous tensors; state_dict gives views)
    cl = model.to(memory_format=torch.channels_last)
    save_file({k: v.contiguous() for k, v in cl.state_dict().items()}, str(tmp_path / "cl.safetensors"))
