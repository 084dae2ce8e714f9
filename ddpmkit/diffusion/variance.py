"""Reverse variances beyond the fixed two: learned (Improved DDPM) and analytic (Analytic-DPM).

- ``learned``: the network's second C output channels v in [-1, 1] interpolate, per pixel, between the two fixed
  choices in the log domain (Nichol & Dhariwal 2021, eq. 15, in the form of their code: frac = (v + 1) / 2).
- ``analytic``: the optimal isotropic variance of a trained model (Bao et al. 2022, Analytic-DPM, Theorem 1), from
  one number per timestep, Gamma_t = E||eps_theta(x_t, t)||^2 / d, estimated by Monte Carlo on the data
  (:func:`estimate_gamma`).

Both are computed on the schedule the Denoiser runs on, so a respaced Denoiser (Improved DDPM section 4) gets
the respaced process's betas and, for the analytic variance, Analytic-DPM's formula for a shorter trajectory
(its section 4: Theorem 1 applied to the sub-process, with Gamma at the visited timesteps).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from .process import q_sample
from .schedule import NoiseSchedule, extract

__all__ = ["learned_log_var", "optimal_reverse_variance", "analytic_log_var", "estimate_gamma",
           "SAMPLING_CLIP_PIXELS", "sampling_sigma2_max"]

# Analytic-DPM's official sampler (reverse_ddpm_ms_eps, clip_sigma_idx=1, clip_pixel=2): the variance of the last
# noisy step is clipped so that its noise stays within about 2 pixel levels.
SAMPLING_CLIP_PIXELS = 2


def sampling_sigma2_max(pixels: float = SAMPLING_CLIP_PIXELS) -> float:
    """The largest variance of the last noisy sampling step: (pixels * 2/255 * sqrt(pi/2))^2 (official code)."""
    # Analytic-DPM code: sigma2_threshold = (clip_pixel * 2 / 255 * (pi / 2) ** 0.5) ** 2
    return (pixels * 2.0 / 255.0 * math.sqrt(math.pi / 2.0)) ** 2


def learned_log_var(schedule: NoiseSchedule, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """log Sigma_theta = frac log beta_t + (1 - frac) log beta_tilde_t with frac = (v + 1) / 2, per element.

    v = 1 gives beta, v = -1 gives beta_tilde (its log clipped at t = 0, as in the Improved DDPM code).
    """
    min_log = extract(schedule.posterior_log_variance_clipped, t, v.ndim).to(v.dtype)
    max_log = extract(schedule.log_betas, t, v.ndim).to(v.dtype)
    frac = (v + 1.0) / 2.0
    # Improved DDPM eq. 15 (code: model_log_variance = frac * max_log + (1 - frac) * min_log)
    return frac * max_log + (1.0 - frac) * min_log


def optimal_reverse_variance(ab_t, ab_prev, gamma, lambda2, *, clip: bool = True, data_range: float = 2.0):
    """Analytic-DPM's optimal variance of p(x_{t-1} | x_t) for the forward process with variance lambda2.

    ``ab_t`` = alpha_bar at t, ``ab_prev`` = alpha_bar at the previous visited step (1 before the first),
    ``gamma`` = E||eps_theta(x_t)||^2 / d; any broadcastable tensors (float64 advised). lambda2 = beta_tilde is
    DDPM; 0 is DDIM with eta = 0. With ``clip`` the implied Cov[x_0 | x_t] = (1 - ab_t) / ab_t (1 - gamma) is kept
    in [0, (data_range / 2)^2], which keeps the variance between Theorem 2's lower bound (lambda2) and its upper
    bound for data in an interval of that width ([-1, 1]: 1).
    """
    a_t = ab_t / ab_prev  # the step's own alpha
    # Analytic-DPM Theorem 1: sigma*^2 = lambda^2 + (sqrt(bbar_t / a_t) - sqrt(bbar_{t-1} - lambda^2))^2 (1 - Gamma_t)
    coef = ((1.0 - ab_t) / a_t).sqrt() - (1.0 - ab_prev - lambda2).clamp(min=0.0).sqrt()
    # the same in terms of Cov[x_0 | x_t] = bbar_t / abar_t (1 - Gamma_t), as the official code writes it
    cov_x0 = (1.0 - ab_t) / ab_t * (1.0 - gamma)
    if clip:  # Analytic-DPM Theorem 2 (bounds of the optimal variance); official: np.clip(cov_x_0_pred, 0, 1)
        cov_x0 = cov_x0.clamp(0.0, (data_range / 2.0) ** 2)
    return lambda2 + coef ** 2 * ab_t / (1.0 - ab_t) * cov_x0


def analytic_log_var(schedule: NoiseSchedule, gamma: torch.Tensor) -> torch.Tensor:
    """log sigma*^2 over the steps of ``schedule`` (float64 [T]), DDPM's forward process (lambda^2 = beta_tilde).

    ``gamma`` [T]: Gamma at each step of this schedule (at the visited timesteps for a respaced one). Step 0, the
    decoder, keeps the ``small`` variance (beta_tilde of the next step), as the official code's bound does.
    """
    ab = schedule.alpha_bar.double()
    ab_prev = schedule.alpha_bar_prev.double()
    lam2 = schedule.posterior_variance.double()  # DDPM: lambda_t^2 = beta_tilde_t
    var = optimal_reverse_variance(ab, ab_prev, gamma.double().to(ab.device), lam2)
    log_var = torch.log(var)
    log_var[0] = schedule.posterior_log_variance_clipped[0].double()  # official nelbo: _sigma2_small(1, 2)
    return log_var


@torch.inference_mode()
def estimate_gamma(denoiser, batches: Iterable[torch.Tensor], *, seed: int = 0,
                   t_batch: int = 250, progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int]:
    """Gamma_t = E||eps_theta(x_t, t)||^2 / d for every timestep t of the network, by Monte Carlo over the images
    of ``batches`` (float [B, C, H, W] in [-1, 1], or pairs (images, condition [B]) for a conditional network)
    with one x_t ~ q(x_t | x_0) per image and t.

    ``denoiser``: a full-length (not respaced) Denoiser; eps_theta is the network's own noise prediction (without
    clipping x0_hat). Returns (gamma float64 [T], number of images).
    """
    den = denoiser._replace(clip_x0=False, variance="small", gamma=None, guidance=None)
    if den.timestep_map is not None:
        raise ValueError("estimate Gamma_t with the full-length Denoiser, not a respaced one")
    sched = den.schedule
    T = sched.T
    device = sched.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = torch.zeros(T, dtype=torch.float64)
    n = 0
    for x0 in batches:
        x0, cond = x0 if isinstance(x0, (tuple, list)) else (x0, None)
        x0 = x0.to(device=device, dtype=torch.float32)
        B = x0.shape[0]
        k = max(1, min(T, t_batch // max(B, 1)))
        for start in range(0, T, k):
            ts = torch.arange(start, min(start + k, T), device=device)
            t = ts.repeat_interleave(B)
            xs = x0.repeat(ts.shape[0], *([1] * (x0.ndim - 1)))
            eps = torch.randn(xs.shape, generator=gen).to(device)
            x_t = q_sample(sched, xs, t, eps)                         # DDPM eq. 4
            c = None if cond is None else torch.as_tensor(cond, device=device).repeat(ts.shape[0])
            eps_hat = den(x_t, t, c).eps.double()
            # Analytic-DPM eq. for Gamma_n: the mean over samples of ||eps_theta(x_n, n)||^2 / d
            sq = eps_hat.flatten(1).pow(2).mean(dim=1).reshape(ts.shape[0], B).sum(dim=1)
            total[start:start + ts.shape[0]] += sq.cpu()
        n += B
        if progress is not None:
            progress(n)
    if n == 0:
        raise ValueError("no images to estimate Gamma_t from")
    return total / n, n
