"""The stochastic DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", section 5, the SDE solver of the data-prediction
diffusion SDE, second-order multistep with the midpoint correction)."""

from __future__ import annotations

import math

from ._ode import Levels
from .registry import register


@register("dpmpp-2m-sde", summary="stochastic DPM-Solver++(2M), Lu et al. 2022: second-order multistep SDE solver",
          default_steps=20, default_spacing="logsnr", continuous=True)
def dpmpp_2m_sde(denoiser, x_T, timesteps, *, noise, callback=None):
    """One network call per timestep and one noise draw per step but the last (to sigma = 0, which returns
    x0_hat). With h = lambda_{i+1} - lambda_i each step is
    x_{i+1} = (sigma_{i+1} / sigma_i) e^{-h} x_i + alpha_{i+1} (1 - e^{-2h}) D + sigma_{i+1} sqrt(1 - e^{-2h}) z,
    D = x0_i first, then x0_i + (x0_i - x0_{i-1}) / (2 r) with r = h_{i-1} / h."""
    lv = Levels(denoiser, timesteps)
    x, prev = x_T, None
    for i in range(len(lv)):
        x0 = denoiser(x, lv.t(i, x)).x0
        if i == len(lv) - 1:
            x = x0
        else:
            h = lv.lam[i + 1] - lv.lam[i]
            d = x0 if prev is None else x0 + (0.5 * h / prev[1]) * (x0 - prev[0])
            decay = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
            # DPM-Solver++ SDE (2M): the exact linear part, the data term and the injected noise
            x = ((lv.sigma[i + 1] / lv.sigma[i] * math.exp(-h)) * x + (lv.alpha[i + 1] * decay) * d
                 + (lv.sigma[i + 1] * math.sqrt(decay)) * noise.like(x))
            prev = (x0, h)
        if callback is not None:
            callback(i, lv.ts[i].item(), x, x0)
    return x
