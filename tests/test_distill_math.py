"""The mathematics of distillation against closed forms (ddpmkit.diffusion.distill).

Gaussian data x0 ~ N(mu, s^2) (each dimension independent): the exact denoiser is
E[x0 | z_t] = mu + alpha s^2 (z_t - alpha mu) / (alpha^2 s^2 + sigma^2), and the probability-flow ODE keeps
(z_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant; in EDM's variables x = z / alpha that is
(x - mu) / sqrt(s^2 + sigma^2), so the ODE map from level sigma_a to sigma_b is
mu + sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2) (x - mu), and the clean end (sigma = 0) is its limit.
Everything runs in float64.
"""

import math

import numpy as np
import pytest
import torch

from conftest import ddim_trajectory, gaussian_eps, gaussian_x0

from ddpmkit.diffusion import Denoiser, NoiseSchedule
from ddpmkit.diffusion.distill import (END, alpha_sigma, consistency_function, consistency_scalings,
                                       consistency_target, ddim_step, edm_sigma, heun_step, progressive_target,
                                       progressive_triples, student_grid, teacher_grid, truncated_snr_weight)
from ddpmkit.samplers import sample, timesteps
from ddpmkit.samplers.heun import heun

T = 1000
MU, S_DATA = 0.3, 0.2


@pytest.fixture(scope="module")
def sched():
    return NoiseSchedule.linear(T)


def ode_map(sched, z, t_from, t_to, mu=MU, s=S_DATA):
    """The exact probability-flow ODE map of Gaussian data from t_from to t_to (END: the clean image)."""
    a, sig = (v.view(-1, 1, 1, 1) for v in alpha_sigma(sched, torch.as_tensor(t_from).expand(z.shape[0])))
    b, sb = (v.view(-1, 1, 1, 1) for v in alpha_sigma(sched, torch.as_tensor(t_to).expand(z.shape[0])))
    w = (z - a * mu) / (a * a * s * s + sig * sig).sqrt()
    return b * mu + (b * b * s * s + sb * sb).sqrt() * w


def z_batch(B=16, seed=0):
    return torch.randn(B, 1, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def nonlinear_x0(z, t):
    """Any teacher at all: the identity of progressive distillation is algebra, not a property of the data."""
    return torch.tanh(1.7 * z) + 1e-3 * t.double().view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------------------ progressive
# (t, t_mid, t_next), the last two rows ending at the clean image
TRIPLES = [(999, 749, 499), (600, 300, 10), (249, 124, 0), (124, 60, END), (999, 499, END), (3, 1, END)]


def two_teacher_steps(teacher, sched, z, t, tm, tn):
    (a_t, s_t), (a_m, s_m), (a_n, s_n) = (alpha_sigma(sched, v) for v in (t, tm, tn))
    z_m = ddim_step(teacher(z, t), z, a_t, s_t, a_m, s_m)
    return ddim_step(teacher(z_m, tm), z_m, a_m, s_m, a_n, s_n)


@pytest.mark.parametrize("teacher_kind", ["gaussian", "nonlinear"])
def test_optimal_student_step_is_two_teacher_steps(sched, teacher_kind):
    """One student DDIM step with x0 = x_tilde lands where two teacher DDIM steps land, per sample, for several
    (t, t_mid, t_next) mixed in one batch, including the last step to x0."""
    teacher = gaussian_x0(sched, MU, S_DATA) if teacher_kind == "gaussian" else nonlinear_x0
    reps = 4
    t, tm, tn = (torch.tensor([row[k] for row in TRIPLES for _ in range(reps)]) for k in range(3))
    z = z_batch(len(t), seed=1)
    x_tilde = progressive_target(teacher, z, t, tm, tn, sched)
    (a_t, s_t), (a_n, s_n) = alpha_sigma(sched, t), alpha_sigma(sched, tn)
    student = ddim_step(x_tilde, z, a_t, s_t, a_n, s_n)
    teacher_two = two_teacher_steps(teacher, sched, z, t, tm, tn)
    assert student.dtype == torch.float64
    assert (student - teacher_two).abs().max().item() < 1e-12
    # at the last step x_tilde is the teacher's x0_hat at t_mid (the paper's x_tilde = z_t'' when sigma_t'' = 0)
    end = tn == END
    a_m, s_m = alpha_sigma(sched, tm[end])
    z_m = ddim_step(teacher(z[end], t[end]), z[end], a_t[end], s_t[end], a_m, s_m)
    assert torch.equal(x_tilde[end], teacher(z_m, tm[end]))


def one_teacher_step_target(teacher, z, t, tm, tn, sched):
    """The broken target: x_tilde from ONE teacher DDIM step t -> t_next instead of two (the negative control)."""
    (a_t, s_t), (a_n, s_n) = alpha_sigma(sched, t), alpha_sigma(sched, tn)
    z_n = ddim_step(teacher(z, t), z, a_t, s_t, a_n, s_n)
    r = (s_n / s_t).view(-1, 1, 1, 1)
    return (z_n - r * z) / (a_n - s_n / s_t * a_t).view(-1, 1, 1, 1)


def test_one_teacher_step_target_fails_the_identity(sched):
    """The identity above is sensitive: a target built from a single teacher step misses two steps by far."""
    teacher = gaussian_x0(sched, MU, S_DATA)
    t, tm, tn = (torch.tensor([row[k] for row in TRIPLES]) for k in range(3))
    z = z_batch(len(t), seed=2)
    (a_t, s_t), (a_n, s_n) = alpha_sigma(sched, t), alpha_sigma(sched, tn)
    wrong = ddim_step(one_teacher_step_target(teacher, z, t, tm, tn, sched), z, a_t, s_t, a_n, s_n)
    assert (wrong - two_teacher_steps(teacher, sched, z, t, tm, tn)).abs().max().item() > 1e-3


def test_target_keeps_dtype_and_refuses_bad_order(sched):
    z = z_batch(4).float()
    x = progressive_target(lambda z, t: 0.5 * z, z, 999, 499, END, sched)
    assert x.dtype == torch.float32 and x.shape == z.shape
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        progressive_target(nonlinear_x0, z, 499, 999, END, sched)
    with pytest.raises(ValueError, match="t > t_mid > t_next"):
        progressive_target(nonlinear_x0, z, 999, END, END, sched)
    with pytest.raises(ValueError, match=r"lie in \[0, 999\]"):
        progressive_target(nonlinear_x0, z, 1000, 499, END, sched)


def test_grids_nest_and_match_trailing():
    for N in (1, 2, 3, 4, 7, 8, 250, 500):
        tau = student_grid(T, N)
        assert tau[-1] == T - 1 and len(np.unique(tau)) == N
        assert np.array_equal(tau, timesteps(T, N, "trailing"))  # the DDIM sampler's trailing spacing runs it
        tau2 = teacher_grid(T, N)
        assert np.array_equal(tau2, student_grid(T, 2 * N)) and np.array_equal(tau2[1::2], tau)
        t, tm, tn = progressive_triples(T, N)
        assert np.array_equal(t, tau) and tn[0] == END and np.array_equal(tn[1:], tau[:-1])
        assert np.all(t > tm) and np.all(tm > tn)
    assert student_grid(T, 4).tolist() == [249, 499, 749, 999]
    assert teacher_grid(T, 4).tolist() == [124, 249, 374, 499, 624, 749, 874, 999]
    with pytest.raises(ValueError, match="teacher of 1002"):
        teacher_grid(T, 501)
    with pytest.raises(ValueError, match="steps must be"):
        student_grid(T, 0)


def optimal_student(teacher, N, sched):
    """The student of N steps that minimises the distillation loss: its x0_hat at a student timestep is x_tilde."""
    t_grid, tm, tn = (torch.from_numpy(a) for a in progressive_triples(T, N))

    def x0(z, t):
        i = torch.searchsorted(t_grid, t)
        assert torch.equal(t_grid[i], t), "the student is asked only on its grid"
        return progressive_target(teacher, z, t, tm[i], tn[i], sched)

    return x0


def test_rounds_of_halving_keep_the_teachers_trajectory(sched):
    """8 -> 4 -> 2 -> 1 steps: each round's optimal student (computed from the previous round's sampler) follows its
    teacher's DDIM trajectory at every one of its own timesteps; the 1-step result is the 8-step teacher's, and its
    distance to the exact ODE map is the 8-step DDIM error (measured: 0.368 max, 0.114 rms over 64 x 4 values, data sd
    0.2; see test_ddim_to_the_exact_ode_map_first_order for how it falls with the teacher's steps)."""
    z_T = z_batch(64, seed=3)
    teacher, N = gaussian_x0(sched, MU, S_DATA), 8
    first = ddim_trajectory(teacher, z_T, student_grid(T, N), sched)
    traj = first
    while N > 1:
        N //= 2
        student = optimal_student(teacher, N, sched)
        s_traj = ddim_trajectory(student, z_T, student_grid(T, N), sched)
        # the teacher's trajectory is [z_T, z at grid[2N-2], ..., z at grid[0], x0]: the student's are every other
        for k, z in enumerate(s_traj):
            assert (z - traj[2 * k]).abs().max().item() < 1e-12, (N, k)
        teacher, traj = student, s_traj
    assert len(traj) == 2
    assert (traj[-1] - first[-1]).abs().max().item() < 1e-12
    err = (traj[-1] - ode_map(sched, z_T, T - 1, END)).abs().max().item()
    assert 0.3 < err < 0.45, err  # 0.368 (rms 0.114, data sd 0.2): 8 DDIM steps of the teacher, not the student's
    # and the existing DDIM sampler runs the 1-step student as it is, on the trailing spacing
    den = Denoiser(lambda z, t: teacher(z, t), sched, objective="x0", clip_x0=False)
    x = sample(den, z_T.clone(), sampler="ddim", steps=1, spacing="trailing")
    assert (x - traj[-1]).abs().max().item() < 1e-12


def test_ddim_to_the_exact_ode_map_first_order(sched):
    """DDIM (eta = 0) with the exact denoiser converges to the exact ODE map on the student grids: the optimal
    student of N steps inherits the 2N-step teacher's error, which halves with each doubling (order 1)."""
    z_T = z_batch(64, seed=4)
    exact = ode_map(sched, z_T, T - 1, END)
    steps = (16, 32, 64, 128)
    teacher = gaussian_x0(sched, MU, S_DATA)
    errs = [(ddim_trajectory(teacher, z_T, student_grid(T, S), sched)[-1] - exact).abs().max().item() for S in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - 1) < 0.2, (slope, errs)


def test_truncated_snr_weight_hand_values():
    alpha = torch.tensor([0.8, 0.5, 0.2, 0.999], dtype=torch.float64).sqrt()
    sigma = (1 - alpha ** 2).sqrt()
    w = truncated_snr_weight(alpha, sigma)
    assert w.dtype == torch.float64
    assert torch.allclose(w, torch.tensor([4.0, 1.0, 1.0, 999.0], dtype=torch.float64), rtol=1e-6)
    assert truncated_snr_weight(3.0, 1.0).item() == 9.0 and truncated_snr_weight(1.0, 3.0).item() == 1.0
    # SNR + 1 is the v-loss: (1 + SNR) ||x - x_hat||^2 = ||v - v_hat||^2, and max(SNR, 1) is within 2x of it
    g = torch.Generator().manual_seed(5)
    x, eps, x_hat = (torch.randn(4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a, s = alpha.double().view(-1, 1), sigma.double().view(-1, 1)
    z = a * x + s * eps
    eps_hat = (z - a * x_hat) / s  # the noise consistent with x_hat
    v, v_hat = a * eps - s * x, a * eps_hat - s * x_hat  # Salimans & Ho 2022, sec. 4: v = alpha eps - sigma x
    snr = (a / s) ** 2
    x_loss = ((x - x_hat) ** 2).sum(1, keepdim=True)
    assert torch.allclose((1 + snr) * x_loss, ((v - v_hat) ** 2).sum(1, keepdim=True), rtol=1e-10)
    ratio = (1 + snr) / truncated_snr_weight(a, s)
    assert bool(((ratio >= 1) & (ratio <= 2)).all())


# ------------------------------------------------------------------------------------------ consistency
@pytest.mark.parametrize("sigma_data,sigma_min", [(0.5, 0.002), (1.0, 0.01), (0.3, 0.0)])
def test_consistency_boundary_is_exact(sigma_data, sigma_min):
    c_skip, c_out = consistency_scalings(sigma_min, sigma_data, sigma_min)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    x = z_batch(4)
    F = 1e6 * z_batch(4, seed=9)  # whatever the network says
    assert torch.equal(consistency_function(x, sigma_min, F, sigma_data, sigma_min), x)
    # hand values at sigma = sigma_min + sigma_data: c_skip = 1/2, c_out = sigma_data^2 / sqrt(sigma_data^2 + sigma^2)
    sig = sigma_min + sigma_data
    c_skip, c_out = consistency_scalings(sig, sigma_data, sigma_min)
    assert math.isclose(c_skip.item(), 0.5, rel_tol=1e-15)
    assert math.isclose(c_out.item(), sigma_data ** 2 / math.sqrt(sigma_data ** 2 + sig ** 2), rel_tol=1e-15)
    with pytest.raises(ValueError, match="sigma >= sigma_min"):
        consistency_scalings(sigma_min / 2 if sigma_min > 0 else -1.0, sigma_data, sigma_min)


def test_exact_consistency_function_in_the_parameterisation(sched):
    """The exact consistency function of Gaussian data, f*(x, sigma) = the ODE map to sigma_min, is c_skip x + c_out F
    with F* = (f* - c_skip x) / c_out bounded as sigma falls to sigma_min (its limit is finite: no blow-up at the
    boundary), and f* is self-consistent along the ODE."""
    sigma_min = edm_sigma(sched, torch.tensor(0)).item()  # 0.0100: the least noise level of the discrete schedule
    x = z_batch(16, seed=6) + MU

    def f_star(x, sig):
        return MU + math.sqrt(S_DATA ** 2 + sigma_min ** 2) / math.sqrt(S_DATA ** 2 + sig ** 2) * (x - MU)

    F_at = {}
    for sig in (sigma_min * (1 + 1e-3), sigma_min * (1 + 1e-5), 0.5, 80.0):
        c_skip, c_out = consistency_scalings(sig, 0.5, sigma_min)
        F = (f_star(x, sig) - c_skip * x) / c_out
        assert torch.allclose(consistency_function(x, sig, F, 0.5, sigma_min), f_star(x, sig), rtol=0, atol=1e-12)
        F_at[sig] = F
    near, nearer = F_at[sigma_min * (1 + 1e-3)], F_at[sigma_min * (1 + 1e-5)]
    assert (near - nearer).abs().max().item() < 1e-3 * near.abs().max().item()


def test_heun_step_is_the_samplers_step(sched):
    """heun_step per sample reproduces the first step of ddpmkit.samplers.heun (a grid of two timesteps)."""
    den = Denoiser(lambda z, t: gaussian_eps(sched, MU, S_DATA)(z, t), sched, clip_x0=False)
    z = z_batch(8, seed=7)
    got = {}
    heun(den, z.clone(), np.array([200, 700]), noise=None, callback=lambda i, t, x, x0: got.setdefault(i, x))

    def x0_of_eps(z, t):  # the Denoiser's eps read as x0 with float64 levels (its own x0 uses float32 coefficients)
        a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(sched, t))
        return (z - s * den(z, t).eps) / a

    mine = heun_step(x0_of_eps, z, 700, 200, sched)
    assert (mine - got[0]).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="not END"):
        heun_step(gaussian_x0(sched, MU, S_DATA), z, 700, END, sched)


def test_heun_teacher_converges_to_the_ode_map_at_order_two(sched):
    """Chained consistency-distillation teacher steps (Heun) over N Karras levels from t = T-1 to t = 0 converge to
    the exact ODE map at order 2; one step's error is O(h^3) (order 3 locally). The grids are real-valued timesteps;
    samples carry different steps of the chain in one batch to exercise per-sample levels."""
    z_T = z_batch(32, seed=8)
    exact = ode_map(sched, z_T, float(T - 1), 0.0)
    steps, errs = (20, 40, 80), []
    for S in steps:
        grid = torch.from_numpy(timesteps(sched, S, "karras", integer=False)[::-1].copy())  # noisiest first
        z = z_T
        for n in range(S - 1):
            z = heun_step(gaussian_x0(sched, MU, S_DATA), z, grid[n], grid[n + 1], sched)
        errs.append((z - exact).abs().max().item())
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    assert abs(slope - 2) < 0.3, (slope, errs)
    # locally: one step from t = 600 to 600 - h, per sample (a mixed batch of h), error against the exact map
    hs = torch.tensor([80.0, 40.0, 20.0, 10.0], dtype=torch.float64).repeat_interleave(8)
    t = torch.full_like(hs, 600.0)
    z = z_batch(8, seed=10).repeat(4, 1, 1, 1)  # the same 8 samples at each h
    local = (heun_step(gaussian_x0(sched, MU, S_DATA), z, t, t - hs, sched) - ode_map(sched, z, t, t - hs)).abs()
    local = local.flatten(1).max(1).values.view(4, 8).max(1).values
    order = np.polyfit(np.log([80, 40, 20, 10]), np.log(local.numpy()), 1)[0]
    assert abs(order - 3) < 0.3, (order, local)


def test_consistency_target_with_exact_pieces(sched):
    """With the exact teacher and the exact consistency function as the target network, the target at (z_{n+1},
    sigma_{n+1}) equals f*(z_{n+1}) up to the Heun step's local error: the CD loss is ~0 at the optimum."""
    sigma_min = edm_sigma(sched, torch.tensor(0)).item()

    def f_star(z, t):  # the ODE map to t = 0 (sigma_min), as a clean-image estimate in x = z / alpha
        a0, _ = alpha_sigma(sched, torch.zeros_like(t))
        return ode_map(sched, z, t, torch.zeros_like(t)) / a0.view(-1, 1, 1, 1)

    z = z_batch(8, seed=11)
    t = torch.full((8,), 500.0, dtype=torch.float64)
    for h, tol in ((40.0, 3e-5), (5.0, 1e-7)):
        target = consistency_target(gaussian_x0(sched, MU, S_DATA), f_star, z, t, t - h, sched)
        assert (target - f_star(z, t)).abs().max().item() < tol, h
    assert sigma_min == pytest.approx(0.0100, abs=1e-4)
