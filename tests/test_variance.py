"""Learned (Improved DDPM) and analytic (Analytic-DPM) reverse variances, against closed forms (issue 18)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import tiny_cfg, tiny_run
from ddpmkit.diffusion import Denoiser, NoiseSchedule, q_posterior, q_sample, training_losses
from ddpmkit.diffusion.bound import normal_kl, vlb_term_bits
from ddpmkit.diffusion.losses import HYBRID_LAMBDA, LossSecondMomentSampler, hybrid_vlb
from ddpmkit.diffusion.variance import (estimate_gamma, learned_log_var, optimal_reverse_variance,
                                        sampling_sigma2_max)
from ddpmkit.errors import ConfigError
from ddpmkit.metrics.nll import bpd_terms, nll_bpd
from ddpmkit.samplers import NoiseSource, plan, sample
from ddpmkit.store import load_checkpoint
from ddpmkit.train import Trainer

M, S = 0.3, 0.5  # Gaussian data: every pixel ~ N(M, S^2), independent


def gaussian_eps(schedule: NoiseSchedule):
    """The exact noise predictor E[eps | x_t] of Gaussian data: sqrt(bbar)(x_t - sqrt(abar) M) / v_t."""
    ab = schedule.alpha_bar.double()

    def net(x, t):
        a = ab[t].view(-1, *([1] * (x.ndim - 1)))
        v = a * S ** 2 + (1 - a)  # Var(x_t) = abar S^2 + bbar
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * M) / v).to(x.dtype)
    return net


def exact_gamma(schedule):
    ab = schedule.alpha_bar.double()
    return (1 - ab) / (ab * S ** 2 + 1 - ab)  # E||E[eps|x_t]||^2 / d = bbar / Var(x_t)


def true_reverse_variance(ab_t, ab_prev, lambda2):
    """Var(x_prev | x_t) for Gaussian data under the forward process with variance lambda2 (DDIM's family):
    x_prev = sqrt(ab_p) x0 + c (x_t - sqrt(ab_t) x0) + lambda z, c = sqrt(1 - ab_p - lambda2) / sqrt(1 - ab_t)."""
    c = np.sqrt(1 - ab_prev - lambda2) / np.sqrt(1 - ab_t)
    var_x0_given_xt = S ** 2 - ab_t * S ** 4 / (ab_t * S ** 2 + 1 - ab_t)
    return (np.sqrt(ab_prev) - c * np.sqrt(ab_t)) ** 2 * var_x0_given_xt + lambda2


# ------------------------------------------------------------------------------------------ analytic variance
def test_gaussian_gamma_estimate_matches_the_closed_form():
    sched = NoiseSchedule.linear(40)
    den = Denoiser(gaussian_eps(sched), sched, clip_x0=False)
    g = torch.Generator().manual_seed(0)
    x0 = M + S * torch.randn(64, 1, 16, 16, generator=g)
    gamma, n = estimate_gamma(den, [x0[:32], x0[32:]], seed=1)
    assert n == 64
    torch.testing.assert_close(gamma, exact_gamma(sched), rtol=0.05, atol=0)


@pytest.mark.parametrize("eta0", [False, True])
def test_optimal_variance_equals_the_true_reverse_variance_of_gaussian_data(eta0):
    sched = NoiseSchedule.linear(100)
    ab = sched.alpha_bar.double().numpy()
    ab_prev = np.append(1.0, ab[:-1])
    lam2 = np.zeros_like(ab) if eta0 else sched.posterior_variance.double().numpy()  # DDIM eta=0, or DDPM
    got = optimal_reverse_variance(torch.from_numpy(ab), torch.from_numpy(ab_prev), exact_gamma(sched),
                                   torch.from_numpy(lam2), clip=False).numpy()
    want = true_reverse_variance(ab, ab_prev, lam2)
    np.testing.assert_allclose(got[1:], want[1:], rtol=1e-6, atol=1e-12)


def test_analytic_denoiser_variance_full_and_respaced_is_the_true_one():
    sched = NoiseSchedule.linear(100)
    den = Denoiser(gaussian_eps(sched), sched, variance="analytic", clip_x0=False, gamma=exact_gamma(sched),
                   clip_sigma=False)
    ab = sched.alpha_bar.double().numpy()
    for tau in (np.arange(100), np.array([0, 9, 23, 40, 61, 80, 99])):  # every t, and an S = 7 trajectory
        d = den.respaced(tau)
        ab_t, ab_prev = ab[tau], np.append(1.0, ab[tau[:-1]])
        lam2 = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)  # beta_tilde of the sub-process
        x = torch.zeros(len(tau), 1, 2, 2)
        log_var = d(x, torch.arange(len(tau))).log_var.double().flatten().numpy()
        np.testing.assert_allclose(np.exp(log_var[1:]), true_reverse_variance(ab_t, ab_prev, lam2)[1:],
                                   rtol=2e-5)  # the schedule and log variance are stored as float32
        # step 0, the decoder, keeps beta_tilde of the next step (the official code's bound)
        assert log_var[0] == pytest.approx(float(d.schedule.posterior_log_variance_clipped[0]), rel=1e-6)


class _Probe(NoiseSource):
    """Noise that is zeros except at call ``j`` (ones): with an affine network the sampler is affine in x_T and in
    each noise draw, so runs with single probes give its output's exact law."""

    def __init__(self, j: int = -1):
        self.j, self.calls = j, 0

    def initial(self, shape, device=None):
        raise AssertionError("the test gives x_T")

    def like(self, x):
        z = torch.ones_like(x) if self.calls == self.j else torch.zeros_like(x)
        self.calls += 1
        return z


def _law_before_the_last_step(den, sampler, steps, **opts):
    """Mean and variance of x at the last visited timestep (the sampler's second-to-last state), x_T ~ q(x_T)."""
    tau = plan(sampler, den.schedule, steps, None, **opts)[1]
    ab = den.schedule.alpha_bar.double()

    def run(x_T, probe):
        seen = []
        sample(den, torch.full((1, 1, 1, 1), x_T, dtype=torch.float64), sampler=sampler, steps=steps, noise=probe,
               callback=lambda i, t, x, x0: seen.append(float(x)), **opts)
        return seen[-2], probe.calls

    b, calls = run(0.0, _Probe())
    a = run(1.0, _Probe())[0] - b
    c2 = sum((run(0.0, _Probe(j))[0] - b) ** 2 for j in range(calls))
    ab_T = float(ab[int(tau[-1])])
    mean_T, var_T = math.sqrt(ab_T) * M, ab_T * S ** 2 + 1 - ab_T                # q(x_T), DDPM eq. 4
    return a * mean_T + b, a * a * var_T + c2, float(ab[int(tau[0])])


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.4})])
def test_analytic_variance_chains_keep_the_exact_marginals_of_gaussian_data(sampler, opts):
    """With the exact noise predictor of Gaussian data, every step of a sampler with the optimal variance is the
    true reverse conditional, so x keeps the true marginal q(x_t) down to the last visited timestep; the fixed
    variance of the same sampler (beta_tilde, or DDIM's sigma) does not, at 8 steps."""
    sched = NoiseSchedule.linear(100)
    exact = Denoiser(gaussian_eps(sched), sched, variance="analytic", clip_x0=False, gamma=exact_gamma(sched),
                     clip_sigma=False)
    mean, var, ab0 = _law_before_the_last_step(exact, sampler, 8, **opts)
    assert mean == pytest.approx(math.sqrt(ab0) * M, rel=1e-5)
    assert var == pytest.approx(ab0 * S ** 2 + 1 - ab0, rel=1e-5)
    fixed_var = _law_before_the_last_step(exact._replace(variance="small"), sampler, 8, **opts)[1]
    assert abs(fixed_var / (ab0 * S ** 2 + 1 - ab0) - 1) > 0.01


def test_analytic_clipping_bounds_and_sampling_clip():
    sched = NoiseSchedule.linear(40)
    ab = sched.alpha_bar.double()
    ab_prev = sched.alpha_bar_prev.double()
    lam2 = sched.posterior_variance.double()
    lo = optimal_reverse_variance(ab, ab_prev, torch.full_like(ab, 5.0), lam2)   # Gamma > 1: the lower bound
    torch.testing.assert_close(lo, lam2)
    hi = optimal_reverse_variance(ab, ab_prev, torch.full_like(ab, -1e6), lam2)  # Cov[x0|x_t] clipped at 1
    coef = ((1 - ab) * ab_prev / ab).sqrt() - (1 - ab_prev - lam2).sqrt()
    torch.testing.assert_close(hi, lam2 + coef ** 2 * ab / (1 - ab))
    gamma = torch.full((40,), 0.2, dtype=torch.float64)
    den = Denoiser(lambda x, t: x, sched, variance="analytic", gamma=gamma)
    assert math.exp(float(den._log_var[1])) == pytest.approx(sampling_sigma2_max(), rel=1e-5)
    assert sampling_sigma2_max() == pytest.approx((2 * 2 / 255 * math.sqrt(math.pi / 2)) ** 2)
    # the bound does not clip: bpd_terms uses the unclipped variance
    unclipped = den._replace(clip_sigma=False)
    assert float(unclipped._log_var[1]) > float(den._log_var[1])
    with pytest.raises(ValueError, match="needs gamma"):
        Denoiser(lambda x, t: x, sched, variance="analytic")


def test_bound_with_analytic_variance_matches_a_hand_computation():
    sched = NoiseSchedule.linear(25)
    T = sched.T
    net = lambda x, t: 0.5 * x  # noqa: E731
    gamma = torch.linspace(0.9, 0.3, T, dtype=torch.float64)
    den = Denoiser(net, sched, variance="analytic", clip_x0=False, gamma=gamma)  # clip_sigma on: off in the bound
    x0 = torch.tensor([[[[-1.0, -1 / 255], [127 / 255, 1.0]]]])
    noise = torch.randn(T, 1, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    got = bpd_terms(den, x0, noise=noise)[0].double()
    b = sched.betas.double().numpy()
    ab = np.cumprod(1 - b)
    abp = np.append(1.0, ab[:-1])
    x = x0.double().numpy().ravel()
    clipped = 0
    for t in range(T):
        xt = np.sqrt(ab[t]) * x + np.sqrt(1 - ab[t]) * noise[t].double().numpy().ravel()
        x0h = (xt - np.sqrt(1 - ab[t]) * 0.5 * xt) / np.sqrt(ab[t])
        c1, c2 = np.sqrt(abp[t]) * b[t] / (1 - ab[t]), np.sqrt(1 - b[t]) * (1 - abp[t]) / (1 - ab[t])
        mu = c1 * x0h + c2 * xt
        bt = b[t] * (1 - abp[t]) / (1 - ab[t])
        if t == 0:
            var = b[1] * (1 - ab[0]) / (1 - ab[1])
            sd = np.sqrt(var)
            from scipy.stats import norm
            lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
            hi = np.where(x > 0.999, np.inf, x + 1 / 255)
            want = -np.mean(np.log(norm.cdf((hi - mu) / sd) - norm.cdf((lo - mu) / sd))) / np.log(2)
            assert float(got[0]) == pytest.approx(want, rel=2e-3)  # the tanh CDF approximation
            continue
        # Analytic-DPM Theorem 1 by hand, with Cov[x0 | x_t] = bbar/abar (1 - Gamma) clipped to [0, 1] (Theorem 2)
        cov = min((1 - ab[t]) / ab[t] * (1 - float(gamma[t])), 1.0)
        var = bt + (np.sqrt((1 - ab[t]) / (1 - b[t])) - np.sqrt(1 - abp[t] - bt)) ** 2 * ab[t] / (1 - ab[t]) * cov
        clipped += cov == 1.0
        mu_q = c1 * x + c2 * xt
        kl = 0.5 * (-1 + np.log(var) - np.log(bt) + bt / var + (mu_q - mu) ** 2 / var)
        assert float(got[t]) == pytest.approx(np.mean(kl) / np.log(2), rel=1e-4, abs=1e-7), t
    assert 0 < clipped < T - 1  # both sides of the clip are exercised


# ------------------------------------------------------------------------------------------ learned variance
class TwoHalves(torch.nn.Module):
    """A network with 2C outputs: a fixed eps part and a constant v."""

    def __init__(self, v: float):
        super().__init__()
        self.v = v

    def forward(self, x, t, y=None):
        return torch.cat([0.3 * x, torch.full_like(x, self.v)], dim=1)


@pytest.mark.parametrize("respace", [False, True])
def test_learned_range_ends_are_beta_and_beta_tilde(respace):
    sched = NoiseSchedule.linear(40)
    tau = np.array([0, 5, 17, 30, 39]) if respace else np.arange(40)
    for v, which in ((1.0, "log_betas"), (-1.0, "posterior_log_variance_clipped")):
        den = Denoiser(TwoHalves(v), sched, variance="learned").respaced(tau)
        t = torch.arange(den.T)
        lv = den(torch.zeros(den.T, 1, 2, 2), t).log_var
        assert lv.shape == (den.T, 1, 2, 2)  # per pixel
        torch.testing.assert_close(lv[:, 0, 0, 0], getattr(den.schedule, which), rtol=1e-6, atol=1e-6)
    v = torch.tensor([0.0])
    mid = learned_log_var(sched, torch.tensor([7]), v.view(1, 1, 1, 1))
    assert float(mid) == pytest.approx(0.5 * float(sched.log_betas[7] + sched.posterior_log_variance_clipped[7]))


def test_learned_variance_with_guidance_guides_the_first_half_only():
    class Cond(torch.nn.Module):
        def forward(self, x, t, y):
            e = (y.float() + 1).view(-1, 1, 1, 1) * x
            v = (y.float() / 10).view(-1, 1, 1, 1).expand_as(x)
            return torch.cat([e, v], dim=1)

    sched = NoiseSchedule.linear(40)
    den = Denoiser(Cond(), sched, variance="learned", clip_x0=False).with_cond(torch.tensor([3, 3])) \
        .guided(2.0, null_cond=9)
    x = torch.randn(2, 1, 2, 2)
    t = torch.tensor([10, 20])
    pred = den(x, t)
    eps = (1 + 2.0) * 4 * x - 2.0 * 10 * x  # eq. 6 on the first half
    torch.testing.assert_close(pred.eps, eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred.log_var, learned_log_var(sched, t, torch.full_like(x, 0.3)))  # conditional v
    with pytest.raises(ValueError, match="twice the image channels"):
        Denoiser(lambda x, t: x, sched, variance="learned")(x, t)


def test_hybrid_loss_stops_the_vlb_gradient_at_the_mean():
    sched = NoiseSchedule.linear(40)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0, 3, 17, 39])
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(4, 2, 4, 4, generator=g).clamp(-0.9, 0.9).requires_grad_(True)
    losses, _ = training_losses(lambda x, tt: out, sched, x0, t=t, noise=noise)
    grad = torch.autograd.grad(losses.sum(), out)[0]
    # the mean channels: the gradient of L_simple alone
    eps_out = out[:, :1].detach().requires_grad_(True)
    simple = (eps_out - noise).pow(2).flatten(1).mean(1).sum()
    torch.testing.assert_close(grad[:, :1], torch.autograd.grad(simple, eps_out)[0])
    # the variance channels: the gradient of lambda * T * L_vlb
    v = out[:, 1:].detach().requires_grad_(True)
    x_t = q_sample(sched, x0, t, noise)
    vb = hybrid_vlb(sched, x0, x_t, t, out[:, :1].detach(), v)
    gv = torch.autograd.grad(vb.sum(), v)[0]
    torch.testing.assert_close(grad[:, 1:], gv)
    assert gv.abs().sum() > 0
    # and the value: L_simple + 0.001 * T * L_t (bits)
    mean = q_posterior(sched, (x_t - (1 - sched.alpha_bar[t]).sqrt().view(-1, 1, 1, 1) * out[:, :1].detach())
                       / sched.alpha_bar[t].sqrt().view(-1, 1, 1, 1), x_t, t)[0]
    lt = vlb_term_bits(sched, x0, x_t, t, mean, learned_log_var(sched, t, out[:, 1:].detach()))
    want = (out[:, :1].detach() - noise).pow(2).flatten(1).mean(1) + HYBRID_LAMBDA * 40 * lt
    torch.testing.assert_close(losses.detach(), want, rtol=1e-5, atol=1e-6)


def test_vlb_only_loss_is_T_times_the_bound_terms_and_trains_the_mean_too():
    """L_vlb alone (Improved DDPM sec. 3.3): at each t, T times that term of the bound as the evaluation computes
    it (metrics.nll.bpd_terms, through the Denoiser), and its gradient reaches the mean, which L_hybrid's does not."""
    sched = NoiseSchedule.linear(40)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (3, 1, 4, 4), generator=g).float() / 127.5 - 1
    noise = torch.randn(40, 3, 1, 4, 4, generator=g)
    w = torch.tensor(0.3, requires_grad=True)

    def net(x, t):
        return torch.cat([w * x, 0.4 * torch.tanh(x)], dim=1)  # an eps half and a per-pixel v half

    terms = bpd_terms(Denoiser(net, sched, variance="learned", clip_x0=False), x0, noise=noise)
    for t in (0, 1, 7, 39):
        tt = torch.full((3,), t)
        losses, _ = training_losses(net, sched, x0, t=tt, noise=noise[t], vlb_only=True)
        torch.testing.assert_close(losses.detach(), 40 * terms[:, t].detach(), rtol=1e-5, atol=1e-6)
        assert torch.autograd.grad(losses.sum(), w)[0] != 0
        x_t = q_sample(sched, x0, tt, noise[t])
        hybrid = hybrid_vlb(sched, x0, x_t, tt, net(x_t, tt)[:, :1], net(x_t, tt)[:, 1:])
        assert torch.autograd.grad(hybrid.sum(), w)[0] == 0
    with pytest.raises(ValueError, match="learned variance"):
        training_losses(lambda x, t: x, sched, x0, vlb_only=True)
    with pytest.raises(ValueError, match="no loss weight"):
        training_losses(net, sched, x0, vlb_only=True, loss_weight="min-snr")


def test_bound_of_learned_at_minus_one_equals_the_fixed_small_bound():
    sched = NoiseSchedule.linear(40)
    x = torch.randint(0, 256, (3, 1, 4, 4), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    learned = nll_bpd(Denoiser(TwoHalves(-1.0), sched, variance="learned"), x, seed=5)
    small = nll_bpd(Denoiser(lambda x, t: 0.3 * x, sched, variance="small"), x, seed=5)
    assert learned["bpd"] == pytest.approx(small["bpd"], rel=1e-6)
    # and the KL term is what normal_kl says for the per-pixel learned variance at v = +1 (beta)
    big = nll_bpd(Denoiser(TwoHalves(1.0), sched, variance="learned"), x, seed=5)
    assert big["bpd"] != pytest.approx(small["bpd"], rel=1e-3)
    assert normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0)) == 0


# ------------------------------------------------------------------------------------------ the timestep sampler
def test_loss_second_moment_sampler_probabilities_and_unbiasedness():
    T = 6
    s = LossSecondMomentSampler(T, history=3, uniform_prob=0.01)
    assert torch.equal(s.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))  # warm-up: uniform
    table = torch.tensor([[1.0, 2, 3], [0.1, 0.1, 0.1], [5, 5, 5], [0.5, 1, 1.5], [2, 2, 2], [3, 0, 4]],
                         dtype=torch.float64)
    for j in range(3):
        s.update(torch.arange(T), table[:, j])
    assert s.warmed_up()
    w = table.pow(2).mean(1).sqrt()
    p = w / w.sum() * 0.99 + 0.01 / T  # Improved DDPM eq. 18 mixed with 1% uniform, as resample.py
    torch.testing.assert_close(s.probabilities(), p)
    # the importance-weighted mean of a fixed table of per-t losses is the uniform mean (exactly in expectation)
    lt = torch.tensor([0.3, 2.0, 0.7, 1.1, 5.0, 0.05], dtype=torch.float64)
    assert float((p * (1 / (T * p)) * lt).sum()) == pytest.approx(float(lt.mean()))
    t, wts = s.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert float((wts.double() * lt[t]).mean()) == pytest.approx(float(lt.mean()), rel=0.02)
    # a full history drops its oldest loss
    s.update(torch.tensor([0]), torch.tensor([9.0]))
    assert s.losses[0].tolist() == [2.0, 3.0, 9.0]
    state = s.state_dict()
    s2 = LossSecondMomentSampler(T, history=3, uniform_prob=0.01)
    s2.load_state_dict(state)
    assert torch.equal(s2.probabilities(), s.probabilities())


class _Prefilled(LossSecondMomentSampler):
    """A sampler already past its warm-up, so that a short test run draws by importance from the first step."""

    def __init__(self, T):
        super().__init__(T)
        self.losses = torch.rand(T, self.history, generator=torch.Generator().manual_seed(7),
                                 dtype=torch.float64) + 0.1
        self.counts[:] = self.history


@pytest.mark.parametrize("vlb_only", [False, True])
def test_learn_sigma_with_importance_sampling_resumes_bit_exactly(tmp_path, monkeypatch, vlb_only):
    import ddpmkit.train.tasks.diffusion as trainer_mod

    monkeypatch.setattr(trainer_mod, "LossSecondMomentSampler", _Prefilled)
    kw = dict(learn_sigma=True, timestep_sampler="loss-second-moment", checkpoint_every=3, vlb_only=vlb_only)
    Trainer(tiny_cfg(steps=6, **kw), tmp_path / "straight", quiet=True).run()
    Trainer(tiny_cfg(steps=4, **kw), tmp_path / "split", quiet=True).run()
    Trainer(tiny_cfg(steps=6, **kw), tmp_path / "split", resume=True, quiet=True).run()
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for k in a.model_state:
        assert torch.equal(a.model_state[k], b.model_state[k]), k
    assert torch.equal(a.train_state["t_sampler"]["losses"], b.train_state["t_sampler"]["losses"])
    cfg = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert cfg["diffusion"]["variance"] == "learned" and cfg["model"]["out_channels"] == 2


def test_learn_sigma_settings():
    assert tiny_cfg(learn_sigma=True).variance == "learned"
    assert tiny_cfg(learn_sigma=True).model_config()["out_channels"] == 2
    assert tiny_cfg().model_config()["out_channels"] is None  # unconditional old runs unchanged
    with pytest.raises(ConfigError, match="learn-sigma"):
        tiny_cfg(variance="learned").validate()
    with pytest.raises(ConfigError, match="learn-sigma"):
        tiny_cfg(learn_sigma=True, variance="small").validate()
    with pytest.raises(ConfigError, match="timestep-sampler"):
        tiny_cfg(timestep_sampler="nope").validate()
    with pytest.raises(ConfigError, match="needs --learn-sigma"):
        tiny_cfg(vlb_only=True).validate()
    with pytest.raises(ConfigError, match="no --loss-weight"):
        tiny_cfg(learn_sigma=True, vlb_only=True, loss_weight="min-snr").validate()
    tiny_cfg(learn_sigma=True, vlb_only=True).validate()


# ------------------------------------------------------------------------------------------ a run
@pytest.mark.slow
def test_eval_variance_stores_gamma_and_the_bound_uses_it(tmp_path, capsys):
    from ddpmkit.cli import main
    from ddpmkit.run import GAMMA_FILE, Run

    run = tiny_run(tmp_path, steps=2)
    den = Run.open(run).denoiser(variance="analytic")  # none stored: estimated on the fly, and said so
    assert "estimating it now" in capsys.readouterr().err and den.gamma.shape == (40,)
    assert main(["eval", "variance", str(run), "--n", "8"]) == 0
    assert (run / GAMMA_FILE).is_file()
    note = json.loads((run / "config.json").read_text())["diffusion"]["analytic"]
    assert note["n"] == 8 and note["step"] == 2
    r = Run.open(run)
    assert r.gamma().shape == (40,) and r.denoiser(variance="analytic").variance == "analytic"
    capsys.readouterr()
    assert main(["eval", "nll", str(run), "--n", "2", "--variance", "analytic"]) == 0
    assert "variance analytic" in capsys.readouterr().out
    with pytest.raises(Exception, match="learn-sigma"):
        Run.open(run).denoiser(variance="learned")
