"""The DDPM and DDIM samplers against oracles with known answers.

Gaussian oracle: for data x0 ~ N(mu, s^2) (each dimension independent) the optimal noise predictor is known in
closed form, eps*(x_t, t) = sqrt(1-ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab). Every sampler step is then a linear
map of x plus Gaussian noise, so the exact law of the sampler's output is a Gaussian whose mean and variance
follow a scalar recursion written here from the papers' equations, in float64, independently of the library.

Tolerances: each configuration draws n = 4096 x 16 = 65,536 independent scalars. The sample mean must lie within
5 standard errors (sd / sqrt(n)) of the exact mean, and the sample sd within 5 standard errors (sd / sqrt(2n),
about 1.4% of sd at 5 SE) of the exact sd; across the ~20 configurations the chance of a false failure is below
1e-5. Separately, the exact law is compared with the data (mu, s): with T = 1000 steps every sampler must be within
2.5% of s and 0.005 of mu. (The fixed "small" variance under-disperses for Gaussian data: beta_tilde is the best choice
only for a point mass, beta only for N(0, I), as the DDPM paper notes; at s = 0.2 the exact law gives 0.981 s, so
2.5% is the honest bound, not 1%.) With few DDIM steps the deterministic sampler provably shrinks the spread (std
ratio 0.52 at 10 uniform steps for s = 0.2), so there only the mean is compared with mu.
"""

import math

import numpy as np
import pytest
import torch

from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.samplers import sample
from ddpmkit.samplers import timesteps as ddim_timesteps

T = 1000
MU, S = 0.3, 0.2


def ddpm_sample(model, sched, shape, *, variance="small", clip_x0=True, objective="eps", generator=None,
                x_T=None, callback=None, steps=None, spacing=None):
    """DDPM through a Denoiser over ``model``, from ``x_T`` or from noise of ``shape`` drawn from ``generator``."""
    den = Denoiser(model, sched, objective=objective, variance=variance, clip_x0=clip_x0)
    return sample(den, shape if x_T is None else x_T, sampler="ddpm", steps=steps, spacing=spacing,
                  noise=generator, callback=callback)


def ddim_sample(model, sched, shape, *, steps, eta=0.0, spacing="uniform", clip_x0=True, objective="eps",
                generator=None, x_T=None, callback=None):
    den = Denoiser(model, sched, objective=objective, clip_x0=clip_x0)
    return sample(den, shape if x_T is None else x_T, sampler="ddim", steps=steps, spacing=spacing, eta=eta,
                  noise=generator, callback=callback)
SHAPE = (4096, 1, 4, 4)


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def paper_arrays():
    """alpha_bar etc. in float64, straight from the linear schedule's definition."""
    b = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    ab = np.cumprod(1 - b)
    return b, ab


def gaussian_oracle(sched, mu=MU, s=S):
    ab = sched.alpha_bar.double()

    def model(xt, t):
        a = ab[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (xt.double() - a.sqrt() * mu) / (a * s * s + 1 - a)).float()

    return model


def exact_law_ddpm(variance, mu=MU, s=S, tau=None):
    """The exact law of DDPM's output; ``tau`` (increasing) respaces it: the process over alpha_bar[tau]."""
    _, ab_full = paper_arrays()
    tau = np.arange(T) if tau is None else np.asarray(tau)
    ab = ab_full[tau]
    abp = np.append(1.0, ab[:-1])
    b = 1 - ab / abp                                                # Improved DDPM section 4
    m, V = 0.0, 1.0
    for t in range(len(tau) - 1, -1, -1):
        a = math.sqrt(ab[t])
        v = ab[t] * s * s + 1 - ab[t]
        c1 = math.sqrt(abp[t]) * b[t] / (1 - ab[t])               # DDPM eq. 7
        c2 = math.sqrt(1 - b[t]) * (1 - abp[t]) / (1 - ab[t])
        # x' = c1 (mu + a s^2 (x - a mu) / v) + c2 x + sigma z
        k = c1 * a * s * s / v + c2
        m = c1 * (mu - a * a * s * s * mu / v) + k * m
        if t > 0:
            var = (1 - abp[t]) / (1 - ab[t]) * b[t] if variance == "small" else b[t]
        else:
            var = 0.0
        V = k * k * V + var
    return m, math.sqrt(V)


def exact_law_ddim(steps, eta, spacing, mu=MU, s=S):
    _, ab = paper_arrays()
    tau = ddim_timesteps(T, steps, spacing)
    m, V = 0.0, 1.0
    for k in range(len(tau) - 1, -1, -1):
        at = ab[tau[k]]
        ap = ab[tau[k - 1]] if k > 0 else 1.0
        a, bb = math.sqrt(at), math.sqrt(1 - at)
        v = at * s * s + 1 - at
        sig2 = eta ** 2 * (1 - ap) / (1 - at) * (1 - at / ap)       # DDIM eq. 16
        c = math.sqrt(max(1 - ap - sig2, 0.0))
        # x' = sqrt(ap) (mu + a s^2 d / v) + c bb d / v + sigma z, with d = x - a mu   (DDIM eq. 12)
        kk = (math.sqrt(ap) * a * s * s + c * bb) / v
        m = math.sqrt(ap) * mu + kk * (m - a * mu)
        V = kk * kk * V + sig2
    return m, math.sqrt(V)


def assert_matches(x, m, sd, label):
    n = x.numel()
    mean, std = x.double().mean().item(), x.double().std().item()
    assert abs(mean - m) < 5 * sd / math.sqrt(n), f"{label}: mean {mean:.5f} vs exact {m:.5f}"
    assert abs(std - sd) < 5 * sd / math.sqrt(2 * n), f"{label}: sd {std:.5f} vs exact {sd:.5f}"


@pytest.mark.parametrize("variance", ["small", "large"])
def test_ddpm_gaussian_oracle(sched, variance):
    g = torch.Generator().manual_seed(10)
    x = ddpm_sample(gaussian_oracle(sched), sched, SHAPE, variance=variance, clip_x0=False, generator=g)
    m, sd = exact_law_ddpm(variance)
    assert_matches(x, m, sd, f"ddpm-{variance}")
    assert abs(m - MU) < 0.005 and abs(sd / S - 1) < 0.025, (m, sd)


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("steps,spacing", [(10, "uniform"), (50, "uniform"), (37, "quadratic"), (25, "trailing")])
def test_respaced_ddpm_gaussian_oracle(sched, variance, steps, spacing):
    # DDPM at S < T: ancestral sampling of the process whose alpha_bar are those of the visited timesteps.
    g = torch.Generator().manual_seed(16)
    model = gaussian_oracle(sched)
    calls = []

    def counting(xt, t):
        calls.append(int(t[0]))
        return model(xt, t)

    x = ddpm_sample(counting, sched, SHAPE, variance=variance, clip_x0=False, generator=g, steps=steps,
                    spacing=spacing)
    tau = ddim_timesteps(T, steps, spacing)
    assert calls == list(tau[::-1])  # the network sees the original timesteps, one call each
    m, sd = exact_law_ddpm(variance, tau=tau)
    assert_matches(x, m, sd, f"ddpm-{variance} S={steps} {spacing}")
    assert abs(m - MU) < 0.005


def test_respaced_ddpm_at_every_step_is_the_paper_sampler(sched):
    model = finite_set_oracle(sched, torch.tensor([[[[0.5, -0.5], [0.9, 0.0]]]]))
    a = ddpm_sample(model, sched, (16, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    b = ddpm_sample(model, sched, (16, 1, 2, 2), generator=torch.Generator().manual_seed(4), steps=T,
                    spacing="trailing")
    assert torch.equal(a, b)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 50, 1000])
@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
def test_ddim_gaussian_oracle(sched, eta, steps, spacing):
    if steps == T and spacing != "uniform":
        pytest.skip("at S = T every spacing is the full sequence 0..T-1")
    g = torch.Generator().manual_seed(11)
    calls = []
    model = gaussian_oracle(sched)

    def counting(xt, t):
        calls.append(int(t[0]))
        return model(xt, t)

    x = ddim_sample(counting, sched, SHAPE, steps=steps, eta=eta, spacing=spacing, clip_x0=False, generator=g)
    assert len(calls) == steps
    m, sd = exact_law_ddim(steps, eta, spacing)
    assert_matches(x, m, sd, f"ddim eta={eta} steps={steps} {spacing}")
    assert abs(m - MU) < 0.005
    if steps == T:
        assert abs(sd / S - 1) < 0.025, sd


def test_ddim_spread_shrinks_at_few_steps_as_derived():
    # A stated property of deterministic DDIM with few steps, so the docstring's figure stays true.
    _, sd = exact_law_ddim(10, 0.0, "uniform")
    assert sd / S == pytest.approx(0.5233, abs=1e-3)


def finite_set_oracle(sched, points):
    """The optimal denoiser for a training set of a few points: the posterior-weighted mean of the points."""
    ab = sched.alpha_bar.double()
    P = points.double().flatten(1)  # [K, D]

    def model(xt, t):
        a = ab[t].view(-1, 1)
        x = xt.double().flatten(1)
        d2 = ((x[:, None, :] - a.sqrt()[:, None] * P[None]) ** 2).sum(-1)  # [B, K]
        w = torch.softmax(-d2 / (2 * (1 - a)), dim=1)
        x0 = w @ P
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps.view_as(xt).float()

    return model


# The last DDIM step returns x0_hat at tau_1, a posterior-weighted mean that is sharp only when tau_1 is small:
# uniform and quadratic end at t = 0, trailing at t = T/S - 1, so trailing needs S = 100 (t = 9) to be as sharp.
@pytest.mark.parametrize("spacing,steps", [("uniform", 50), ("quadratic", 50), ("trailing", 100)])
def test_ddim_lands_on_training_points(sched, spacing, steps):
    g = torch.Generator().manual_seed(12)
    points = torch.rand(5, 1, 2, 2, generator=g) * 1.6 - 0.8
    x = ddim_sample(finite_set_oracle(sched, points), sched, (256, 1, 2, 2), steps=steps, eta=0.0,
                    spacing=spacing, generator=g)
    dist = torch.cdist(x.flatten(1).double(), points.flatten(1).double())
    nearest = dist.min(dim=1)
    assert nearest.values.max().item() < 1e-3
    assert len(torch.unique(nearest.indices)) == 5  # every training point is reached by some sample


def test_ddpm_lands_on_training_points(sched):
    g = torch.Generator().manual_seed(13)
    points = torch.rand(4, 1, 2, 2, generator=g) * 1.6 - 0.8
    x = ddpm_sample(finite_set_oracle(sched, points), sched, (128, 1, 2, 2), generator=g)
    dist = torch.cdist(x.flatten(1).double(), points.flatten(1).double()).min(dim=1).values
    assert dist.max().item() < 1e-3


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta1_full_steps_equals_ddpm_small(sched, clip):
    # DDIM eq. 16 with eta = 1 makes sigma_t^2 = beta_tilde_t, and then eq. 12 is DDPM's ancestral step.
    model = finite_set_oracle(sched, torch.tensor([[[[0.5, -0.5], [0.9, 0.0]]], [[[-0.7, 0.2], [0.1, 0.6]]]]))
    ga, gb = torch.Generator().manual_seed(14), torch.Generator().manual_seed(14)
    trace_a, trace_b = [], []
    xa = ddpm_sample(model, sched, (64, 1, 2, 2), variance="small", clip_x0=clip, generator=ga,
                     callback=lambda i, t, x, x0: trace_a.append((t, x.clone())))
    xb = ddim_sample(model, sched, (64, 1, 2, 2), steps=T, eta=1.0, clip_x0=clip, generator=gb,
                     callback=lambda i, t, x, x0: trace_b.append((t, x.clone())))
    assert [t for t, _ in trace_a] == [t for t, _ in trace_b] == list(range(T - 1, -1, -1))
    for (_, a), (_, b) in zip(trace_a[:5], trace_b[:5]):  # the first steps agree to float32 rounding
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa, xb, atol=1e-3, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T(sched):
    model = gaussian_oracle(sched)
    xT = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(15))
    a = ddim_sample(model, sched, xT.shape, steps=20, x_T=xT, generator=torch.Generator().manual_seed(1))
    b = ddim_sample(model, sched, xT.shape, steps=20, x_T=xT, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = ddim_sample(model, sched, xT.shape, steps=20, eta=0.5, x_T=xT, generator=torch.Generator().manual_seed(1))
    d = ddim_sample(model, sched, xT.shape, steps=20, eta=0.5, x_T=xT, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(c, d)


def test_seeded_sampling_repeats_and_x_T_replays(sched):
    model = gaussian_oracle(sched)
    s1 = ddpm_sample(model, sched, (4, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    s2 = ddpm_sample(model, sched, (4, 1, 2, 2), generator=torch.Generator().manual_seed(3))
    assert torch.equal(s1, s2)
    xT = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    r1 = ddpm_sample(model, sched, xT.shape, x_T=xT, generator=g)
    g = torch.Generator().manual_seed(6)
    r2 = ddpm_sample(model, sched, xT.shape, x_T=xT, generator=g)
    assert torch.equal(r1, r2)


def test_last_ddim_step_returns_x0_hat_and_callback(sched):
    seen = []
    model = gaussian_oracle(sched)
    x = ddim_sample(model, sched, (3, 1, 2, 2), steps=7, generator=torch.Generator().manual_seed(0),
                    callback=lambda i, t, xt, x0: seen.append((i, t, xt.clone(), x0.clone())))
    assert [i for i, *_ in seen] == list(range(7))
    assert [t for _, t, *_ in seen] == list(ddim_timesteps(T, 7, "uniform")[::-1])
    assert torch.equal(seen[-1][2], x) and torch.equal(seen[-1][3], x)


@pytest.mark.parametrize("spacing", ["uniform", "quadratic", "trailing"])
def test_spacings_give_exactly_steps_distinct_timesteps(spacing):
    for TT in [1, 2, 7, 10, 100, 1000]:
        for S_ in sorted(x for x in {1, 2, 3, TT // 3, TT // 2, TT - 1, TT} if 1 <= x <= TT):
            tau = ddim_timesteps(TT, S_, spacing)
            assert len(tau) == S_ and len(set(tau.tolist())) == S_
            assert tau.min() >= 0 and tau.max() <= TT - 1 and np.all(np.diff(tau) > 0)
    assert list(ddim_timesteps(1000, 10, "uniform")) == list(range(0, 1000, 100))  # DDIM's range(0, T, T//S)
    assert ddim_timesteps(1000, 10, "trailing")[-1] == 999
    assert ddim_timesteps(1000, 10, "quadratic")[-1] == 800


def test_bad_arguments(sched):
    model = gaussian_oracle(sched)
    for steps in [0, -1, T + 1]:
        with pytest.raises(ValueError, match="steps"):
            ddim_sample(model, sched, (1, 1, 2, 2), steps=steps)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(model, sched, (1, 1, 2, 2), steps=2.5)
    for eta in [-1.0, float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="eta"):
            ddim_sample(model, sched, (1, 1, 2, 2), steps=5, eta=eta)
    with pytest.raises(ValueError, match="spacing"):
        ddim_sample(model, sched, (1, 1, 2, 2), steps=5, spacing="cubic")
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(model, sched, (1, 1, 2, 2), variance="medium")
    with pytest.raises(ValueError, match="shape"):
        ddim_sample(model, sched, (2, 0, 2, 2), steps=5)
    with pytest.raises(ValueError, match="sampler"):
        sample(Denoiser(model, sched), (1, 1, 2, 2), sampler="euler")
    with pytest.raises(ValueError, match="no option"):
        sample(Denoiser(model, sched), (1, 1, 2, 2), sampler="ddpm", eta=1.0)
    with pytest.raises(ValueError, match="objective"):
        ddpm_sample(model, sched, (1, 1, 2, 2), objective="score")
