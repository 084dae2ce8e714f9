"""Tests of the KL autoencoder's losses (ddpmkit/models/autoencoder_loss.py) and of its patch discriminator
(ddpmkit/models/discriminator.py): each loss against a closed form on hand-made tensors."""

from __future__ import annotations

import copy
import math
import sys
import textwrap

import pytest
import torch
from torch import nn

from ddpmkit.errors import ConfigError
from ddpmkit.models import autoencoder_loss as L
from ddpmkit.models.discriminator import PatchDiscriminator, min_size, output_size, receptive_field

# ---------------------------------------------------------------------------------------------- the losses


def test_reconstruction_l1_is_the_mean_absolute_error_per_image():
    x = torch.zeros(2, 1, 2, 2)
    r = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    assert torch.allclose(L.reconstruction_l1(x, r), torch.tensor([2.0 / 4, 2.0]))
    with pytest.raises(ValueError):
        L.reconstruction_l1(x, r[:, :, :1])


def test_kl_per_pixel_divides_the_sum_by_the_image_values():
    kl = torch.tensor([3072.0, 30.72])
    assert torch.allclose(L.kl_per_pixel(kl, 3 * 32 * 32), torch.tensor([1.0, 0.01]))
    # the ratio of the terms is LDM's: (sum |x - r| + w * KL) / (C H W) == mean |x - r| + w * KL / (C H W)
    x, r = torch.zeros(2, 3, 32, 32), torch.full((2, 3, 32, 32), 0.25)
    ldm = ((x - r).abs().flatten(1).sum(1) + L.KL_WEIGHT * kl) / (3 * 32 * 32)
    ours = L.reconstruction_l1(x, r) + L.KL_WEIGHT * L.kl_per_pixel(kl, 3 * 32 * 32)
    assert torch.allclose(ldm, ours)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError):
            L.kl_per_pixel(kl, bad)


def test_hinge_loss_known_values():
    two, minus_two = torch.full((4, 1, 3, 3), 2.0), torch.full((4, 1, 3, 3), -2.0)
    assert float(L.hinge_d_loss(two, minus_two)) == 0.0  # both sides beyond the margin
    zeros = torch.zeros(4, 1, 3, 3)
    assert float(L.hinge_d_loss(zeros, zeros)) == pytest.approx(1.0)  # 0.5 * (1 + 1)
    assert float(L.hinge_d_loss(minus_two, two)) == pytest.approx(3.0)  # 0.5 * (3 + 3): fully fooled
    # an independent closed form on mixed logits: 0.5 * (mean max(0, 1 - r) + mean max(0, 1 + f))
    real = torch.tensor([[0.5, 1.5], [-1.0, 3.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[-0.5, -2.0], [0.0, 1.0]]).view(2, 1, 1, 2)
    real_terms, fake_terms = [0.5, 0.0, 2.0, 0.0], [0.5, 0.0, 1.0, 2.0]
    want = 0.5 * (sum(real_terms) / 4 + sum(fake_terms) / 4)
    assert float(L.hinge_d_loss(real, fake)) == pytest.approx(want)
    per = L.hinge_d_loss_per_sample(real, fake)
    assert per.shape == (2,)
    assert per.tolist() == pytest.approx([0.5 * (0.25 + 0.25), 0.5 * (1.0 + 1.5)])
    assert float(per.mean()) == pytest.approx(want)  # equal-size maps: the mean of the per-image losses


def test_generator_loss_is_minus_the_mean_logit():
    logits = torch.tensor([1.0, -3.0, 0.5, 2.5]).view(1, 1, 2, 2)
    assert float(L.generator_loss(logits)) == pytest.approx(-0.25)


def _linear_decoder(seed=0):
    """A one-layer "decoder" recon = W z: d/dW of a loss sum(a * recon) is the outer product a z^T."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 4, generator=g).requires_grad_(True)
    z = torch.randn(4, generator=g)
    x = torch.randn(6, generator=g)
    c = torch.randn(6, generator=g)
    return W, z, x, c


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    W, z, x, c = _linear_decoder()
    recon = W @ z
    rec = (x - recon).abs().mean()  # d/dW = -sign(x - W z) z^T / 6
    g = -(c * recon).mean()  # d/dW = -c z^T / 6
    sign = torch.sign(x - recon.detach())
    rec_norm = sign.norm() * z.norm() / 6  # ||u v^T|| = ||u|| ||v||
    g_norm = c.norm() * z.norm() / 6
    want = rec_norm / (g_norm + 1e-4)
    w = L.adaptive_weight(rec, g, W)
    assert not w.requires_grad and w.shape == ()
    assert float(w) == pytest.approx(float(want), rel=1e-6)
    (rec + w * g).backward()  # the graph was kept for the step's own backward pass
    assert W.grad is not None


def test_adaptive_weight_clamps_and_survives_a_loss_without_the_layer():
    W, z, x, c = _linear_decoder(1)
    recon = W @ z
    rec = (x - recon).abs().mean()
    tiny = 1e-12 * (c * recon).mean()  # a vanishing adversarial gradient: the ratio would be ~1e4 * ||d rec||
    assert float(L.adaptive_weight(rec, tiny, W, max_weight=5.0)) == 5.0
    other = torch.ones(3, requires_grad=True)
    assert float(L.adaptive_weight(rec, (other * 2).sum(), W)) == 0.0  # g does not reach the decoder
    assert float(L.adaptive_weight(rec, torch.tensor(1.0), W)) == 0.0  # g is a constant
    with pytest.raises(ValueError):
        L.adaptive_weight(rec, rec, W.detach())


# ---------------------------------------------------------------------------------------------- perceptual slot
_FACTORIES = '''
import torch
from torch import nn

class Dist(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return (self.proj(x) - self.proj(y)).pow(2).flatten(1).mean(1)

class Scalar(Dist):
    def forward(self, x, y):
        return super().forward(x, y).mean()

def make():
    return Dist()

def make_scalar():
    return Scalar()

def make_plain():
    return lambda x, y: (x - y).abs().flatten(1).mean(1)

def make_broken():
    raise RuntimeError("weights missing\\nsecond line")

NOT_CALLABLE = 3
'''


@pytest.fixture
def factories(tmp_path, monkeypatch):
    name = "ddpmkit_test_perceptual_factories"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(_FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_load_perceptual_freezes_a_user_network(factories):
    net = L.load_perceptual(f"{factories}:make")
    assert not net.training
    assert all(not p.requires_grad for p in net.parameters())
    x = torch.zeros(3, 3, 8, 8, requires_grad=True)
    d = net(x, torch.ones(3, 3, 8, 8))
    assert d.shape == (3,)
    d.sum().backward()  # frozen weights, but the distance still carries a gradient to the images
    assert x.grad is not None


@pytest.mark.parametrize("spec, words", [
    ("no_colon", "package.module:factory"),
    ("a:b:c", "package.module:factory"),
    ("ddpmkit_no_such_module_xyz:make", "cannot import"),
    ("{m}:missing", "has no missing"),
    ("{m}:NOT_CALLABLE", "not callable"),
    ("{m}:make_plain", "not an nn.Module"),
    ("{m}:make_scalar", "one distance per image"),
    ("{m}:make_broken", "make_broken() failed"),
])
def test_load_perceptual_refuses_in_one_line(factories, spec, words):
    with pytest.raises(ConfigError) as e:
        L.load_perceptual(spec.format(m=factories))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_load_perceptual_tries_the_data_shape(factories):
    with pytest.raises(ConfigError, match="1x16x16 images"):  # an RGB network on grey images fails at load time
        L.load_perceptual(f"{factories}:make", image_shape=(1, 16, 16))


# ---------------------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("size, layers", [(32, 3), (24, 3), (64, 3), (16, 2), (12, 2), (8, 1), (48, 4)])
def test_discriminator_output_shapes(size, layers):
    d = PatchDiscriminator(in_channels=1, channels=8, layers=layers)
    out = d(torch.zeros(2, 1, size, size + 8))
    side = lambda s: s // 2 ** layers - 2  # noqa: E731  floor(s / 2^L) - 2, the module note's closed form
    assert out.shape == (2, 1, side(size), side(size + 8))
    assert output_size(size, layers) == side(size) >= 1


def test_discriminator_geometry_of_pix2pix():
    assert [receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]  # the 70x70 PatchGAN at three layers
    assert [min_size(n) for n in (1, 2, 3)] == [6, 12, 24]
    d = PatchDiscriminator()
    widths = [m.out_channels for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 128, 256, 512, 1]
    assert PatchDiscriminator(channels=8, layers=5).config == {"in_channels": 3, "channels": 8, "layers": 5}
    assert [m.out_channels for m in PatchDiscriminator(channels=8, layers=5).modules()
            if isinstance(m, nn.Conv2d)] == [8, 16, 32, 64, 64, 64, 1]  # capped at 8x


def test_discriminator_refuses_too_small_images():
    d = PatchDiscriminator(in_channels=1, channels=8, layers=2)
    with pytest.raises(ConfigError) as e:
        d(torch.zeros(1, 1, 8, 8))
    assert str(e.value) == ("PatchDiscriminator with layers=2 needs images of at least 12x12, got 8x8 "
                            "(layers=1 fits them)")
    with pytest.raises(ConfigError, match="at least 24x24, got 32x23"):
        PatchDiscriminator(layers=3)(torch.zeros(1, 3, 32, 23))
    with pytest.raises(ConfigError, match=r"reads \[B, 1, H, W\]"):
        d(torch.zeros(1, 3, 16, 16))
    for bad in (dict(layers=0), dict(channels=0), dict(in_channels=2.0)):
        with pytest.raises(ConfigError):
            PatchDiscriminator(**bad)


def test_discriminator_init_and_config():
    torch.manual_seed(0)
    d = PatchDiscriminator(channels=64, layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(float(w.mean())) < 1e-3 and float(w.std()) == pytest.approx(0.02, rel=0.01)
    g = torch.cat([n.weight.detach() for n in norms])
    assert float(g.mean()) == pytest.approx(1.0, abs=0.005) and float(g.std()) == pytest.approx(0.02, rel=0.15)
    biases = [m.bias.detach() for m in d.modules() if getattr(m, "bias", None) is not None]
    assert biases and all(float(b.abs().max()) == 0.0 for b in biases)
    torch.manual_seed(0)
    again = PatchDiscriminator.from_config(d.config)
    assert all(torch.equal(a, b) for a, b in zip(d.state_dict().values(), again.state_dict().values()))
    assert d.num_parameters() == sum(p.numel() for p in d.parameters())
    with pytest.raises(ConfigError, match="unknown PatchDiscriminator config key"):
        PatchDiscriminator.from_config({**d.config, "norm": "batch"})


def test_discriminator_logit_sees_only_its_patch_through_the_convolutions():
    """Output (0, 0) depends on input rows and columns -p .. rf - 1 - p only, p the paddings seen back from the output
    (1 per conv, times the stride product before it). The GroupNorms are swapped for identities here: their
    statistics are taken over the whole image, so with them every logit also depends on every pixel that way."""
    torch.manual_seed(0)
    layers = 2
    d = copy.deepcopy(PatchDiscriminator(in_channels=1, channels=8, layers=layers))
    d.main = nn.Sequential(*[nn.Identity() if isinstance(m, nn.GroupNorm) else m for m in d.main])
    for m in d.main:  # without the norms, N(0, 0.02) weights shrink the signal to nothing: use a scale that keeps it
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=0.2)
    rf = receptive_field(layers)
    pad = sum(2 ** min(k, layers) for k in range(layers + 2))  # 1 + 2 + 4 + 4: paddings times jumps
    last = rf - 1 - pad  # the last input row (and column) of output (0, 0)'s patch: 22
    x = torch.randn(1, 1, 48, 48)
    base = d(x)
    far = x.clone()
    far[..., last + 1:, :] = torch.randn_like(far[..., last + 1:, :])
    far[..., :, last + 1:] = torch.randn_like(far[..., :, last + 1:])
    assert torch.allclose(d(far)[..., 0, 0], base[..., 0, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(d(far), base)  # the logits whose patches were touched did change
    near = x.clone()
    near[..., last, last] += 1.0  # the patch's far corner
    assert not torch.allclose(d(near)[..., 0, 0], base[..., 0, 0], atol=1e-6, rtol=0)
    assert math.isclose(rf, 34)
