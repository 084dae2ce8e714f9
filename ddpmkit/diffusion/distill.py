"""The mathematics of few-step distillation: progressive distillation (Salimans & Ho 2022) and consistency
distillation (Song et al. 2023), as functions over tensors, a NoiseSchedule and teacher callables.

ddpmkit's discrete VP schedule in the papers' notation: z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(alpha_bar_t)
and sigma_t = sqrt(1 - alpha_bar_t), t in {0, ..., T-1}. One more level, :data:`END` (t = -1, alpha = 1, sigma = 0),
is the clean image: the last step of a sampler goes there (DDIM returns x0_hat). EDM's noise level of t is
sigma_t / alpha_t, and its variable is x = z / alpha (Karras et al. 2022, section 2; k-diffusion's ``external.py``).

A teacher is any callable ``teacher_x0(z, t) -> x0_hat`` at a batch of timesteps t [B] (a Denoiser's
``lambda z, t: den(z, t).x0``, or a previous student). Targets are computed without gradients.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .schedule import NoiseSchedule

__all__ = ["END", "alpha_sigma", "edm_sigma", "ddim_step", "progressive_target", "truncated_snr_weight",
           "student_grid", "teacher_grid", "progressive_triples", "progressive_loss", "consistency_scalings",
           "consistency_function", "consistency_x0", "heun_step", "consistency_target"]

END = -1  # the timestep of the clean image: alpha = 1, sigma = 0 (alpha_bar_prev of t = 0)

TeacherX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- levels
def _batch_t(t, B: int, device) -> torch.Tensor:
    """t as a tensor [B]: an int or float for the whole batch, or one timestep per sample."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(B)
    if t.shape != (B,):
        raise ValueError(f"timesteps must be one number or one per sample ({B}), got shape {tuple(t.shape)}")
    return t


def alpha_sigma(schedule: NoiseSchedule, t) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) in float64 at timesteps ``t`` (a tensor,
    integer or real-valued, in [0, T-1], or :data:`END` for the clean image: (1, 0))."""
    t = torch.as_tensor(t)
    end = t == END
    inside = torch.where(end, torch.zeros_like(t), t)
    bad = (inside < 0) | (inside > schedule.T - 1)
    if bool(bad.any()):
        raise ValueError(f"timesteps must lie in [0, {schedule.T - 1}] or be END ({END}), got {t[bad][0].item()}")
    ab = torch.where(end, torch.ones((), dtype=torch.float64, device=t.device), schedule.alpha_bar_at(inside))
    return ab.sqrt(), (1.0 - ab).sqrt()


def edm_sigma(schedule: NoiseSchedule, t) -> torch.Tensor:
    """EDM's noise level sigma_t / alpha_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), float64; 0 at :data:`END`."""
    alpha, sigma = alpha_sigma(schedule, t)
    return sigma / alpha


def _col(c, like: torch.Tensor) -> torch.Tensor:
    """A coefficient (a number, or a tensor [B] of one per sample) shaped to broadcast over ``like``, in its dtype."""
    c = torch.as_tensor(c, device=like.device)
    if c.ndim == 1:
        c = c.view(-1, *([1] * (like.ndim - 1)))
    return c.to(like.dtype)


# ---------------------------------------------------------------------------------------- progressive distillation
def ddim_step(x0_hat: torch.Tensor, z_t: torch.Tensor, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
    """The deterministic DDIM update from t to s < t with x0_hat: z_s = alpha_s x0_hat + (sigma_s / sigma_t)
    (z_t - alpha_t x0_hat). The levels are numbers or tensors [B]; s may be the clean image (alpha 1, sigma 0)."""
    ratio = torch.as_tensor(sigma_s, dtype=torch.float64) / torch.as_tensor(sigma_t, dtype=torch.float64)
    # DDIM eq. 12 with eta = 0: z_s = alpha_s x0_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x0_hat) / sigma_t
    return _col(alpha_s, z_t) * x0_hat + _col(ratio, z_t) * (z_t - _col(alpha_t, z_t) * x0_hat)


def progressive_target(teacher_x0: TeacherX0, z_t: torch.Tensor, t, t_mid, t_next,
                       schedule: NoiseSchedule) -> torch.Tensor:
    """The student's x-target x_tilde at (z_t, t): one student DDIM step t -> t_next with x0_hat = x_tilde lands
    exactly where two teacher DDIM steps t -> t_mid -> t_next land (Salimans & Ho 2022, algorithm 2).

    ``t``, ``t_mid`` and ``t_next`` are numbers or tensors [B] (one per sample, as :func:`progressive_triples` gives
    them), with t > t_mid > t_next; ``t_next`` may be :data:`END`, the last step to x0, where the formula reduces to
    the paper's x_tilde = z_{t''} = the teacher's x0_hat at t_mid. The teacher is called at ``t`` and ``t_mid``
    (twice in all), without gradients. The result has z_t's dtype; the levels are float64.
    """
    B = z_t.shape[0]
    t, t_mid, t_next = (_batch_t(v, B, z_t.device) for v in (t, t_mid, t_next))
    if bool((t_mid == END).any()) or bool(((t <= t_mid) | ((t_mid <= t_next) & (t_next != END))).any()):
        raise ValueError("progressive distillation needs t > t_mid > t_next per sample (only t_next may be END)")
    a_t, s_t = alpha_sigma(schedule, t)
    a_m, s_m = alpha_sigma(schedule, t_mid)
    a_n, s_n = alpha_sigma(schedule, t_next)
    with torch.no_grad():
        z_mid = ddim_step(teacher_x0(z_t, t), z_t, a_t, s_t, a_m, s_m)  # Salimans & Ho 2022, alg. 2: z_t'
        z_next = ddim_step(teacher_x0(z_mid, t_mid), z_mid, a_m, s_m, a_n, s_n)  # Salimans & Ho 2022, alg. 2: z_t''
        ratio = s_n / s_t
        # Salimans & Ho 2022, alg. 2: x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' /
        # sigma_t) alpha_t); the denominator is > 0 since alpha / sigma grows as t falls
        return (z_next - _col(ratio, z_t) * z_t) / _col(a_n - ratio * a_t, z_t)


def truncated_snr_weight(alpha_t, sigma_t) -> torch.Tensor:
    """max(SNR, 1), SNR = alpha_t^2 / sigma_t^2, in float64: the weight of the x-space loss ||x_tilde - x_hat||^2
    (Salimans & Ho 2022, sec. 4, "truncated SNR weighting").

    Its neighbour "SNR+1 weighting", (1 + SNR) ||x - x_hat||^2, is exactly the v-loss ||v - v_hat||^2 when
    alpha^2 + sigma^2 = 1 (x - x_hat = -sigma (v - v_hat)), and max(SNR, 1) <= 1 + SNR <= 2 max(SNR, 1): the
    truncated weight is the v-loss to within a factor of 2, equal to it at both ends. At t = 0 of a T-step schedule
    the SNR is large (1e4 for the linear one); there is no x-space target at END (sigma = 0).
    """
    a = torch.as_tensor(alpha_t, dtype=torch.float64)
    s = torch.as_tensor(sigma_t, dtype=torch.float64)
    return torch.clamp(a * a / (s * s), min=1.0)  # Salimans & Ho 2022, sec. 4: w = max(SNR, 1)


def student_grid(T: int, steps: int) -> np.ndarray:
    """The student's N = ``steps`` timesteps, increasing (int64): tau_i = round((i + 1) T / N) - 1, i = 0..N-1. A
    sampler walks them from tau_{N-1} = T-1 down and takes its last step from tau_0 to the clean image (:data:`END`).

    This is the discrete form of the paper's grid t_i = i / N, i = 1..N, with t_0 = 0 the data: continuous time t
    is the 1-indexed step t T, that is the 0-indexed timestep t T - 1, and t = 0 is END. It is the ``trailing``
    spacing of ``ddpmkit.samplers.timesteps`` (Lin et al. 2023), so the existing DDIM sampler at N steps and that
    spacing runs the student. It nests: the grid of 2N steps holds the grid of N at its odd positions (round((2i +
    2) T / 2N) = round((i + 1) T / N)), so each round's student is the next round's teacher on the same timesteps.
    Other spacings do not: ``uniform``'s grid ends at t = 0, so its last step to x0 has no teacher midpoint.
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in [1, T] = [1, {T}], got {steps!r}")
    i = np.arange(int(steps), dtype=np.float64)
    return (np.round((i + 1) * T / steps) - 1).astype(np.int64)  # Lin et al. 2023, table 2 ("trailing")


def teacher_grid(T: int, steps: int) -> np.ndarray:
    """The teacher's 2N timesteps for a student of N = ``steps``: the student's grid with the midpoints between its
    steps (and between tau_0 and the clean image), i.e. ``student_grid(T, 2 N)``; the student's are at the odd
    positions."""
    student_grid(T, steps)  # T and steps checked
    if 2 * steps > T:
        raise ValueError(f"a student of {steps} steps needs a teacher of {2 * steps}, more than T = {T} timesteps")
    return student_grid(T, 2 * steps)


def progressive_triples(T: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, t_mid, t_next), three int64 arrays [N]: for each student step i, its timestep, the teacher's midpoint
    and where the step lands (:data:`END` for i = 0). Training draws i ~ U{0..N-1} per sample (Salimans & Ho 2022,
    alg. 2 draws i ~ U{1..N}) and passes the three to :func:`progressive_target`."""
    tau, tau2 = student_grid(T, steps), teacher_grid(T, steps)
    return tau, tau2[0::2].copy(), np.append(END, tau[:-1]).astype(np.int64)


def progressive_loss(student_x0: TeacherX0, teacher_x0: TeacherX0, x0: torch.Tensor, noise: torch.Tensor,
                     i: torch.Tensor, steps: int, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of progressive distillation for a student of N = ``steps`` (Salimans & Ho 2022, algorithm 2): per
    sample, its student step ``i`` [B] (in 0..N-1) gives (t, t_mid, t_next) (:func:`progressive_triples`), the clean
    image ``x0`` is noised to z_t with ``noise`` (DDPM eq. 4), and the student's x0 estimate at (z_t, t) is compared
    with the x-target of two teacher DDIM steps (:func:`progressive_target`) in the x-space loss with the truncated-SNR
    weight max(SNR_t, 1) (the paper's section 4). Returns (the per-sample losses [B], float32, with the student's
    gradient; the timesteps t [B])."""
    tau, mid, nxt = (torch.as_tensor(a, device=x0.device) for a in progressive_triples(schedule.T, steps))
    i = i.to(x0.device)
    t, t_mid, t_next = tau[i], mid[i], nxt[i]
    alpha, sigma = alpha_sigma(schedule, t)
    z_t = (_col(alpha, x0.double()) * x0.double() + _col(sigma, x0.double()) * noise.double()).to(x0.dtype)
    target = progressive_target(teacher_x0, z_t, t, t_mid, t_next, schedule)
    x_hat = student_x0(z_t, t)
    w = truncated_snr_weight(alpha, sigma).float()  # Salimans & Ho 2022, sec. 4: max(SNR_t, 1) ||x_tilde - x_hat||^2
    return (x_hat.float() - target.float()).pow(2).flatten(1).mean(dim=1) * w, t


# ---------------------------------------------------------------------------------------- consistency distillation
def consistency_scalings(sigma, sigma_data: float = 0.5,
                         sigma_min: float = 0.002) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) at EDM noise levels ``sigma`` >= ``sigma_min``, float64, with c_skip(sigma_min) = 1 and
    c_out(sigma_min) = 0 exactly, so that f = c_skip x + c_out F is the identity at sigma_min whatever F is.

    The papers' sigma_min = 0.002 is EDM's; on ddpmkit's discrete schedule the least noise level is
    ``edm_sigma(schedule, 0)`` (0.0100 for the linear schedule at T = 1000), the value to pass for a grid that
    ends there.
    """
    if not sigma_data > 0 or not sigma_min >= 0:
        raise ValueError(f"sigma_data must be > 0 and sigma_min >= 0, got {sigma_data} and {sigma_min}")
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if bool((sigma < sigma_min).any()):
        raise ValueError(f"a consistency function is defined for sigma >= sigma_min = {sigma_min}, got "
                         f"{sigma.min().item():.6g}")
    sd2 = torch.tensor(sigma_data * sigma_data, dtype=torch.float64)  # a tensor: exact division at sigma_min
    c_skip = sd2 / ((sigma - sigma_min) ** 2 + sd2)  # Song et al. 2023, appendix C
    c_out = (sigma - sigma_min) * sigma_data / (sd2 + sigma * sigma).sqrt()  # Song et al. 2023, appendix C
    return c_skip, c_out


def consistency_function(x: torch.Tensor, sigma, F: torch.Tensor, sigma_data: float = 0.5,
                         sigma_min: float = 0.002) -> torch.Tensor:
    """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F, in EDM's variable x = z / alpha, with ``sigma`` a number or
    one level per sample [B] (Song et al. 2023, eq. 3 with appendix C's scalings)."""
    c_skip, c_out = consistency_scalings(sigma, sigma_data, sigma_min)
    return _col(c_skip, x) * x + _col(c_out, x) * F  # Song et al. 2023, eq. 3


def consistency_x0(x0_hat: torch.Tensor, z: torch.Tensor, t, schedule: NoiseSchedule,
                   sigma_data: float = 0.5) -> torch.Tensor:
    """The consistency function of an x0-predicting network: f(x, sigma) = c_skip(sigma) x + (1 - c_skip(sigma))
    x0_hat, in EDM's variable x = z / alpha at the levels of timesteps ``t`` (a number or [B], integer or real).

    c_skip is Song et al. 2023's (appendix C) with sigma_min the least level of the schedule, sigma at t = 0, so that
    f(x, sigma_min) = x whatever the network says (the boundary condition, their eq. 3). Their c_out,
    (sigma - sigma_min) sigma_data / sqrt(sigma_data^2 + sigma^2), is made for a free network F; here the network is
    the teacher's denoiser (x0_hat), so c_out = 1 - c_skip, which also vanishes at sigma_min and makes f the denoiser
    itself where the noise is large: a student initialised from its teacher, with the teacher's objective, starts at
    the teacher's one-step estimate. Returns f in x0_hat's dtype.
    """
    B = z.shape[0]
    t = _batch_t(t, B, z.device)
    alpha, sigma_t = alpha_sigma(schedule, t)
    sigma_min = float(edm_sigma(schedule, 0))
    c_skip = consistency_scalings(sigma_t / alpha, sigma_data, sigma_min)[0]
    x = z.double() / _col(alpha, z.double())
    f = _col(c_skip, x) * x + _col(1.0 - c_skip, x) * x0_hat.double()  # Song et al. 2023, eq. 3
    return f.to(x0_hat.dtype)


def heun_step(teacher_x0: TeacherX0, z: torch.Tensor, t, s, schedule: NoiseSchedule) -> torch.Tensor:
    """One step of the probability-flow ODE from t to s < t by Heun's method (Karras et al. 2022, algorithm 1, one
    step without churn), in EDM's variables x = z / alpha and sigma = sigma_t / alpha_t; returns z at s (VP).

    It is the step of ``ddpmkit.samplers.heun`` (whose slope is the Denoiser's eps = (x - x0_hat) / sigma), here per
    sample: ``t`` and ``s`` are numbers or tensors [B], integer or real-valued timesteps, never :data:`END`
    (consistency distillation's grid ends at sigma_min > 0). Two teacher calls, without gradients.
    """
    B = z.shape[0]
    t, s = _batch_t(t, B, z.device), _batch_t(s, B, z.device)
    if bool(((s == END) | (s >= t)).any()):
        raise ValueError("a Heun step goes from t to s < t, with s a noisy timestep (not END)")
    a_t, sd_t = alpha_sigma(schedule, t)
    a_s, sd_s = alpha_sigma(schedule, s)
    sig_t, sig_s = sd_t / a_t, sd_s / a_s
    h = _col(sig_s - sig_t, z)
    with torch.no_grad():
        x = z / _col(a_t, z)
        d = (x - teacher_x0(z, t)) / _col(sig_t, z)  # EDM alg. 1, line 4: d_i = (x_i - D(x_i; sigma_i)) / sigma_i
        x_s = x + h * d  # EDM alg. 1, line 5: the Euler step
        d_s = (x_s - teacher_x0(_col(a_s, z) * x_s, s)) / _col(sig_s, z)  # EDM alg. 1, line 7
        x_s = x + h * (0.5 * d + 0.5 * d_s)  # EDM alg. 1, line 8: the trapezoidal correction
        return _col(a_s, z) * x_s


def consistency_target(teacher_x0: TeacherX0, target_f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       z: torch.Tensor, t, s, schedule: NoiseSchedule) -> torch.Tensor:
    """The target of one consistency-distillation step at (z, t): the target network's f at the teacher's Heun
    step to the next less noisy level s, f_target(z_hat_s, s) (Song et al. 2023, alg. 2: x_hat_{t_n} by the ODE
    solver from x_{t_{n+1}}, then f_{theta^-}(x_hat_{t_n}, t_n)); the student's f(z, t) is pulled towards it."""
    z_s = heun_step(teacher_x0, z, t, s, schedule)
    with torch.no_grad():
        return target_f(z_s, _batch_t(s, z.shape[0], z.device))
