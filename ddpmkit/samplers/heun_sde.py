"""EDM's stochastic sampler (Karras et al. 2022, algorithm 2): the Heun sampler of ``heun`` with "churn", noise added
before each step to raise the noise level, on the EDM noise level sigma = sqrt((1 - alpha_bar) / alpha_bar)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ._ode import Levels
from .heun import step_to_next
from .registry import Option, register

# The churn window [s_tmin, s_tmax] holds sigma = 1 in all of EDM's tuned settings (table 5: S_tmin 0.01 to 0.05,
# S_tmax 1 to 50), and splitting the two ranges there means s_tmin > s_tmax cannot be given.
_WINDOW_WHY = " (the churn window [s_tmin, s_tmax] holds sigma = 1: s_tmin in [0, 1], s_tmax in [1, 1e5])"
_NOISE_WHY = (" (EDM's S_noise inflates the added noise slightly, 1.000 to 1.007 in its table 5: further from 1 "
              "the sampler draws from another law)")


@register("heun-sde", summary="EDM's stochastic sampler, Karras et al. 2022 alg. 2: Heun with churn, two calls a step",
          default_steps=10, default_spacing="karras", continuous=True, calls=lambda steps: 2 * steps - 1,
          options=(
              Option("s_churn", float, 40.0, "EDM's S_churn: noise added per step, gamma = min(S_churn / S, "
                     "sqrt(2) - 1); 0 is heun", minimum=0.0, maximum=1000.0),
              Option("s_tmin", float, 0.05, "EDM's S_tmin: no churn at sigma below it", minimum=0.0, maximum=1.0,
                     why=_WINDOW_WHY),
              Option("s_tmax", float, 50.0, "EDM's S_tmax: no churn at sigma above it", minimum=1.0,
                     maximum=1e5, why=_WINDOW_WHY),
              Option("s_noise", float, 1.003, "EDM's S_noise: the added noise's scale", minimum=0.9, maximum=1.1,
                     why=_NOISE_WHY)))
def heun_sde(denoiser, x_T, timesteps, *, noise, callback=None, s_churn: float = 40.0, s_tmin: float = 0.05,
             s_tmax: float = 50.0, s_noise: float = 1.003):
    """In y = x / alpha, step i raises sigma_i to sigma_hat = sigma_i (1 + gamma_i) by adding
    sqrt(sigma_hat^2 - sigma_i^2) s_noise z to y, then takes heun's step from sigma_hat to sigma_{i+1}: an Euler step
    and, unless sigma_{i+1} = 0, the trapezoidal correction. 2 S - 1 network calls for S timesteps.

    The network knows no noise above the schedule's last step: sigma_hat is capped at its sigma (no churn at the
    first step of a grid that starts there), and the network is evaluated at the real-valued timestep of sigma_hat
    (log alpha_bar interpolated, as for the real-valued spacings). Where gamma_i = 0 the step is heun's, bit for
    bit, and draws no noise.
    """
    lv = Levels(denoiser, timesteps)
    schedule = denoiser.schedule
    ab_top = float(schedule.alpha_bar.double()[-1])
    sigma_top = math.sqrt((1.0 - ab_top) / ab_top)
    gamma_max = min(s_churn / len(lv), math.sqrt(2.0) - 1.0)
    x = x_T
    for i in range(len(lv)):
        s_i = lv.edm_sigma[i]
        gamma = gamma_max if s_tmin <= s_i <= s_tmax else 0.0  # EDM alg. 2, line 4
        s_hat = min(s_i * (1.0 + gamma), sigma_top)  # EDM alg. 2, line 5 (capped at the schedule's top)
        if s_hat > s_i:
            # the timestep of sigma_hat, and the schedule's own sigma there (alpha_bar = 1 / (1 + sigma^2))
            t_hat = float(schedule.timestep_of_log_alpha_bar(-np.log1p(s_hat ** 2)))
            ab_hat = float(schedule.alpha_bar_at(torch.tensor([t_hat], dtype=torch.float64))[0])
            s_hat, a_hat = math.sqrt((1.0 - ab_hat) / ab_hat), math.sqrt(ab_hat)
            # EDM alg. 2, line 6: y_hat = y_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
            y = x / lv.alpha[i] + (math.sqrt(max(s_hat ** 2 - s_i ** 2, 0.0)) * s_noise) * noise.like(x)
            x_in = a_hat * y
            pred = denoiser(x_in, torch.full((x.shape[0],), t_hat, dtype=torch.float64, device=x.device))
        else:
            s_hat, y, x_in = s_i, x / lv.alpha[i], x
            pred = denoiser(x_in, lv.t(i, x))
        x = step_to_next(denoiser, lv, i, y, s_hat, pred)  # EDM alg. 2, lines 8-11: heun's step from sigma_hat
        if callback is not None:
            callback(i, lv.ts[i].item(), x, pred.x0)
    return x
