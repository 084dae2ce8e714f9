"""The Denoiser, the one reader of a network's output, against closed forms.

A network that outputs the exact target for a known (x0, eps) must give back x0 and eps for every objective; the
reverse variance must be the schedule's beta_tilde or beta (the posterior mean, DDPM eq. 11, is in test_diffusion);
respacing must call the network at the original timesteps.
"""

import math

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import Denoiser, NoiseSchedule, Prediction, training_target
from ddpmkit.samplers import PerSampleNoise, timesteps

T = 100


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def known_pair(seed=0, B=6, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(B, 2, 3, 3, generator=g) * 2 - 1) * scale
    eps = torch.randn(B, 2, 3, 3, generator=g)
    t = torch.randint(0, T, (B,), generator=g)
    return x0, eps, t


def x_t_of(sched, x0, eps, t):
    ab = sched.alpha_bar.double()[t].view(-1, 1, 1, 1)
    return (ab.sqrt() * x0.double() + (1 - ab).sqrt() * eps.double()).float()  # DDPM eq. 4


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_exact_network_gives_back_x0_and_eps(sched, objective):
    x0, eps, t = known_pair()
    x_t = x_t_of(sched, x0, eps, t)
    target = training_target(sched, x0, t, eps, objective)
    den = Denoiser(lambda x, tt: target, sched, objective=objective, clip_x0=False)
    pred = den(x_t, t)
    assert isinstance(pred, Prediction)
    torch.testing.assert_close(pred.x0, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(pred.eps, eps, atol=2e-3, rtol=0)


def test_clipping_keeps_x_t_consistent(sched):
    x0, eps, t = known_pair(scale=3.0)  # well outside [-1, 1]
    x_t = x_t_of(sched, x0, eps, t)
    den = Denoiser(lambda x, tt: eps, sched, objective="eps", clip_x0=True)
    pred = den(x_t, t)
    torch.testing.assert_close(pred.x0, x0.clamp(-1, 1), atol=1e-4, rtol=0)
    # eps_hat is the noise that, with the clipped x0_hat, reproduces x_t (DDPM eq. 4)
    torch.testing.assert_close(x_t_of(sched, pred.x0, pred.eps, t), x_t, atol=1e-4, rtol=0)


def test_reverse_variances_are_the_papers(sched):
    b = np.linspace(1e-4 * 10, 0.02 * 10, T)  # the linear schedule at T = 100 (scaled by 1000 / T)
    ab = np.cumprod(1 - b)
    abp = np.append(1.0, ab[:-1])
    beta_tilde = (1 - abp) / (1 - ab) * b  # DDPM eq. 7
    t = torch.arange(T)
    x = torch.zeros(T, 1, 1, 1)
    small = Denoiser(lambda x, tt: x, sched, variance="small")(x, t).log_var.flatten().double()
    large = Denoiser(lambda x, tt: x, sched, variance="large")(x, t).log_var.flatten().double()
    np.testing.assert_allclose(small[1:].numpy(), np.log(beta_tilde[1:]), rtol=1e-5)
    assert small[0].item() == pytest.approx(math.log(beta_tilde[1]), rel=1e-5)  # clipped at t = 0
    np.testing.assert_allclose(large[1:].numpy(), np.log(b[1:]), rtol=1e-5)
    with pytest.raises(ValueError, match="variance"):
        Denoiser(lambda x, tt: x, sched, variance="medium")
    with pytest.raises(ValueError, match="objective"):
        Denoiser(lambda x, tt: x, sched, objective="score")


def test_condition_reaches_the_network(sched):
    seen = []

    def net(x, t, *rest):
        seen.append(rest)
        return torch.zeros_like(x)

    x, t = torch.zeros(3, 1, 2, 2), torch.tensor([1, 2, 3])
    den = Denoiser(net, sched)
    den(x, t)
    y = torch.tensor([7, 1, 4])
    den(x, t, y)
    den.with_cond(y)(x, t)
    assert seen[0] == () and torch.equal(seen[1][0], y) and torch.equal(seen[2][0], y)


def test_respaced_denoiser_calls_the_original_timesteps(sched):
    calls = []

    def net(x, t):
        calls.append(t.tolist())
        return torch.zeros_like(x)

    tau = timesteps(T, 10, "quadratic")
    den = Denoiser(net, sched).respaced(tau)
    assert den.T == 10
    np.testing.assert_allclose(den.schedule.alpha_bar.numpy(), sched.alpha_bar.numpy()[tau], rtol=1e-5)
    den(torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]))
    assert calls == [[int(tau[0]), int(tau[9])]]
    twice = Denoiser(net, sched).respaced(timesteps(T, 20, "uniform")).respaced([1, 3, 19])
    twice(torch.zeros(3, 1, 2, 2), torch.tensor([0, 1, 2]))
    assert calls[-1] == [int(timesteps(T, 20, "uniform")[i]) for i in (1, 3, 19)]
    assert Denoiser(net, sched).respaced(np.arange(T)).schedule is sched


def test_wrong_output_shape_is_one_clear_error(sched):
    den = Denoiser(lambda x, t: x[:, :1], sched)
    with pytest.raises(ValueError, match="shape"):
        den(torch.zeros(2, 3, 2, 2), torch.tensor([1, 2]))


def test_per_sample_noise_does_not_depend_on_the_batch():
    whole = PerSampleNoise(5, start=0)
    a0 = whole.initial((8, 1, 3, 3))
    a1 = whole.like(a0)
    parts = [PerSampleNoise(5, start=s) for s in (0, 3)]
    b0 = torch.cat([parts[0].initial((3, 1, 3, 3)), parts[1].initial((5, 1, 3, 3))])
    b1 = torch.cat([parts[0].like(b0[:3]), parts[1].like(b0[3:])])
    assert torch.equal(a0, b0) and torch.equal(a1, b1)
    assert not torch.equal(a0, a1)
    assert not torch.equal(PerSampleNoise(6).initial((8, 1, 3, 3)), a0)
    with pytest.raises(ValueError, match="batches of 8"):
        whole.like(torch.zeros(4, 1, 3, 3))
