"""Consistency distillation against closed forms (Song et al. 2023): the boundary-conditioned reading of an
x0-predicting network (``consistency_x0``, ``Denoiser(consistency=...)``), the multistep consistency sampler, a
consistency model trained on Gaussian data, and `ddpmkit distill --method consistency` end to end.

Gaussian data x0 ~ N(mu, s^2) (each dimension independent). In EDM's variables (x = z / alpha, sigma = sigma_t /
alpha_t) the probability-flow ODE keeps (x - mu) / sqrt(s^2 + sigma^2) constant, so the exact consistency function
(the ODE map to the least level sigma_min = the EDM level of t = 0) is

    f*(x, sigma) = mu + k(sigma) (x - mu),   k(sigma) = sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma^2),

affine in x. ``consistency_x0`` reads a network's x0_hat as f = c_skip x + (1 - c_skip) x0_hat with
c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2), so the network output that makes f = f* is
x0_hat* = (f* - c_skip x) / (1 - c_skip) at every sigma > sigma_min (at sigma_min f = x = f* whatever it says).
Everything of the closed forms runs in float64.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import gaussian_x0, one_error_line

from ddpmkit.cli import main
from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE
from ddpmkit.diffusion.distill import alpha_sigma, consistency_target, consistency_x0, edm_sigma, heun_step
from ddpmkit.run import Run
from ddpmkit.samplers import NoiseSource, PerSampleNoise, sample
from ddpmkit.samplers.timesteps import timesteps
from ddpmkit.store.checkpoint import load_checkpoint
from ddpmkit.store.rundir import read_config
from ddpmkit.train.config import TrainConfig
from ddpmkit.train.distill_config import DistillConfig
from ddpmkit.train.loop import TrainingLoop
from ddpmkit.train.tasks.distill import DistillTask

T = 1000
MU, S_DATA = 0.3, 0.2
SD = 0.5  # sigma_data of c_skip (the papers' and DistillConfig's default)
SHAPE = (1, 2, 2)


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def table_levels(sched, t):
    """(alpha, EDM sigma, sigma_min) at integer timesteps ``t`` from the schedule's stored alpha_bar table, without
    ddpmkit.diffusion.distill: the independent side of the hand checks."""
    ab = sched.alpha_bar.double()
    alpha = ab[t].sqrt()
    return alpha, ((1 - ab[t]) / ab[t]).sqrt(), math.sqrt((1 - ab[0].item()) / ab[0].item())


def hand_c_skip(sigma, sigma_min, sd=SD):
    """Song et al. 2023, appendix C: c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2)."""
    return sd * sd / ((sigma - sigma_min) ** 2 + sd * sd)


def f_star(sched, z, t, mu=MU, s=S_DATA):
    """The exact consistency function of the Gaussian data at (z, t), as a clean image in x = z / alpha."""
    B = z.shape[0]
    t = torch.as_tensor(t).expand(B) if torch.as_tensor(t).ndim == 0 else torch.as_tensor(t)
    a, sig_t = (col(v) for v in alpha_sigma(sched, t))
    sigma_min = float(edm_sigma(sched, 0))
    x, sigma = z / a, sig_t / a
    return mu + math.sqrt(s * s + sigma_min ** 2) / (s * s + sigma * sigma).sqrt() * (x - mu)


def k_of(sched, t, mu=MU, s=S_DATA) -> float:
    """f*'s slope in x at an integer timestep t: sqrt(s^2 + sigma_min^2) / sqrt(s^2 + sigma_t^2)."""
    _, sigma, sigma_min = table_levels(sched, torch.tensor(t))
    return math.sqrt(s * s + sigma_min ** 2) / math.sqrt(s * s + sigma.item() ** 2)


def exact_net(sched, sd=SD, mu=MU, s=S_DATA):
    """A network (objective x0) whose consistency reading is exactly f*: x0_hat* = (f* - c_skip x) / (1 - c_skip),
    solved with the hand c_skip; at t = 0 (c_skip = 1) it says anything at all (here 1e3), which f ignores."""
    sigma_min = float(edm_sigma(sched, 0))

    def net(z, t):
        z = z.double()
        a, sig_t = (col(v) for v in alpha_sigma(sched, t))
        x, sigma = z / a, sig_t / a
        c = hand_c_skip(sigma, sigma_min, sd)
        one_minus = 1.0 - c
        at_min = one_minus == 0
        return torch.where(at_min, torch.full_like(x, 1e3),
                           (f_star(sched, z, t, mu, s) - c * x) / torch.where(at_min, torch.ones_like(x), one_minus))

    return net


def z_batch(B=16, seed=0, dtype=torch.float64):
    return torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------ 1. consistency_x0
def test_boundary_is_x_whatever_the_network_says(sched):
    """At t = 0 (sigma = sigma_min) f = x = z / alpha_0 exactly, for any x0_hat (huge, NaN-free), integer t or the
    real-valued 0.0 of the EDM level grid, in float64 and float32."""
    z = z_batch(8, seed=1)
    wild = 1e6 * z_batch(8, seed=2)
    alpha0 = alpha_sigma(sched, torch.tensor(0))[0]
    for t in (0, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.float64)):
        f = consistency_x0(wild, z, t, sched, SD)
        assert torch.equal(f, z / alpha0), t
        a_hand = table_levels(sched, torch.tensor(0))[0].item()
        assert (f - z / a_hand).abs().max().item() <= 1e-15 * (z / a_hand).abs().max().item()
    z32 = z.float()
    f32 = consistency_x0(wild.float(), z32, 0, sched, SD)
    assert f32.dtype == torch.float32 and torch.equal(f32, (z32.double() / alpha0).float())


@pytest.mark.parametrize("sd", [0.5, 1.0])
def test_hand_value_and_large_t(sched, sd):
    """At t = 500 (sigma 3.44) f = c x + (1 - c) x0_hat with the hand c_skip (to 1e-12; measured 0); at t = 999
    (sigma 157) c_skip < 5e-5 and f is x0_hat up to c_skip |x - x0_hat| (measured |f - x0_hat| = 3.5e-3 at
    sigma_d 0.5, 1.4e-2 at 1: |x| reaches 350, z ~ N(0, 1) over alpha_999 = 6.4e-3)."""
    z = z_batch(16, seed=3)
    x0_hat = torch.tanh(z_batch(16, seed=4))
    for t, c_max in ((500, None), (999, 5e-5)):
        alpha, sigma, sigma_min = table_levels(sched, torch.tensor(t))
        c = hand_c_skip(sigma.item(), sigma_min, sd)
        x = z / alpha.item()
        f = consistency_x0(x0_hat, z, t, sched, sd)
        want = c * x + (1 - c) * x0_hat
        assert (f - want).abs().max().item() < 1e-12 * max(1.0, x.abs().max().item()), t
        if c_max is not None:
            assert c < c_max
            assert (f - x0_hat).abs().max().item() <= c * (x - x0_hat).abs().max().item() * (1 + 1e-9) + 1e-15
            assert (f - x0_hat).abs().max().item() < 3e-2
    # the level is interpolated at real t: t = 500.0 is the grid's own value, and 500.5 lies between 500 and 501
    f_500 = consistency_x0(x0_hat, z, torch.full((16,), 500.0, dtype=torch.float64), sched, sd)
    assert (f_500 - consistency_x0(x0_hat, z, 500, sched, sd)).abs().max().item() < 1e-12
    f_mid = consistency_x0(x0_hat, z, torch.full((16,), 500.5, dtype=torch.float64), sched, sd)
    ab = sched.alpha_bar.double()
    ab_mid = math.exp(0.5 * (math.log(ab[500].item()) + math.log(ab[501].item())))
    c = hand_c_skip(math.sqrt((1 - ab_mid) / ab_mid), table_levels(sched, torch.tensor(0))[2], sd)
    want = c * z / math.sqrt(ab_mid) + (1 - c) * x0_hat
    assert (f_mid - want).abs().max().item() < 1e-12


def test_the_solved_network_output_gives_the_exact_consistency_function(sched):
    """For Gaussian data, x0_hat* = (f* - c_skip x) / (1 - c_skip) read through consistency_x0 is f* itself, at
    integer and real t across the range, per sample in one batch (float64; measured error 5.6e-17 at most, where
    the tolerance allows for 1 - c_skip = 2e-4 at t = 1)."""
    t_int = torch.tensor([1, 2, 10, 100, 500, 900, 999]).repeat_interleave(4)
    t_real = t_int.double() - 0.37
    net = exact_net(sched)
    for t in (t_int, t_real):
        z = z_batch(len(t), seed=5)
        f = consistency_x0(net(z, t), z, t, sched, SD)
        assert (f - f_star(sched, z, t)).abs().max().item() < 1e-12, t
    # f* is not the identity nor the denoiser: the check is not vacuous (x0_hat* differs from both by far)
    z = z_batch(28, seed=5)
    assert (net(z, t_int) - gaussian_x0(sched, MU, S_DATA)(z, t_int)).abs().max().item() > 0.1


# ------------------------------------------------------------------------------------------ 2. the Denoiser
def wild_net(z, t):
    """Any network at all: the Denoiser's reading is algebra, not a property of the data."""
    return torch.tanh(1.3 * z) + 1e-3 * col(t.double()).to(z.dtype)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_denoiser_reads_the_consistency_function(sched, objective):
    """Denoiser(consistency=sd).x0 is consistency_x0 of the plain Denoiser's x0 (bit-exact in float64), at integer
    and real-valued t mixed per sample; with clip_x0 it is that, clipped; its eps is the noise consistent with it
    (z = alpha x0 + sigma eps, to 1e-9 with the float32 coefficient tables); at t = 0 x0 = z / alpha_0."""
    plain = Denoiser(wild_net, sched, objective, clip_x0=False)
    cons = Denoiser(wild_net, sched, objective, clip_x0=False, consistency=SD)
    clipped = Denoiser(wild_net, sched, objective, clip_x0=True, consistency=SD)
    t_int = torch.tensor([0, 1, 40, 250, 600, 999]).repeat_interleave(2)
    for t in (t_int, t_int.double() * 0.999 + 0.25 * (t_int > 0)):
        z = 2 * z_batch(len(t), seed=6)
        want = consistency_x0(plain(z, t).x0, z, t, sched, SD)
        got = cons(z, t)
        assert got.x0.dtype == torch.float64 and torch.equal(got.x0, want), t
        assert torch.equal(clipped(z, t).x0, want.clamp(-1.0, 1.0))
        a, s = (col(v) for v in alpha_sigma(sched, t))
        tol = 1e-6 if t.dtype == torch.long else 1e-12  # measured 2.7e-7 (float32 tables) and 2.2e-16
        assert (a * got.x0 + s * got.eps - z).abs().max().item() < tol, t
        # float32 in, float32 out: the same to float32 rounding
        got32 = cons(z.float(), t)
        assert got32.x0.dtype == torch.float32
        assert (got32.x0.double() - want).abs().max().item() < 1e-5 * max(1.0, want.abs().max().item())
    # t = 0: whatever the network says, and no noise left (up to the float32 tables' rounding over sigma = 0.01 at
    # an integer t: measured 2.4e-5; exactly 0 at the real-valued 0.0)
    z = z_batch(4, seed=7)
    for t0, eps_tol in ((torch.zeros(4, dtype=torch.long), 1e-4), (torch.zeros(4, dtype=torch.float64), 1e-12)):
        assert torch.equal(cons(z, t0).x0, z / alpha_sigma(sched, t0)[0].view(-1, 1, 1, 1))
        assert cons(z, t0).eps.abs().max().item() < eps_tol


def test_a_respaced_consistency_denoiser_is_refused(sched):
    """The boundary is the full schedule's t = 0, which a respacing may skip: a respaced consistency Denoiser
    refuses to read (integer and real t), and so does the DDPM sampler at fewer steps (it respaces)."""
    den = Denoiser(exact_net(sched), sched, "x0", clip_x0=False, consistency=SD)
    tau = timesteps(T, 10, "trailing")
    resp = den.respaced(tau)
    z = z_batch(4, seed=8)
    with pytest.raises(ValueError, match="respaced"):
        resp(z, torch.full((4,), 3, dtype=torch.long))
    with pytest.raises(ValueError, match="respaced"):
        resp(z, torch.full((4,), 3.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="respaced"):
        sample(den, z.clone(), sampler="ddpm", steps=10, noise=0)
    assert den.respaced(np.arange(T)) is den  # every timestep: not respaced, and it reads
    assert torch.isfinite(den(z, torch.full((4,), 3, dtype=torch.long)).x0).all()


# ------------------------------------------------------------------------------------------ 3. the sampler
class CountingNoise(NoiseSource):
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.draws = 0

    def initial(self, shape, device=None):
        self.draws += 1
        return torch.randn(tuple(shape), generator=self.g)


def exact_consistency_denoiser(sched):
    return Denoiser(exact_net(sched), sched, "x0", clip_x0=False, consistency=SD)


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_sampler_is_algorithm_1_step_by_step(sched, steps):
    """x0 = f*(x_T at T-1); then fresh noise to the next lower trailing timestep and x0 = f* there, ...; the last
    x0 is returned. One network call per visited timestep, K - 1 noise draws, the callback's (t, x, x0) as said.
    Reproduced by hand from the same noise stream to 1e-12."""
    den = exact_consistency_denoiser(sched)
    tau = timesteps(T, steps, "trailing")
    x_T = z_batch(32, seed=9)
    noise = CountingNoise(11)
    seen = []
    x = sample(den, x_T.clone(), sampler="consistency", steps=steps, spacing="trailing", noise=noise,
               callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.clone())))
    assert noise.draws == steps - 1
    assert [(i, t) for i, t, _, _ in seen] == [(i, int(tau[-1 - i])) for i in range(steps)]
    g = torch.Generator().manual_seed(11)
    z = x_T
    for k in range(steps - 1, -1, -1):
        x0 = f_star(sched, z, int(tau[k]))
        if k > 0:
            ab = sched.alpha_bar.double()[int(tau[k - 1])].item()
            z = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * torch.randn(x_T.shape, generator=g)
    assert x.dtype == torch.float64
    assert (x - x0).abs().max().item() < 1e-12
    assert torch.equal(seen[-1][2], x) and torch.equal(seen[-1][3], x)


N_LAW = 4096  # samples of 4 independent values each: 16384 values per law check


def test_sampler_draws_the_law_of_the_exact_consistency_model(sched):
    """From x_T ~ N(0, I) with the exact consistency model (an affine map per step):

    1 step: y1 = mu + k1 (x_T / alpha_999 - mu) ~ N(mu (1 - k1), (k1 / alpha_999)^2);
    2 steps (999, 499): y2 = mu + k2 (y1 + sigma_499 eps - mu) ~ N(mu + k2 (m1 - mu), k2^2 (v1 + sigma_499^2)),
    both within 1e-3 of the data law at sigma_min, N(mu, s^2 + sigma_min^2) (x_T ~ N(0, I) is not quite the true
    marginal at T-1: measured mean off by 3.8e-4 after 1 step, 2.2e-5 after 2; sd by 3.9e-6 and 8.6e-7). The
    sample mean and sd of 16384 values lie within 4 standard errors (sd / sqrt(n) and sd / sqrt(2 n), 1.6e-3 and
    1.1e-3) of the closed form; measured 0.2 and 2.0 standard errors for 1 step (the sd's is x_T's own sample sd,
    y1 being affine in x_T), 0.5 and 1.5 for 2."""
    den = exact_consistency_denoiser(sched)
    alpha1, _, sigma_min = table_levels(sched, torch.tensor(T - 1))
    _, sigma2, _ = table_levels(sched, torch.tensor(499))
    k1, k2 = k_of(sched, T - 1), k_of(sched, 499)
    m1, v1 = MU * (1 - k1), (k1 / alpha1.item()) ** 2
    m2, v2 = MU + k2 * (m1 - MU), k2 ** 2 * (v1 + sigma2.item() ** 2)
    data_sd = math.sqrt(S_DATA ** 2 + sigma_min ** 2)
    for m, v in ((m1, v1), (m2, v2)):
        assert abs(m - MU) < 1e-3 and abs(math.sqrt(v) - data_sd) < 1e-3, (m, v)
    n = N_LAW * 4
    for steps, (m, v) in ((1, (m1, v1)), (2, (m2, v2))):
        g = torch.Generator().manual_seed(20 + steps)
        x_T = torch.randn(N_LAW, *SHAPE, generator=g, dtype=torch.float64)
        y = sample(den, x_T, sampler="consistency", steps=steps, spacing="trailing", noise=g)
        se_m, se_s = math.sqrt(v / n), math.sqrt(v / (2 * n))
        assert abs(y.mean().item() - m) < 4 * se_m, (steps, y.mean().item(), m, se_m)
        assert abs(y.std().item() - math.sqrt(v)) < 4 * se_s, (steps, y.std().item(), math.sqrt(v), se_s)


def test_sampler_seeds_and_per_sample_streams(sched):
    """The same seed gives the same samples, another seed others; with an int seed (per-sample streams) an image
    depends on its own stream only: batches of 2 and 4 give the batch of 6. More steps draw other samples."""
    den = exact_consistency_denoiser(sched)
    kw = dict(sampler="consistency", steps=3, spacing="trailing")
    a = sample(den, (6, *SHAPE), noise=5, **kw)
    assert torch.equal(a, sample(den, (6, *SHAPE), noise=5, **kw))
    assert not torch.equal(a, sample(den, (6, *SHAPE), noise=6, **kw))
    parts = [sample(den, (n, *SHAPE), noise=PerSampleNoise(5, start=i), **kw) for i, n in ((0, 2), (2, 4))]
    assert torch.equal(torch.cat(parts), a)
    one = sample(den, (6, *SHAPE), noise=5, sampler="consistency", steps=1, spacing="trailing")
    assert (one - a).abs().amax(dim=(1, 2, 3)).gt(1e-3).all()  # the fresh noise of steps 2 and 3 moved each image


# ------------------------------------------------------------------------------------------ 4. trained on Gaussians
N_LEVELS = 10
# How close the trained student's f comes to the exact-teacher Heun chain over the same levels (max abs over
# 256 x 4 values, at every level): measured at most 2.3e-9 over seeds 0..3 (the loss has an exact zero: the
# teacher is exact, so the target is a deterministic function of z); the tolerance leaves ~500x of margin.
CHAIN_TOL = 1e-6
# The Heun chain itself misses the exact ODE map f* at the top level by 0.166 (max abs over the 256 draws of
# top_errors; f*'s sd is 0.20, the chain's slope is off by 26%): 10 Karras levels from sigma 157 to 0.01 are
# coarse around sigma ~ s = 0.2 (0.87 -> 0.27 -> 0.06); about 0.05 at 18 levels, 0.01 at 40 (order 2). The
# student can do no better than its teacher's solver: it must lie within CHAIN_TOL of that error.
HEUN_ERR = (0.15, 0.19)


def cd_levels(sched):
    """The N + 1 EDM-spaced real timesteps from 0 to T - 1 (the task's self.levels)."""
    return torch.from_numpy(timesteps(sched, N_LEVELS + 1, "karras", integer=False).astype("float64"))


class LevelAffine(torch.nn.Module):
    """x0_hat = a_n z + b_n at level n of the grid (asked only on it); initialised as the teacher (the exact
    denoiser is affine in z), as DistillTask starts its student from the teacher's weights."""

    def __init__(self, sched, levels):
        super().__init__()
        self.levels = levels
        a, s = alpha_sigma(sched, levels)
        A = a * S_DATA ** 2 / (a * a * S_DATA ** 2 + s * s)
        self.a = torch.nn.Parameter(A.clone())
        self.b = torch.nn.Parameter(MU - A * a * MU)

    def forward(self, z, t):
        i = torch.searchsorted(self.levels, t.contiguous())
        assert torch.equal(self.levels[i], t), "asked off the level grid"
        return col(self.a[i]) * z + col(self.b[i])


def f_of(sched, net):
    """The consistency function of an x0-predicting network."""
    return lambda z, t: consistency_x0(net(z, t), z, t, sched, SD)


def heun_chain(sched, levels, z, n):
    """The exact teacher's Heun steps from level n down to level 0 (t = 0), as a clean image z / alpha_0."""
    teacher = gaussian_x0(sched, MU, S_DATA)
    for k in range(n, 0, -1):
        z = heun_step(teacher, z, levels[k], levels[k - 1], sched)
    return z / alpha_sigma(sched, torch.tensor(0.0))[0]


def skip_teacher_target(teacher_x0, target_f, z, t_hi, t_lo, schedule):
    """Broken: the target network's f at (z, t_hi) itself, no teacher ODE step."""
    with torch.no_grad():
        return target_f(z, t_hi)


def euler_target(teacher_x0, target_f, z, t_hi, t_lo, schedule):
    """Broken differently: a first-order (Euler) teacher step instead of Heun's."""
    (a_t, sd_t), (a_s, sd_s) = alpha_sigma(schedule, t_hi), alpha_sigma(schedule, t_lo)
    with torch.no_grad():
        x = z / col(a_t)
        d = (x - teacher_x0(z, t_hi)) / col(sd_t / a_t)
        return target_f(col(a_s) * (x + col(sd_s / a_s - sd_t / a_t) * d), t_lo)


def train_cd(sched, target_fn=consistency_target, steps=1000, lr=0.05, batch=64, mu_ema=0.95, seed=0):
    """Song et al. 2023, alg. 2 on Gaussian batches: n ~ U{0..N-1}, z at level n + 1, target = the EMA target's f
    after one teacher step to level n, squared L2, Adam with the learning rate decaying linearly to 0, and the
    target updated after each step: theta^- <- mu theta^- + (1 - mu) theta."""
    levels = cd_levels(sched)
    g = torch.Generator().manual_seed(seed)
    student, target = LevelAffine(sched, levels), LevelAffine(sched, levels)
    target.requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps)
    teacher = gaussian_x0(sched, MU, S_DATA)
    for _ in range(steps):
        x0 = MU + S_DATA * torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
        noise = torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64)
        n = torch.randint(0, N_LEVELS, (batch,), generator=g)
        t_hi, t_lo = levels[n + 1], levels[n]
        a, s = (col(v) for v in alpha_sigma(sched, t_hi))
        z = a * x0 + s * noise
        goal = target_fn(teacher, f_of(sched, target), z, t_hi, t_lo, sched)
        loss = (f_of(sched, student)(z, t_hi) - goal).pow(2).flatten(1).mean(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        with torch.no_grad():
            for p_t, p_s in zip(target.parameters(), student.parameters()):
                p_t.mul_(mu_ema).add_(p_s, alpha=1 - mu_ema)
    return student, levels


def top_errors(sched, student, levels):
    """(max distance to the Heun chain over every level, top level's max distance to f*) over 256 draws."""
    z = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    f = f_of(sched, student)
    with torch.no_grad():
        chain = max((f(z, levels[n].expand(256)) - heun_chain(sched, levels, z, n)).abs().max().item()
                    for n in range(1, N_LEVELS + 1))
        top = levels[-1].expand(256)
        exact = (f(z, top) - f_star(sched, z, top)).abs().max().item()
    return chain, exact


def test_trained_consistency_model_is_the_teachers_ode_solution(sched):
    """Trained from the teacher with consistency_target, the student's f at every level is the exact teacher's
    Heun chain down to t = 0 (to CHAIN_TOL); at the top level that is f* up to the Heun chain's own error, which
    is the bound: |f - f*| = the chain's |chain - f*| (0.166) to within CHAIN_TOL. Before training the student is
    the teacher's one-step x0 estimate, far from both."""
    levels = cd_levels(sched)
    z = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    top = levels[-1].expand(256)
    heun_err = (heun_chain(sched, levels, z, N_LEVELS) - f_star(sched, z, top)).abs().max().item()
    assert HEUN_ERR[0] < heun_err < HEUN_ERR[1], heun_err
    untrained = top_errors(sched, LevelAffine(sched, levels), levels)
    assert untrained[0] > 0.5, untrained

    student, levels = train_cd(sched)
    chain, exact = top_errors(sched, student, levels)
    assert chain < CHAIN_TOL, chain
    assert abs(exact - heun_err) < CHAIN_TOL, (exact, heun_err)


@pytest.mark.parametrize("target_fn,least", [(skip_teacher_target, 0.5), (euler_target, 0.3)],
                         ids=["no-teacher-step", "euler-step"])
def test_a_broken_target_fails_the_check(sched, target_fn, least):
    """The same training with a broken target misses the Heun chain by far more than CHAIN_TOL. Without the teacher
    step the loss pulls f towards its own EMA, which starts equal to it: nothing moves and the student stays the
    teacher's one-step estimate (measured 0.81 from the chain, 0.64 from f* at the top). With a first-order (Euler)
    teacher step it learns the Euler chain instead (measured 0.60 from the Heun chain at its worst level); note
    that its top level is 0.15 from f*, no worse than the Heun chain's 0.166: only the comparison with the
    teacher's own Heun chain catches this break, not the one with f*."""
    student, levels = train_cd(sched, target_fn, steps=300)
    chain, exact = top_errors(sched, student, levels)
    assert chain > least, chain
    assert chain > 1e4 * CHAIN_TOL


# ------------------------------------------------------------------------------------------ 5. end to end
CD_FLAGS = ["--method", "consistency", "--steps", "1", "--round-steps", "4", "--batch-size", "16"]


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("student") / "D"
    assert main(["distill", str(teacher), *CD_FLAGS, "--out", str(out), "--quiet"]) == 0
    return out


def test_consistency_distillation_end_to_end(student, teacher, capsys):
    d = json.loads((student / "config.json").read_text())["distill"]
    assert d["method"] == "consistency" and d["sampler"] == "consistency" and d["spacing"] == "trailing"
    assert d["steps"] == d["reached_steps"] == 1
    assert d["consistency"]["sigma_data"] == 0.5 and d["consistency"]["levels"] == 18
    run = Run.open(student)
    assert run.sampling_defaults() == {"sampler": "consistency", "steps": 1, "spacing": "trailing"}
    assert run.consistency_sigma_data == 0.5
    assert run.denoiser().consistency == 0.5

    ck = load_checkpoint(student)
    assert ck.step == 4
    dd = ck.train_state["distill"]
    assert set(dd["target"]) == set(ck.model_state) and dd["target_due"] is True
    original = Run.open(teacher).load_model(ema=True).state_dict()
    moved = [k for k in ck.model_state if not torch.equal(ck.model_state[k], dd["target"][k])]
    assert moved, "the target network is a lagging EMA of the student, not the student"
    assert any(not torch.equal(original[k], dd["target"][k]) for k in original), "the target never moved"
    for k in original:  # the frozen teacher is the original's EMA weights still
        assert torch.equal(dd["teacher"][k], original[k]), k

    for steps, folder in ((None, "consistency-1-trailing"), ("2", "consistency-2-trailing")):
        capsys.readouterr()
        extra = [] if steps is None else ["--steps", steps]
        assert main(["sample", str(student), "--n", "2", "--quiet", *extra]) == 0
        dirs = [p for p in (student / "samples").iterdir() if p.name.startswith(folder)]
        assert len(dirs) == 1, sorted(p.name for p in (student / "samples").iterdir())
        assert len(list(dirs[0].glob("*.png"))) >= 2


@pytest.mark.parametrize("command", [["sample", "--sampler", "ddpm", "--steps", "10", "--n", "2", "--quiet"],
                                     ["inpaint", "--image", "digits:17", "--mask", "bottom-half", "--n", "1",
                                      "--steps", "20"]])
def test_respacing_commands_refuse_a_consistency_student_in_one_line(student, capsys, command):
    """The ddpm sampler below T steps and RePaint respace the schedule, which a consistency reading refuses: the
    command says so in one line and writes nothing."""
    before = sorted(p.relative_to(student) for p in student.rglob("*"))
    capsys.readouterr()
    assert main([command[0], str(student), *command[1:]]) == 2
    one_error_line(capsys, "consistency-distilled", "respaced")
    assert sorted(p.relative_to(student) for p in student.rglob("*")) == before


def distill_cfg(teacher, **kw) -> DistillConfig:
    return DistillConfig.from_teacher(TrainConfig.from_json(Run.open(teacher).config), str(teacher),
                                      method="consistency", student_steps=1, round_steps=4, batch_size=16,
                                      guidance=DEFAULT_GUIDANCE, **kw)


def test_target_is_the_ema_and_resume_is_bit_exact(teacher, tmp_path):
    """A: 4 steps straight, a checkpoint at each; the target in checkpoint k is mu target_{k-1} + (1 - mu)
    student_{k-1} (its update for step k - 1 is applied before step k), bit-exact, and the teacher's weights at k = 1.
    B: steps 0-2 in one session, 2-4 through `ddpmkit distill --resume` (the pending target update is state): the
    student and the target end identical to A's."""
    a, b = tmp_path / "A", tmp_path / "B"
    assert main(["distill", str(teacher), *CD_FLAGS, "--checkpoint-every", "1", "--keep", "10", "--out", str(a),
                 "--quiet"]) == 0
    cks = [load_checkpoint(a / "checkpoints" / f"step_{k:09d}") for k in range(1, 5)]
    params = {n for n, _ in Run.open(teacher).load_model(ema=True).named_parameters()}
    original = Run.open(teacher).load_model(ema=True).state_dict()
    mu = 0.95
    for k in params:
        assert torch.equal(cks[0].train_state["distill"]["target"][k], original[k]), k
    # after one step the student has moved and the target (due for its update) has not
    assert cks[0].train_state["distill"]["target_due"] is True
    assert any(not torch.equal(cks[0].model_state[k], original[k]) for k in params)
    for prev, ck in zip(cks[:-1], cks[1:]):
        tgt, tgt_prev, stu_prev = (ck.train_state["distill"]["target"], prev.train_state["distill"]["target"],
                                   prev.model_state)
        for k in tgt:
            want = tgt_prev[k].clone().mul_(mu).add_(stu_prev[k], alpha=1 - mu) if k in params else stu_prev[k]
            assert torch.equal(tgt[k], want), (ck.step, k)

    loop = TrainingLoop(DistillTask, distill_cfg(teacher), b, quiet=True)
    assert loop.cfg.steps == 4
    loop.cfg.steps = 2  # stop early: run() checkpoints at its end
    assert loop.run()["step"] == 2
    assert load_checkpoint(b).train_state["distill"]["target_due"] is True
    assert main(["distill", "--out", str(b), "--resume", "--quiet"]) == 0
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step == 4
    assert set(ca.model_state) == set(cb.model_state)
    ta, tb = ca.train_state["distill"]["target"], cb.train_state["distill"]["target"]
    for k in ca.model_state:
        assert torch.equal(ca.model_state[k], cb.model_state[k]), k
        assert torch.equal(ta[k], tb[k]), k
    assert read_config(b)["distill"]["sampler"] == "consistency"


ERRORS = [(["--method", "nope"], ["--method", "nope"]),
          (["--target-ema", "1.5"], ["--target-ema"]),
          (["--target-ema", "1"], ["--target-ema"]),
          (["--sigma-data", "0"], ["--sigma-data"]),
          (["--cd-levels", "0"], ["--cd-levels"]),
          (["--cd-levels", "41"], ["--cd-levels"])]


@pytest.mark.parametrize("flags,words", ERRORS, ids=[" ".join(f) for f, _ in ERRORS])
def test_bad_requests_are_one_line_and_write_nothing(teacher, flags, words, tmp_path, capsys):
    out = tmp_path / "out"
    base = [f for f in CD_FLAGS if f not in ("--method", "consistency")] if flags[0] == "--method" else CD_FLAGS
    capsys.readouterr()
    assert main(["distill", str(teacher), *base, *flags, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpmkit: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
