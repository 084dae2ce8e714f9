"""The KL autoencoder of latent diffusion: its posterior against closed forms computed another way, its shapes,
its configuration checks, and the size limits of an autoencoder config."""

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ddpmkit.errors import CheckpointError, ConfigError
from ddpmkit.limits import MAX_PARAMETERS, check_autoencoder_config
from ddpmkit.models import AUTOENCODER_PRESETS, AutoencoderKL, DiagonalGaussian, autoencoder_from_preset

SMALL = dict(in_channels=3, block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8)


def _moments(B=3, C=4, h=5, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(B, C, h, w, generator=g)
    logvar = 0.8 * torch.randn(B, C, h, w, generator=g) - 0.5
    return torch.cat([mean, logvar], dim=1), mean, logvar


def test_kl_matches_the_closed_form_of_torch_distributions():
    moments, mean, logvar = _moments()
    post = DiagonalGaussian(moments)
    q = Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = Normal(torch.zeros_like(mean, dtype=torch.float64), torch.ones_like(mean, dtype=torch.float64))
    expected = kl_divergence(q, p).sum(dim=(1, 2, 3))
    assert post.kl().shape == (3,)
    torch.testing.assert_close(post.kl().double(), expected, rtol=1e-5, atol=1e-5)
    # the standard normal itself is at KL 0
    assert DiagonalGaussian(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_the_posterior_splits_its_moments_and_clamps_the_log_variance():
    moments, mean, logvar = _moments()
    post = DiagonalGaussian(moments)
    assert torch.equal(post.mean, mean) and torch.equal(post.mode(), mean) and torch.equal(post.logvar, logvar)
    torch.testing.assert_close(post.var, logvar.exp())
    torch.testing.assert_close(post.std, (0.5 * logvar).exp())
    wild = DiagonalGaussian(torch.cat([mean, torch.full_like(mean, 100.0)], 1))
    assert wild.logvar.max() == 20.0 and torch.isfinite(wild.var).all()
    assert DiagonalGaussian(torch.cat([mean, torch.full_like(mean, -100.0)], 1)).logvar.min() == -30.0
    with pytest.raises(ValueError):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_a_sample_is_the_mean_plus_std_times_the_generators_noise():
    moments, mean, logvar = _moments()
    post = DiagonalGaussian(moments)
    z = post.sample(torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, mean + (0.5 * logvar).exp() * eps)
    assert torch.equal(z, post.sample(torch.Generator().manual_seed(7)))  # repeatable
    assert not torch.equal(z, post.sample(torch.Generator().manual_seed(8)))


def test_samples_have_the_posteriors_mean_and_std():
    moments, mean, logvar = _moments(B=1, C=2, h=2, w=2)
    post = DiagonalGaussian(moments)
    g = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.stack([post.sample(g) for _ in range(n)])  # [n, 1, 2, 2, 2]
    std = (0.5 * logvar).exp()
    # the standard error of a mean of n draws is std / sqrt(n); 5 of them bound it
    assert ((draws.mean(0) - mean).abs() < 5 * std / n ** 0.5).all()
    assert ((draws.std(0) / std - 1).abs() < 0.05).all()


@pytest.mark.parametrize("widths,size", [([8], 12), ([8, 16], 16), ([8, 16, 16], 32), ([8, 8, 16, 16], 32)])
def test_shapes_and_factor(widths, size):
    m = AutoencoderKL(in_channels=2, out_channels=3, block_out_channels=widths, layers_per_block=1,
                      latent_channels=3, norm_num_groups=4, image_size=size).eval()
    f = 2 ** (len(widths) - 1)
    assert m.factor == f and m.latent_channels == 3
    assert m.latent_shape() == m.latent_shape(size) == (3, size // f, size // f)
    assert m.latent_shape((size, 2 * size)) == (3, size // f, 2 * size // f)
    x = torch.randn(2, 2, size, size)
    with torch.no_grad():
        post = m.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 3, size // f, size // f)
        assert m.decode(post.mean).shape == (2, 3, size, size)
        rec, post2 = m(x)
    assert rec.shape == (2, 3, size, size) and torch.equal(post2.mean, post.mean)


def test_an_f1_autoencoder_keeps_the_size():
    m = AutoencoderKL(block_out_channels=[8], layers_per_block=1, norm_num_groups=4, mid_attention=False)
    assert m.factor == 1 and not any("downsamplers" in k or "attentions" in k for k in m.state_dict())
    with torch.no_grad():
        assert m.encode(torch.randn(1, 3, 7, 9)).mean.shape == (1, 4, 7, 9)


def test_options_remove_their_layers():
    m = AutoencoderKL(**SMALL, mid_attention=False, use_quant_conv=False, use_post_quant_conv=False)
    assert m.quant_conv is None and m.post_quant_conv is None
    assert not any("attentions" in k for k in m.state_dict())
    with torch.no_grad():
        rec, post = m(torch.randn(1, 3, 8, 8))
    assert rec.shape == (1, 3, 8, 8)


def test_sampling_the_posterior_in_forward_uses_the_generator():
    m = AutoencoderKL(**SMALL).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a, post = m(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        b, _ = m(x, sample_posterior=True, generator=torch.Generator().manual_seed(3))
        c, _ = m(x)
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.testing.assert_close(a, m.decode(post.sample(torch.Generator().manual_seed(3))))


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    m = AutoencoderKL(**SMALL).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        rec, post = m(x)
        m2 = m.to(memory_format=torch.channels_last)
        rec2, post2 = m2(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(rec2, rec, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(post2.mean, post.mean, atol=1e-5, rtol=1e-5)


def test_last_layer_is_the_decoders_output_conv_and_gets_gradients():
    m = AutoencoderKL(**SMALL)
    assert m.last_layer is m.decoder.conv_out.weight
    rec, post = m(torch.randn(1, 3, 8, 8), sample_posterior=True)
    (grad,) = torch.autograd.grad(rec.square().mean() + 1e-6 * post.kl().sum(), m.last_layer)
    assert grad.shape == m.last_layer.shape and grad.abs().sum() > 0


def test_config_round_trip_and_presets():
    m = AutoencoderKL(**SMALL, image_size=16)
    cfg = m.config
    assert cfg == {**SMALL, "out_channels": 3, "mid_attention": True, "use_quant_conv": True,
                   "use_post_quant_conv": True, "image_size": 16}
    assert type(cfg["block_out_channels"]) is list
    assert AutoencoderKL.from_config(cfg).config == cfg
    sd = AUTOENCODER_PRESETS["sd"]
    assert sd["block_out_channels"] == [128, 256, 512, 512] and sd["image_size"] == 512
    with torch.device("meta"):
        assert AutoencoderKL.from_config(sd).num_parameters() == 83_653_863  # the Stable Diffusion VAE's size
    digits = autoencoder_from_preset("digits")
    assert digits.factor == 4 and digits.latent_shape() == (4, 8, 8) and digits.config["in_channels"] == 1
    with pytest.raises(ConfigError, match="unknown autoencoder preset"):
        autoencoder_from_preset("nope")


@pytest.mark.parametrize("change,fragment", [
    (dict(block_out_channels=[]), "must not be empty"),
    (dict(block_out_channels=[16, 30]), "not divisible by norm_num_groups=8"),
    (dict(block_out_channels="16"), "list of integers"),
    (dict(layers_per_block=0), "layers_per_block must be an integer >= 1"),
    (dict(latent_channels=2.5), "latent_channels"),
    (dict(in_channels=True), "in_channels"),
    (dict(mid_attention="yes"), "mid_attention must be true or false"),
    (dict(image_size=0), "image_size"),
    (dict(attention=True), "unknown AutoencoderKL config key"),
])
def test_a_wrong_config_is_one_config_error_line(change, fragment):
    with pytest.raises(ConfigError) as e:
        AutoencoderKL.from_config({**SMALL, **change})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_latent_shape_refuses_a_size_that_does_not_divide():
    m = AutoencoderKL(**SMALL)
    with pytest.raises(ConfigError, match="divisible by 2"):
        m.latent_shape(15)
    with pytest.raises(ConfigError, match="no image_size"):
        m.latent_shape()


def test_check_autoencoder_config_counts_and_refuses():
    cfg = AutoencoderKL(**SMALL).config
    assert check_autoencoder_config(cfg, "here") == AutoencoderKL(**SMALL).num_parameters()
    with pytest.raises(CheckpointError, match="here: layers_per_block must be an integer in"):
        check_autoencoder_config({**cfg, "layers_per_block": 10**9}, "here", CheckpointError)
    with pytest.raises(ConfigError, match="block_out_channels must be a list of at most 16"):
        check_autoencoder_config({**cfg, "block_out_channels": [8] * 17}, "here")
    with pytest.raises(ConfigError, match="each of block_out_channels"):
        check_autoencoder_config({**cfg, "block_out_channels": [8, 10**6]}, "here")
    with pytest.raises(CheckpointError, match="does not describe a valid autoencoder: .*divisible"):
        check_autoencoder_config({**cfg, "norm_num_groups": 7}, "here", CheckpointError)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        check_autoencoder_config([1], "here")
    # within every per-number range, too many parameters in all: refused without allocating them
    huge = {**cfg, "block_out_channels": [8192] * 4, "layers_per_block": 8, "norm_num_groups": 32}
    with pytest.raises(ConfigError, match=f"more than the {MAX_PARAMETERS:,} allowed"):
        check_autoencoder_config(huge, "here")
