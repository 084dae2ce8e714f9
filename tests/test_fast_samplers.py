"""The fast samplers against independent truth: the exact ODE map of Gaussian data, diffusers' schedulers running the
same algorithms, exact call counts, and the exact law of the stochastic solver.

Gaussian data N(mu, s^2): the probability-flow ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)
constant, and the optimal noise predictor is eps*(x_t, t) = sigma_t (x_t - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2).
So the exact result of a deterministic sampler from x_T is known: the ODE carries x_T to the last timestep tau_1,
and the last step returns x0_hat there. The measured order of convergence is the least-squares slope of
log(max error) against log(S) at S = 20, 40, 80 (further out for orders 3 and 4: see ORDERS) on the
karras spacing, in float64; at S = 5 and 10 the lower-order
first and last steps still dominate (the note of issue 16 gives those figures too).
"""

import math

import numpy as np
import pytest
import torch
from conftest import gaussian_eps

from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.models.unet import UNet
from ddpmkit.samplers import SAMPLERS, NoiseSource, PerSampleNoise, plan, sample, timesteps

T = 1000
MU, S_DATA = 0.3, 0.2


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def oracle(sched, mu=MU, s=S_DATA):
    """The exact noise predictor of N(mu, s^2) data."""
    return gaussian_eps(sched, mu, s)


def exact_ode_result(sched, x_T, tau, mu=MU, s=S_DATA):
    """The exact ODE from tau_S to tau_1, then the exact x0_hat at tau_1."""
    a_T, a_0 = sched.alpha_bar_at(torch.tensor([float(tau[-1]), float(tau[0])], dtype=torch.float64)).tolist()
    z = (x_T - math.sqrt(a_T) * mu) / math.sqrt(a_T * s * s + 1 - a_T)
    x_end = math.sqrt(a_0) * mu + math.sqrt(a_0 * s * s + 1 - a_0) * z
    return mu + math.sqrt(a_0) * s * s * (x_end - math.sqrt(a_0) * mu) / (a_0 * s * s + 1 - a_0)


# UniC raises UniP's order by one. The third- and fourth-order methods leave their pre-asymptotic range later (and
# the fourth-order one reaches float64's floor sooner), so they are fitted further out. With the second-difference
# weight of the reference implementations, DPM-Solver++(3M) measures 1.7 here, not 3.
ORDERS = [("ddim", {}, 1, (20, 40, 80)), ("dpmpp-2m", {}, 2, (20, 40, 80)), ("dpmpp-3m", {}, 3, (40, 80, 160)),
          ("heun", {}, 2, (20, 40, 80)), ("unipc", {"order": 2}, 3, (20, 40, 80)),
          ("unipc", {"order": 3}, 4, (40, 60, 80, 100))]


@pytest.mark.parametrize("name,options,order,steps", ORDERS)
def test_measured_order_of_convergence(sched, name, options, order, steps):
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    errs = []
    for S in steps:
        _, tau, _ = plan(name, sched, S, "karras", **options)
        x = sample(den, x_T.clone(), sampler=name, steps=S, spacing="karras", **options)
        assert x.dtype == torch.float64
        errs.append((x - exact_ode_result(sched, x_T, tau)).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.3, (name, options, slope, errs)


def test_ipndm_beats_ddim_and_improves_with_steps(sched):
    # iPNDM's fixed Adams-Bashforth weights are exact only on an even grid, so its asymptotic order on this one is
    # not a property of the method; what holds: well below DDIM's error, and falling with S.
    x_T = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    errs = {}
    for name in ("ddim", "ipndm"):
        for S in (10, 20, 40):
            _, tau, _ = plan(name, sched, S, "logsnr")
            errs[name, S] = (sample(den, x_T.clone(), sampler=name, steps=S, spacing="logsnr")
                             - exact_ode_result(sched, x_T, tau)).abs().max().item()
    assert errs["ipndm", 20] < errs["ipndm", 10] and errs["ipndm", 40] < errs["ipndm", 20]
    for S in (20, 40):
        assert errs["ipndm", S] < errs["ddim", S] / 5, errs


# ------------------------------------------------------------------------------------------------ diffusers


@pytest.fixture(scope="module")
def tiny_net(sched):
    """A random U-Net added to the Gaussian oracle: samples of the size of images, and a network that matters."""
    torch.manual_seed(3)
    unet = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(), dropout=0.0, num_groups=4).eval()
    for p in unet.parameters():  # away from the zero-initialised output
        p.data.add_(0.02 * torch.randn_like(p))
    gauss = oracle(sched)

    def net(x, t):
        t = torch.as_tensor(t)
        return gauss(x, t.round().long() if t.is_floating_point() and bool((t == t.round()).all()) else t).float() \
            + unet(x, t)

    return net


class ListNoise(NoiseSource):
    """Hands out given tensors in order, and remembers how many it handed out."""

    def __init__(self, tensors):
        self.tensors, self.used = list(tensors), 0

    def initial(self, shape, device=None):
        x = self.tensors[self.used]
        self.used += 1
        return x


def run_diffusers(scheduler, net, x_T, noises=None, karras_sigma_input=False):
    x = x_T.clone()
    if karras_sigma_input:
        # Heun works in y = x / alpha = x sqrt(sigma^2 + 1). Its init_noise_sigma is sigma_max itself for its default
        # timesteps, a factor sqrt(1 + 1 / sigma_max^2) = 1 + 2e-5 short of x_T / alpha_T, which alone moves the
        # samples by up to 3e-4 at S = 4; the exact start isolates the algorithm.
        x = x * (scheduler.sigmas[0].double() ** 2 + 1).sqrt().float()
    calls = 0
    for k, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t) if karras_sigma_input else x
        with torch.no_grad():
            out = net(inp, t.reshape(1).expand(x.shape[0]))
        calls += 1
        kw = {"variance_noise": noises[k]} if noises is not None else {}
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x, calls


def our_timesteps(diffusers_timesteps) -> np.ndarray:
    """The distinct timesteps a diffusers scheduler visits, increasing, as ours take them."""
    return np.array(sorted({int(round(float(t))) for t in diffusers_timesteps}), dtype=np.int64)


@pytest.mark.parametrize("S", [4, 10])
@pytest.mark.parametrize("kind", ["dpmpp-2m", "dpmpp-2m-sde", "unipc-2", "unipc-3", "heun"])
def test_same_samples_as_diffusers(sched, tiny_net, kind, S):
    diffusers = pytest.importorskip("diffusers")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    options, noises, karras = {}, None, False
    if kind.startswith("dpmpp"):
        algo = "sde-dpmsolver++" if kind.endswith("sde") else "dpmsolver++"
        sch = diffusers.DPMSolverMultistepScheduler(**common, solver_order=2, algorithm_type=algo,
                                                    final_sigmas_type="zero")
        name = kind
    elif kind.startswith("unipc"):
        options["order"] = int(kind[-1])
        sch = diffusers.UniPCMultistepScheduler(**common, solver_order=options["order"], solver_type="bh2")
        name = "unipc"
    else:
        sch = diffusers.HeunDiscreteScheduler(**common)
        name, karras = "heun", True
    sch.set_timesteps(S)
    tau = our_timesteps(sch.timesteps)
    assert len(tau) == S
    if kind.endswith("sde"):
        g = torch.Generator().manual_seed(6)
        noises = [torch.randn(x_T.shape, generator=g) for _ in range(S)]
    theirs, their_calls = run_diffusers(sch, tiny_net, x_T, noises, karras_sigma_input=karras)
    ours_calls = []

    def counting(x, t):
        ours_calls.append(t)
        return tiny_net(x, t)

    noise = ListNoise(noises) if noises is not None else PerSampleNoise(0)
    ours = SAMPLERS[name].fn(Denoiser(counting, sched, clip_x0=False), x_T.clone(), tau, noise=noise, **options)
    assert len(ours_calls) == their_calls == SAMPLERS[name].model_calls(S)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if noises is not None:
        assert noise.used == S - 1  # no noise at the last step, to sigma = 0


# ------------------------------------------------------------------------------------------------ calls


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_exact_number_of_network_calls(name):
    sch = NoiseSchedule.linear(40)
    calls = []

    def net(x, t):
        calls.append(1)
        return torch.zeros_like(x)

    den = Denoiser(net, sch)
    for S in range(1, 41):
        for spacing in ("uniform", "logsnr"):
            calls.clear()
            sample(den, (2, 1, 2, 2), sampler=name, steps=S, spacing=spacing, noise=0)
            assert len(calls) == SAMPLERS[name].model_calls(S), (name, S, spacing)


def test_noise_spacings(sched):
    for spacing in ("logsnr", "karras"):
        for S in (1, 2, 5, 37, 1000):
            tau = timesteps(sched, S, spacing)
            assert len(tau) == S and len(set(tau.tolist())) == S and tau.dtype == np.int64
            assert tau.min() >= 0 and tau.max() == T - 1 and np.all(np.diff(tau) > 0)
        exact = timesteps(sched, 10, spacing, integer=False)
        assert exact[0] == 0.0 and exact[-1] == T - 1
    lam = lambda t: 0.5 * torch.log(sched.alpha_bar_at(t) / (1 - sched.alpha_bar_at(t)))  # noqa: E731
    d = np.diff(lam(torch.from_numpy(timesteps(sched, 12, "logsnr", integer=False))).numpy())
    np.testing.assert_allclose(d, d[0], rtol=1e-6)  # uniform in lambda (DPM-Solver section 3.3)
    sig = lambda t: ((1 - sched.alpha_bar_at(t)) / sched.alpha_bar_at(t)).sqrt()  # noqa: E731
    r = sig(torch.from_numpy(timesteps(sched, 12, "karras", integer=False))).numpy() ** (1 / 7)
    np.testing.assert_allclose(np.diff(r), np.diff(r)[0], rtol=1e-6)  # EDM eq. 5, rho = 7
    with pytest.raises(ValueError, match="schedule"):
        timesteps(T, 10, "logsnr")
    with pytest.raises(ValueError, match="integer"):
        timesteps(sched, 10, "uniform", integer=False)


def test_real_valued_timesteps_interpolate_log_alpha_bar(sched):
    ab = sched.alpha_bar.double()
    t = torch.tensor([0.0, 10.0, 10.25, 998.5, 999.0], dtype=torch.float64)
    got = sched.alpha_bar_at(t)
    assert got[0] == ab[0] and got[1] == ab[10] and got[4] == ab[999]
    assert got[2].item() == pytest.approx(math.exp(0.75 * math.log(ab[10]) + 0.25 * math.log(ab[11])), rel=1e-12)
    with pytest.raises(ValueError, match="timesteps"):
        sched.alpha_bar_at(torch.tensor([1000.5], dtype=torch.float64))
    # the Denoiser at a real-valued t reads the output with that alpha_bar
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    eps = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    pred = Denoiser(lambda xx, tt: eps, sched, clip_x0=False)(x, t)
    a = got.view(-1, 1, 1, 1)
    torch.testing.assert_close(pred.x0, (x - (1 - a).sqrt() * eps) / a.sqrt())
    assert torch.equal(pred.eps, eps) and torch.isnan(pred.log_var).all()


# ------------------------------------------------------------------------------------------------ the SDE solver


def exact_law_2m_sde(sched, tau, mu=MU, s=S_DATA):
    """Mean and sd of DPM-Solver++(2M) SDE's output under the Gaussian oracle, by the exact linear recursion over
    the joint Gaussian of (x_i, x_{i-1}): x0_hat(x) = mu + c (x - alpha mu) is affine in x, every step is linear."""
    ab = sched.alpha_bar_at(torch.from_numpy(np.asarray(tau, dtype=np.float64)[::-1].copy())).numpy()
    al, sg = np.append(np.sqrt(ab), 1.0), np.append(np.sqrt(1 - ab), 0.0)
    with np.errstate(divide="ignore"):
        lam = np.log(al) - np.log(sg)
    c = al[:-1] * s * s / (al[:-1] ** 2 * s * s + sg[:-1] ** 2)
    # state (x_i, x_{i-1}) as mean vector m and covariance P; x0_hat_i = mu + c_i (x_i - alpha_i mu)
    m, P = np.zeros(2), np.diag([1.0, 0.0])
    h_prev = None
    for i in range(len(tau)):
        # x0_hat_i = a0 + a1 x_i, x0_hat_{i-1} = b0 + b1 x_{i-1}
        a0, a1 = mu - c[i] * al[i] * mu, c[i]
        if i == len(tau) - 1:
            mean, var = a0 + a1 * m[0], a1 * a1 * P[0, 0]
            return mean, math.sqrt(var)
        h = lam[i + 1] - lam[i]
        w_cur, w_prev = (1.0, 0.0) if h_prev is None else (1 + 0.5 * h / h_prev, -0.5 * h / h_prev)
        decay = 1 - math.exp(-2 * h)
        b0, b1 = (mu - c[i - 1] * al[i - 1] * mu, c[i - 1]) if i > 0 else (0.0, 0.0)
        # x_{i+1} = k x_i + alpha decay (w_cur x0_i + w_prev x0_{i-1}) + sigma sqrt(decay) z
        k = sg[i + 1] / sg[i] * math.exp(-h)
        coef_cur = k + al[i + 1] * decay * w_cur * a1
        coef_prev = al[i + 1] * decay * w_prev * b1
        const = al[i + 1] * decay * (w_cur * a0 + w_prev * b0)
        A = np.array([[coef_cur, coef_prev], [1.0, 0.0]])
        m = A @ m + np.array([const, 0.0])
        P = A @ P @ A.T + np.diag([sg[i + 1] ** 2 * decay, 0.0])
        h_prev = h


@pytest.mark.parametrize("S,spacing", [(10, "logsnr"), (25, "karras")])
def test_2m_sde_matches_its_exact_law(sched, S, spacing):
    # n = 65,536 scalars: the mean within 5 standard errors, the sd within 5 standard errors of an sd (about 1.4%)
    den = Denoiser(oracle(sched), sched, clip_x0=False)
    _, tau, _ = plan("dpmpp-2m-sde", sched, S, spacing)
    x = sample(den, (4096, 1, 4, 4), sampler="dpmpp-2m-sde", steps=S, spacing=spacing,
               noise=torch.Generator().manual_seed(7))
    m, sd = exact_law_2m_sde(sched, tau)
    n = x.numel()
    assert abs(x.double().mean().item() - m) < 5 * sd / math.sqrt(n), (x.mean().item(), m)
    assert abs(x.double().std().item() - sd) < 5 * sd / math.sqrt(2 * n), (x.std().item(), sd)
    assert abs(m - MU) < 0.01 and abs(sd / S_DATA - 1) < 0.1, (m, sd)  # and it is near the data's law
