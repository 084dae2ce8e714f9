"""DPM-Solver++(2M): the second-order multistep solver of the diffusion ODE in data-prediction form
(Lu et al. 2022, "DPM-Solver++", algorithm 2)."""

from __future__ import annotations

import math

from ._ode import Levels
from .registry import register


@register("dpmpp-2m", summary="DPM-Solver++(2M), Lu et al. 2022 alg. 2: second-order multistep, deterministic",
          default_steps=20, default_spacing="logsnr", continuous=True)
def dpmpp_2m(denoiser, x_T, timesteps, *, noise, callback=None):
    """One network call per timestep. The first step is first order (no earlier prediction yet), and so is the
    last, to sigma = 0, which returns x0_hat; the others extrapolate the data prediction with the previous one."""
    lv = Levels(denoiser, timesteps)
    x, prev = x_T, None  # prev: (x0_hat, h) of the step before
    for i in range(len(lv)):
        x0 = denoiser(x, lv.t(i, x)).x0
        h = lv.lam[i + 1] - lv.lam[i]
        if i == len(lv) - 1:
            x = x0  # to sigma = 0 (h = inf): the first-order step gives x0_hat
        else:
            d = x0
            if prev is not None:
                r = prev[1] / h
                # DPM-Solver++ alg. 2: D = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i-1}, r = h_{i-1} / h_i
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * prev[0]
            # DPM-Solver++ alg. 2: x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D
            x = (lv.sigma[i + 1] / lv.sigma[i]) * x - (lv.alpha[i + 1] * math.expm1(-h)) * d
            prev = (x0, h)
        if callback is not None:
            callback(i, lv.ts[i].item(), x, x0)
    return x
