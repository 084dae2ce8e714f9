"""EDM's stochastic sampler (``heun-sde``, Karras et al. 2022, algorithm 2) against independent truth.

On Gaussian data N(mu, s^2) with the exact denoiser every step is affine in y = x / alpha plus Gaussian noise, so
the law of the output is known exactly by a scalar recursion on its mean and variance (``exact_law`` below, written
from the algorithm, not from the sampler's code). Without churn, or where no timestep lies in the churn window, the
sampler is ``heun`` bit for bit.
"""

import math

import numpy as np
import pytest
import torch
from conftest import gaussian_eps

from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.samplers import SAMPLERS, NoiseSource, PerSampleNoise, plan, sample

T = 1000
MU, S_DATA = 0.3, 0.2
EDM = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)  # the declared defaults (EDM's ImageNet-64)


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def oracle(sched, mu=MU, s=S_DATA):
    """The exact noise predictor of N(mu, s^2) data."""
    return gaussian_eps(sched, mu, s)


def grid_sigmas(sched, tau):
    """EDM's sigma at each visited timestep, the noisiest first, and 0 at the end."""
    ab = sched.alpha_bar_at(torch.from_numpy(np.asarray(tau, dtype=np.float64)[::-1].copy())).numpy()
    return np.append(np.sqrt((1 - ab) / ab), 0.0)


def exact_law(sched, tau, s_churn, s_tmin, s_tmax, s_noise, mu=MU, s=S_DATA):
    """Mean and sd of algorithm 2's output from x_T ~ N(0, I) under the exact denoiser. In y-space the exact
    eps(y, sigma) = k(sigma) (y - mu), k = sigma / (s^2 + sigma^2), so each Heun step maps y - mu to A (y - mu)."""
    sig = grid_sigmas(sched, tau)
    ab_top = sched.alpha_bar.double()[-1].item()
    top = math.sqrt((1 - ab_top) / ab_top)  # the network knows no noise above the schedule's last step
    k = lambda sg: sg / (s * s + sg * sg)  # noqa: E731
    gamma = min(s_churn / len(tau), math.sqrt(2) - 1)
    m, v = 0.0, 1.0 + sig[0] ** 2  # y_0 = x_T / alpha_0
    for i in range(len(tau)):
        s_hat = min(sig[i] * (1 + (gamma if s_tmin <= sig[i] <= s_tmax else 0.0)), top)
        v += (s_hat ** 2 - sig[i] ** 2) * s_noise ** 2
        ds = sig[i + 1] - s_hat
        euler = 1 + ds * k(s_hat)
        A = euler if i == len(tau) - 1 else 1 + 0.5 * ds * (k(s_hat) + k(sig[i + 1]) * euler)
        m, v = mu + A * (m - mu), A * A * v
    return m, math.sqrt(v)


class CountingNoise(NoiseSource):
    """Per-sample streams that count the draws after x_T."""

    def __init__(self, seed):
        self.inner, self.draws = PerSampleNoise(seed), -1

    def initial(self, shape, device=None):
        self.draws += 1
        return self.inner.initial(shape, device)


# ------------------------------------------------------------------------------------------------ heun, exactly


@pytest.mark.parametrize("steps,spacing", [(10, "karras"), (7, "uniform"), (1, "karras")])
def test_without_churn_it_is_heun_bit_for_bit(sched, steps, spacing):
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    heun = sample(den, (6, 1, 4, 4), sampler="heun", steps=steps, spacing=spacing, noise=5)
    noise = CountingNoise(5)
    ours = sample(den, (6, 1, 4, 4), sampler="heun-sde", steps=steps, spacing=spacing, noise=noise, s_churn=0.0)
    assert ours.dtype == heun.dtype and torch.equal(ours, heun)
    assert noise.draws == 0


def test_a_window_that_holds_no_timestep_is_heun_again(sched):
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    _, tau, _ = plan("heun", sched, 3)
    sig = grid_sigmas(sched, tau)[:-1]  # 157, 5.9, 0.01: none in [0.05, 1], and only the top in [1, 1e5]
    assert not ((sig >= 0.05) & (sig <= 1.0)).any() and ((sig >= 1.0) & (sig <= 1e5)).sum() == 2
    heun = sample(den, (6, 1, 4, 4), sampler="heun", steps=3, noise=1)
    for window in (dict(s_tmin=0.05, s_tmax=1.0), dict(s_tmin=0.02, s_tmax=5.0)):
        x = sample(den, (6, 1, 4, 4), sampler="heun-sde", steps=3, noise=1, s_churn=1000.0, **window)
        assert torch.equal(x, heun), window
    # [1, 1e5] holds the top, where the churn is capped at the schedule's last step, and 5.9, where it is not
    x = sample(den, (6, 1, 4, 4), sampler="heun-sde", steps=3, noise=1, s_churn=1000.0, s_tmin=1.0, s_tmax=1e5)
    assert not torch.equal(x, heun)


# ------------------------------------------------------------------------------------------------ the churn


def test_churn_draws_noise_where_the_window_says_and_each_stream_its_own(sched):
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    _, tau, _ = plan("heun-sde", sched, 10)
    sig = grid_sigmas(sched, tau)[:-1]
    noise = CountingNoise(2)
    a = sample(den, (6, 1, 4, 4), sampler="heun-sde", noise=noise)
    assert noise.draws == int(((sig >= EDM["s_tmin"]) & (sig <= EDM["s_tmax"])).sum()) == 7
    heun = sample(den, (6, 1, 4, 4), sampler="heun", noise=2)
    b = sample(den, (6, 1, 4, 4), sampler="heun-sde", noise=3)
    assert (a - heun).abs().amax(dim=(1, 2, 3)).gt(0.05).all()  # every sample moved by the churn
    assert not torch.equal(a, b)  # another seed, other noise
    assert torch.equal(a, sample(den, (6, 1, 4, 4), sampler="heun-sde", noise=2))  # the same seed, the same
    # an image depends on its own stream only: batches of 2 and 4 give the batch of 6
    parts = [sample(den, (n, 1, 4, 4), sampler="heun-sde", noise=PerSampleNoise(2, start=i))
             for i, n in ((0, 2), (2, 4))]
    assert torch.equal(torch.cat(parts), a)


def test_more_churn_adds_more_noise(sched):
    # the added variance sum (sigma_hat^2 - sigma_i^2) grows with S_churn until gamma reaches sqrt(2) - 1
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    heun = sample(den, (256, 1, 4, 4), sampler="heun", steps=25, noise=4).double()
    dist = [(sample(den, (256, 1, 4, 4), sampler="heun-sde", steps=25, noise=4, s_churn=c, s_noise=1.0).double()
             - heun).pow(2).mean().item() for c in (1.0, 4.0, 10.0, 1000.0)]
    assert 0 < dist[0] < dist[1] < dist[2] < dist[3], dist


@pytest.mark.parametrize("steps,options", [(10, {}), (25, dict(s_churn=10.0, s_noise=1.0)),
                                           (25, dict(s_churn=1000.0, s_tmin=0.0, s_tmax=1e5, s_noise=1.0))])
def test_matches_its_exact_law(sched, steps, options):
    # n = 65,536 scalars: the mean within 5 standard errors, the sd within 5 standard errors of an sd (about 1.4%)
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    _, tau, _ = plan("heun-sde", sched, steps)
    x = sample(den, (4096, 1, 4, 4), sampler="heun-sde", steps=steps, noise=torch.Generator().manual_seed(7),
               **options).double()
    m, sd = exact_law(sched, tau, **{**EDM, **options})
    n = x.numel()
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n), (x.mean().item(), m)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n), (x.std().item(), sd)


def test_its_law_is_the_datas_with_enough_steps(sched):
    # At 100 steps the exact law is the data's within 2% (the sd: 0.2025 with S_noise = 1; the mean is within 1e-9).
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    options = dict(s_churn=1000.0, s_tmin=0.0, s_tmax=1e5, s_noise=1.0)
    _, tau, _ = plan("heun-sde", sched, 100)
    m, sd = exact_law(sched, tau, **options)
    assert abs(m - MU) < 1e-6 and abs(sd / S_DATA - 1) < 0.02, (m, sd)
    x = sample(den, (4096, 1, 4, 4), sampler="heun-sde", steps=100, noise=torch.Generator().manual_seed(8),
               **options).double()
    n = x.numel()
    assert abs(x.mean().item() - MU) < 5 * S_DATA / math.sqrt(n) + 1e-6
    assert abs(x.std().item() / S_DATA - 1) < 0.02 + 5 / math.sqrt(2 * n), x.std().item()


# ------------------------------------------------------------------------------------------------ the options


def test_options_are_edms():
    info = SAMPLERS["heun-sde"]
    assert {o.name: o.default for o in info.options} == EDM
    assert info.default_spacing == "karras" and info.default_steps == 10 and info.model_calls(10) == 19


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import tiny_run

    return tiny_run(tmp_path_factory.mktemp("edm"))


@pytest.mark.parametrize("flags,flag", [(["--s-churn", "-1"], "--s-churn"), (["--s-noise", "0"], "--s-noise"),
                                        (["--s-tmin", "2", "--s-tmax", "1.5"], "--s-tmin"),
                                        (["--s-tmin", "0.5", "--s-tmax", "0.2"], "--s-tmax")])
def test_a_bad_option_is_one_line_through_sample(run, capsys, flags, flag):
    assert main(["sample", str(run), "--sampler", "heun-sde", *flags, "--n", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and flag in err and "Traceback" not in err, err
    assert not (run / "samples").exists()
