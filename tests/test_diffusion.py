"""The forward process, objectives and posterior against closed forms."""

import math

import pytest
import torch

from ddpmkit.diffusion import (
    model_variance,
    predict_eps,
    predict_x0,
    q_posterior,
    q_sample,
    sample_timesteps,
    training_loss,
    training_losses,
    training_target,
)
from ddpmkit.diffusion import Denoiser, NoiseSchedule


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(1000)


def test_q_sample_statistics(sched):
    # DDPM eq. 4: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    for t_val in [0, 10, 250, 999]:
        x0 = torch.full((n, 1, 1, 1), 0.7)
        t = torch.full((n,), t_val, dtype=torch.long)
        xt = q_sample(sched, x0, t, torch.randn(x0.shape, generator=g))
        ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[t_val].item()
        mean, std = xt.mean().item(), xt.std().item()
        # 6 standard errors: mean SE = std / sqrt(n), std SE ~ std / sqrt(2n)
        assert abs(mean - math.sqrt(ab) * 0.7) < 6 * math.sqrt(1 - ab) / math.sqrt(n) + 1e-6
        assert abs(std - math.sqrt(1 - ab)) < 6 * math.sqrt(1 - ab) / math.sqrt(2 * n) + 1e-6


def test_per_sample_timesteps_are_uniform():
    g = torch.Generator().manual_seed(1)
    t = sample_timesteps(100_000, 10, generator=g)
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 9
    counts = torch.bincount(t, minlength=10).double()
    # each count ~ Binomial(n, 0.1): sd = 94.9; allow 6 sd
    assert (counts - 10_000).abs().max() < 6 * math.sqrt(100_000 * 0.1 * 0.9)
    # never one t per batch
    assert len(torch.unique(sample_timesteps(64, 1000, generator=g))) > 1


def test_x0_and_eps_inversions_roundtrip(sched):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    eps = torch.randn(8, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 5, 100, 500, 900, 998, 999])
    xt = q_sample(sched, x0, t, eps)
    for obj in ["eps", "x0", "v"]:
        target = training_target(sched, x0, t, eps, obj)
        torch.testing.assert_close(predict_x0(sched, xt, t, target, obj), x0, atol=2e-3, rtol=0)
    torch.testing.assert_close(predict_eps(sched, xt, t[:], x0)[1:], eps[1:], atol=1e-3, rtol=0)
    # v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)
    ab = sched.alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(sched, x0, t, eps, "v"), ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_perfect_predictor_has_zero_loss(sched):
    # With one data point c, the noise is recoverable from (x_t, t): eps = (x_t - sqrt(ab) c) / sqrt(1 - ab).
    c = torch.linspace(-0.9, 0.9, 16).view(1, 1, 4, 4)
    ab64 = sched.alpha_bar.double()

    def model_for(objective):
        def model(xt, t):
            a = ab64[t].view(-1, 1, 1, 1)
            eps = (xt.double() - a.sqrt() * c) / (1 - a).sqrt()
            if objective == "eps":
                return eps.float()
            if objective == "x0":
                return c.expand_as(xt).clone()
            return (a.sqrt() * eps - (1 - a).sqrt() * c).float()
        return model

    x0 = c.expand(32, 1, 4, 4).clone()
    g = torch.Generator().manual_seed(3)
    for obj in ["eps", "x0", "v"]:
        loss = training_loss(model_for(obj), sched, x0, objective=obj, generator=g)
        assert loss.item() < 1e-8, (obj, loss.item())
    # and a wrong predictor has loss ~ E||eps||^2 / d = 1
    loss = training_loss(lambda xt, t: torch.zeros_like(xt), sched, x0, generator=g)
    assert 0.5 < loss.item() < 1.5


def test_training_losses_per_sample_and_given_t(sched):
    x0 = torch.zeros(4, 1, 2, 2)
    noise = torch.ones(4, 1, 2, 2)
    t = torch.tensor([0, 1, 2, 3])
    losses, tt = training_losses(lambda xt, t: torch.zeros_like(xt), sched, x0, t=t, noise=noise)
    assert torch.equal(tt, t)
    torch.testing.assert_close(losses, torch.ones(4))
    with pytest.raises(ValueError, match="objective"):
        training_loss(lambda xt, t: xt, sched, x0, objective="score")


def test_posterior_against_bayes_rule():
    # q(x_{t-1} | x_t, x_0) is the product of q(x_{t-1} | x_0) and q(x_t | x_{t-1}) normalised: for Gaussians,
    # precision = 1/(1 - ab_{t-1}) + alpha_t / beta_t and
    # mean = var * (sqrt(ab_{t-1}) x0/(1-ab_{t-1}) + sqrt(a_t) x_t/beta_t)
    sched = NoiseSchedule.linear(1000)
    b = sched.betas.double()
    ab = torch.cumprod(1 - b, 0)
    x0 = torch.tensor([0.3, -0.5]).view(2, 1, 1, 1)
    xt = torch.tensor([1.2, 0.1]).view(2, 1, 1, 1)
    for t_val in [1, 7, 400, 999]:
        t = torch.full((2,), t_val)
        mean, var, logvar = q_posterior(sched, x0, xt, t)
        prec = 1 / (1 - ab[t_val - 1]) + (1 - b[t_val]) / b[t_val]
        v = 1 / prec
        m = v * (ab[t_val - 1].sqrt() * x0.double() / (1 - ab[t_val - 1])
                 + (1 - b[t_val]).sqrt() * xt.double() / b[t_val])
        torch.testing.assert_close(var.double().flatten(), torch.full((2,), v.item(), dtype=torch.float64),
                                   rtol=1e-4, atol=0)
        torch.testing.assert_close(mean.double(), m, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(logvar.double().exp().flatten(), var.double().flatten(), rtol=1e-4, atol=0)
    # at t = 0 the posterior is a point mass at x0: mean x0, variance 0
    mean, var, _ = q_posterior(sched, x0, xt, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0, atol=1e-6, rtol=0)
    assert var.abs().max().item() == 0.0


def test_model_variance_choices():
    sched = NoiseSchedule.linear(1000)
    small, log_small = model_variance(sched, "small")
    large, log_large = model_variance(sched, "large")
    assert torch.equal(small, sched.posterior_variance)
    assert torch.equal(large[1:], sched.betas[1:])
    assert large[0].item() == sched.posterior_variance[1].item()
    torch.testing.assert_close(log_large.exp(), large)
    with pytest.raises(ValueError):
        model_variance(sched, "learned")


def test_denoiser_posterior_mean_matches_ddpm_eq_11():
    # DDPM eq. 11: mu = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps)
    sched = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(4)
    xt = torch.randn(5, 2, 3, 3, generator=g)
    eps = torch.randn(5, 2, 3, 3, generator=g)
    t = torch.tensor([1, 10, 100, 500, 999])
    mean, _, _ = Denoiser(lambda x, tt: eps, sched, clip_x0=False).p_mean_variance(xt, t)
    b = sched.betas.double()[t].view(-1, 1, 1, 1)
    ab = torch.cumprod(1 - sched.betas.double(), 0)[t].view(-1, 1, 1, 1)
    ref = (xt.double() - b / (1 - ab).sqrt() * eps.double()) / (1 - b).sqrt()
    torch.testing.assert_close(mean.double(), ref, rtol=1e-4, atol=1e-4)
    # clipping bounds x0_hat
    _, _, pred = Denoiser(lambda x, tt: eps * 50, sched, clip_x0=True).p_mean_variance(xt, t)
    assert pred.x0.abs().max().item() <= 1.0
