"""EDM's deterministic second-order sampler (Karras et al. 2022, algorithm 1, without churn) on the EDM noise level
sigma = sqrt((1 - alpha_bar) / alpha_bar)."""

from __future__ import annotations

from ._ode import Levels
from .registry import register


@register("heun", summary="EDM's Heun sampler, Karras et al. 2022 alg. 1: second order, two calls a step",
          default_steps=10, default_spacing="karras", continuous=True, calls=lambda steps: 2 * steps - 1)
def heun(denoiser, x_T, timesteps, *, noise, callback=None):
    """In y = x / alpha the ODE is dy / d sigma = eps(y): an Euler step from sigma_i to sigma_{i+1}, then (unless
    sigma_{i+1} = 0, the last step) the average of the slopes at both ends. 2 S - 1 network calls for S timesteps;
    with a real-valued spacing the second call is between the schedule's steps."""
    lv = Levels(denoiser, timesteps)
    x = x_T
    for i in range(len(lv)):
        pred = denoiser(x, lv.t(i, x))
        x = step_to_next(denoiser, lv, i, x / lv.alpha[i], lv.edm_sigma[i], pred)
        if callback is not None:
            callback(i, lv.ts[i].item(), x, pred.x0)
    return x


def step_to_next(denoiser, lv: Levels, i: int, y, sigma_from: float, pred):
    """From y = x / alpha at the noise level ``sigma_from`` (``pred``: the denoiser's prediction there) to level
    i + 1: the Euler step and, unless level i + 1 is the clean image, the trapezoidal correction; returns x there.
    Also the second half of each step of ``heun-sde``, which starts from a raised level."""
    ds = lv.edm_sigma[i + 1] - sigma_from
    y_next = y + ds * pred.eps  # EDM alg. 1, line 5 (alg. 2, line 8): the Euler step
    if i < len(lv) - 1:
        eps_next = denoiser(lv.alpha[i + 1] * y_next, lv.t(i + 1, y)).eps
        y_next = y + ds * (0.5 * pred.eps + 0.5 * eps_next)  # EDM alg. 1, line 8: the trapezoidal correction
    return lv.alpha[i + 1] * y_next

