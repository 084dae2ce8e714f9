"""Samplers: plain functions over any callable ``model(x_t, t) -> prediction``.

``x_t`` is a float tensor [B, C, H, W] and ``t`` a long tensor [B] of 0-indexed timesteps. The model's output
is read according to ``objective`` (``eps`` by default; see :mod:`ddpmkit.diffusion`).

After every step the samplers call ``callback(i, t, x_t, x0_hat)`` with the step index ``i`` (0-based), the
timestep ``t`` just denoised (an int), the new sample and the clean-image prediction made at that step, so that a
recorder can keep as much of the chain as it wants without the sampler holding it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import math

import numpy as np
import torch

from .diffusion import OBJECTIVES, VARIANCES, model_variance, p_mean_variance, predict_eps, predict_x0
from .schedule import NoiseSchedule

__all__ = ["SPACINGS", "SAMPLERS", "ddim_timesteps", "ddpm_sample", "ddim_sample", "sample", "num_model_calls"]

SPACINGS = ("uniform", "quadratic", "trailing")
SAMPLERS = ("ddpm", "ddim")

Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def ddim_timesteps(T: int, steps: int, spacing: str = "uniform") -> np.ndarray:
    """The increasing sub-sequence tau_1 < ... < tau_S of {0, ..., T-1} that DDIM visits (DDIM section 4.2).

    - ``uniform``: tau_i = floor(i T / S), i = 0..S-1 (DDIM appendix D.2, "linear"); equals the official code's
      ``range(0, T, T // S)`` whenever S divides T, and gives exactly S steps when it does not.
    - ``quadratic``: tau_i = floor(c i^2) with c such that tau_S = floor(0.8 T) (DDIM appendix D.2), each value
      raised to at least one above its predecessor so that the S steps are distinct.
    - ``trailing``: tau_i = round((i + 1) T / S) - 1, which always starts sampling at t = T-1
      (Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed").
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


def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from ``generator`` (on the generator's device) and moved to ``device``."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def _initial(shape, x_T, generator, device) -> torch.Tensor:
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device=device, dtype=torch.float32)
    return _randn(shape, generator, device)


def _resolve_device(model, device):
    if device is not None:
        return torch.device(device)
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _check_common(shape: Sequence[int], objective: str) -> None:
    if len(shape) < 2 or any(int(s) < 1 for s in shape):
        raise ValueError(f"shape must be [B, C, ...] with positive sizes, got {tuple(shape)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


@torch.inference_mode()
def ddpm_sample(model: Callable, schedule: NoiseSchedule, shape: Sequence[int], *, variance: str = "small",
                clip_x0: bool = True, generator: torch.Generator | None = None, callback: Callback | None = None,
                x_T: torch.Tensor | None = None, objective: str = "eps", device=None) -> torch.Tensor:
    """Ancestral sampling through all T steps (DDPM algorithm 2).

    ``variance`` is ``small`` (sigma_t^2 = beta_tilde_t) or ``large`` (sigma_t^2 = beta_t), the paper's two
    choices. No noise is added at the last step (t = 0), which returns the mean, that is x0_hat.
    """
    _check_common(shape, objective)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}: choose 'small' (beta_tilde) or 'large' (beta)")
    device = _resolve_device(model, device)
    sched = schedule.to(device)
    x = _initial(shape, x_T, generator, device)
    B = x.shape[0]
    _, log_var_arr = model_variance(sched, variance)
    std_arr = torch.exp(0.5 * log_var_arr)
    for i, t in enumerate(range(sched.T - 1, -1, -1)):
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        out = model(x, tt)
        mean, _, _, x0_hat = p_mean_variance(sched, out.float(), x, tt, objective=objective, variance=variance,
                                             clip_x0=clip_x0)
        if t > 0:
            # DDPM algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z
            x = mean + std_arr[t] * _randn(x.shape, generator, device)
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


@torch.inference_mode()
def ddim_sample(model: Callable, schedule: NoiseSchedule, shape: Sequence[int], *, steps: int, eta: float = 0.0,
                spacing: str = "uniform", clip_x0: bool = True, generator: torch.Generator | None = None,
                callback: Callback | None = None, x_T: torch.Tensor | None = None, objective: str = "eps",
                device=None) -> torch.Tensor:
    """DDIM sampling over ``steps`` timesteps (DDIM eq. 12, with sigma from eq. 16 scaled by ``eta``).

    eta = 0 is the deterministic DDIM; eta = 1 with steps = T is DDPM with sigma_t^2 = beta_tilde_t. The model is
    called exactly ``steps`` times; the last step goes to alpha_bar = 1 and returns x0_hat.
    """
    _check_common(shape, objective)
    try:
        eta = float(eta)
    except (TypeError, ValueError):
        raise ValueError(f"eta must be a number, got {eta!r}") from None
    if not (eta >= 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    tau = ddim_timesteps(schedule.T, steps, spacing)
    device = _resolve_device(model, device)
    sched = schedule.to(device)
    x = _initial(shape, x_T, generator, device)
    B = x.shape[0]
    ab = sched.alpha_bar.double().cpu().numpy()
    for i, k in enumerate(range(len(tau) - 1, -1, -1)):
        t = int(tau[k])
        a_t = float(ab[t])
        a_prev = float(ab[tau[k - 1]]) if k > 0 else 1.0
        tt = torch.full((B,), t, dtype=torch.long, device=device)
        out = model(x, tt).float()
        x0_hat = predict_x0(sched, x, tt, out, objective)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        # the noise consistent with x_t and the (clipped) x0_hat; equals the model output for eps, unclipped
        eps_hat = out if (objective == "eps" and not clip_x0) else predict_eps(sched, x, tt, x0_hat)
        # DDIM eq. 16: sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # DDIM eq. 12: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps_hat
        if sigma > 0:
            x = x + sigma * _randn(x.shape, generator, device)
        if callback is not None:
            callback(i, t, x, x0_hat)
    return x


def sample(model: Callable, schedule: NoiseSchedule, shape: Sequence[int], *, sampler: str = "ddim",
           steps: int | None = None, eta: float = 0.0, spacing: str = "uniform", variance: str = "small",
           clip_x0: bool = True, generator: torch.Generator | None = None, callback: Callback | None = None,
           x_T: torch.Tensor | None = None, objective: str = "eps", device=None) -> torch.Tensor:
    """Either sampler by name: ``ddpm`` (all T steps, ``variance``) or ``ddim`` (``steps``, ``eta``, ``spacing``)."""
    common = dict(clip_x0=clip_x0, generator=generator, callback=callback, x_T=x_T, objective=objective,
                  device=device)
    if sampler == "ddpm":
        return ddpm_sample(model, schedule, shape, variance=variance, **common)
    if sampler == "ddim":
        return ddim_sample(model, schedule, shape, steps=schedule.T if steps is None else steps, eta=eta,
                           spacing=spacing, **common)
    raise ValueError(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")


def num_model_calls(schedule: NoiseSchedule, sampler: str, steps: int | None) -> int:
    """How many network evaluations one run of the sampler makes."""
    return schedule.T if sampler == "ddpm" or steps is None else int(steps)
