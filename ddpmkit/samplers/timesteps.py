"""Which timesteps a sampler visits: chosen here, outside the samplers.

:func:`timesteps` returns an increasing sequence tau_1 < ... < tau_S of distinct timesteps in [0, T-1]; samplers walk
it from the end (tau_S, the noisiest) to the start. They are integers, except that the spacings defined by the noise
level (``logsnr``, ``karras``) can also be had exactly, as real-valued timesteps (``integer=False``), for the samplers
that evaluate the network between the schedule's steps.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPACINGS", "NOISE_SPACINGS", "KARRAS_RHO", "timesteps"]

SPACINGS = ("uniform", "quadratic", "trailing", "logsnr", "karras")
NOISE_SPACINGS = ("logsnr", "karras")  # defined by the schedule's noise levels: they need the schedule
KARRAS_RHO = 7.0


def timesteps(schedule_or_T, steps: int, spacing: str = "uniform", *, integer: bool = True) -> np.ndarray:
    """The S = ``steps`` timesteps of a process under ``spacing``, increasing: int64, or float64 with
    ``integer=False`` (``logsnr`` and ``karras`` only). ``schedule_or_T`` is a NoiseSchedule, or its T for the
    spacings that need no more.

    - ``uniform``: tau_i = floor(i T / S), i = 0..S-1 (DDIM appendix D.2, "linear"); equals the official code's
      ``range(0, T, T // S)`` whenever S divides T, and gives exactly S steps when it does not.
    - ``quadratic``: tau_i = floor(c i^2) with c such that tau_S = floor(0.8 T) (DDIM appendix D.2), each value
      raised to at least one above its predecessor so that the S steps are distinct.
    - ``trailing``: tau_i = round((i + 1) T / S) - 1, which always starts sampling at t = T-1
      (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", table 2).
    - ``logsnr``: uniform in lambda = log(alpha / sigma) from t = T-1 to t = 0 (DPM-Solver, Lu et al. 2022,
      section 3.3).
    - ``karras``: sigma = sqrt((1 - alpha_bar) / alpha_bar) with sigma^(1/rho) uniform, rho = 7, from t = T-1 to
      t = 0 (EDM, Karras et al. 2022, eq. 5).

    The last two map noise levels to timesteps through the schedule's interpolated log alpha_bar
    (``NoiseSchedule.alpha_bar_at``); as integers they are rounded, then moved by the least amount that keeps the
    S steps distinct.
    """
    schedule = None if isinstance(schedule_or_T, (int, np.integer)) else schedule_or_T
    T = int(schedule_or_T) if schedule is None else schedule.T
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, T] = [1, {T}], got {steps}")
    S = int(steps)
    if spacing in NOISE_SPACINGS:
        if schedule is None:
            raise ValueError(f"the {spacing} spacing needs the noise schedule, not only T")
        return _noise_spaced(schedule, S, spacing, integer)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    if not integer:
        raise ValueError(f"the {spacing} spacing gives integer timesteps only")
    i = np.arange(S, dtype=np.float64)
    if spacing == "uniform":
        tau = np.floor(i * T / S).astype(np.int64)
    elif spacing == "quadratic":
        c = 0.8 * T / (S - 1) ** 2 if S > 1 else 0.0
        tau = np.floor(c * i ** 2).astype(np.int64)
        for k in range(1, S):
            tau[k] = max(tau[k], tau[k - 1] + 1)
    else:  # trailing
        tau = (np.round((i + 1) * T / S) - 1).astype(np.int64)
    assert len(np.unique(tau)) == S and tau[0] >= 0 and tau[-1] <= T - 1, (T, S, spacing)
    return tau


def _noise_spaced(schedule, S: int, spacing: str, integer: bool) -> np.ndarray:
    ab = schedule.alpha_bar.double().cpu().numpy()
    ab_lo, ab_hi = ab[-1], ab[0]  # the noisiest and the cleanest step
    if S == 1:
        log_ab = np.log([ab_lo])
    elif spacing == "logsnr":
        lam_lo, lam_hi = 0.5 * np.log(ab_lo / (1 - ab_lo)), 0.5 * np.log(ab_hi / (1 - ab_hi))
        lam = np.linspace(lam_lo, lam_hi, S)
        log_ab = -np.logaddexp(0.0, -2.0 * lam)  # alpha_bar = sigmoid(2 lambda)
    else:
        s_max, s_min = np.sqrt((1 - ab_lo) / ab_lo), np.sqrt((1 - ab_hi) / ab_hi)
        r = 1.0 / KARRAS_RHO
        # EDM eq. 5: sigma_i = (s_max^(1/rho) + i / (S - 1) (s_min^(1/rho) - s_max^(1/rho)))^rho
        sig = (s_max ** r + np.arange(S) / (S - 1) * (s_min ** r - s_max ** r)) ** KARRAS_RHO
        log_ab = -np.log1p(sig ** 2)  # alpha_bar = 1 / (1 + sigma^2)
    t = np.sort(schedule.timestep_of_log_alpha_bar(log_ab))
    if S > 1:
        t[0], t[-1] = 0.0, schedule.T - 1.0  # the ends exactly, free of interpolation round-off
    else:
        t[0] = schedule.T - 1.0
    if not integer:
        return t
    tau = np.round(t).astype(np.int64)
    for k in range(1, S):  # distinct: each above the one before ...
        tau[k] = max(tau[k], tau[k - 1] + 1)
    tau[-1] = min(tau[-1], schedule.T - 1)
    for k in range(S - 2, -1, -1):  # ... and each below the one after, within [0, T-1]
        tau[k] = min(tau[k], tau[k + 1] - 1)
    assert len(np.unique(tau)) == S and tau[0] >= 0 and tau[-1] <= schedule.T - 1, (S, spacing)
    return tau
