"""Which timesteps a sampler visits: chosen here, outside the samplers.

Every function returns an increasing sequence tau_1 < ... < tau_S of distinct integers in {0, ..., T-1}; samplers
walk it from the end (tau_S, the noisiest) to the start.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPACINGS", "timesteps"]

SPACINGS = ("uniform", "quadratic", "trailing")


def timesteps(T: int, steps: int, spacing: str = "uniform") -> np.ndarray:
    """The S = ``steps`` timesteps of a T-step process under ``spacing``, increasing, as int64.

    - ``uniform``: tau_i = floor(i T / S), i = 0..S-1 (DDIM appendix D.2, "linear"); equals the official code's
      ``range(0, T, T // S)`` whenever S divides T, and gives exactly S steps when it does not.
    - ``quadratic``: tau_i = floor(c i^2) with c such that tau_S = floor(0.8 T) (DDIM appendix D.2), each value
      raised to at least one above its predecessor so that the S steps are distinct.
    - ``trailing``: tau_i = round((i + 1) T / S) - 1, which always starts sampling at t = T-1
      (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", table 2).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"steps must be an integer, got {steps!r}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must lie in [1, T] = [1, {T}], got {steps}")
    S = int(steps)
    i = np.arange(S, dtype=np.float64)
    if spacing == "uniform":
        tau = np.floor(i * T / S).astype(np.int64)
    elif spacing == "quadratic":
        c = 0.8 * T / (S - 1) ** 2 if S > 1 else 0.0
        tau = np.floor(c * i ** 2).astype(np.int64)
        for k in range(1, S):
            tau[k] = max(tau[k], tau[k - 1] + 1)
    elif spacing == "trailing":
        tau = (np.round((i + 1) * T / S) - 1).astype(np.int64)
    else:
        raise ValueError(f"unknown spacing {spacing!r}: choose one of {', '.join(SPACINGS)}")
    assert len(np.unique(tau)) == S and tau[0] >= 0 and tau[-1] <= T - 1, (T, S, spacing)
    return tau
