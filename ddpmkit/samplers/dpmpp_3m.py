"""DPM-Solver++(3M): the third-order multistep solver in data-prediction form (Lu et al. 2022, "DPM-Solver++",
the multistep third-order update), with the second-difference term weighted so that the step is third order."""

from __future__ import annotations

import math

from ._ode import Levels
from .registry import register

LOWER_ORDER_BELOW = 15  # below this many steps the second-to-last step is second order, as the reference code does


@register("dpmpp-3m", summary="DPM-Solver++(3M), Lu et al. 2022: third-order multistep, deterministic",
          default_steps=20, default_spacing="logsnr", continuous=True)
def dpmpp_3m(denoiser, x_T, timesteps, *, noise, callback=None):
    """One network call per timestep. Orders 1, 2, then 3 as predictions accumulate; the second-to-last step is
    second order when there are fewer than 15 steps, and the last, to sigma = 0, returns x0_hat."""
    lv = Levels(denoiser, timesteps)
    S = len(lv)
    x, hist = x_T, []  # hist: (x0_hat, lambda) of earlier steps, newest last
    for i in range(S):
        x0 = denoiser(x, lv.t(i, x)).x0
        if i == S - 1:
            x = x0  # to sigma = 0: x0_hat
        else:
            order = min(3, len(hist) + 1)
            if i == S - 2 and S < LOWER_ORDER_BELOW:
                order = min(order, 2)
            lam_s0, lam_t = lv.lam[i], lv.lam[i + 1]
            h = lam_t - lam_s0
            phi1 = math.expm1(-h)  # e^{-h} - 1
            x_lin = (lv.sigma[i + 1] / lv.sigma[i]) * x - (lv.alpha[i + 1] * phi1) * x0
            if order == 1:
                x = x_lin  # DPM-Solver++(1), the same as DDIM
            elif order == 2:
                m1, lam_s1 = hist[-1]
                r0 = (lam_s0 - lam_s1) / h
                # DPM-Solver++ alg. 2 (midpoint form): x_lin - 0.5 alpha_t (e^{-h} - 1) (x0_i - x0_{i-1}) / r0
                x = x_lin - (0.5 * lv.alpha[i + 1] * phi1 / r0) * (x0 - m1)
            else:
                (m2, lam_s2), (m1, lam_s1) = hist[-2], hist[-1]
                r0, r1 = (lam_s0 - lam_s1) / h, (lam_s1 - lam_s2) / h
                d1_0, d1_1 = (x0 - m1) / r0, (m1 - m2) / r1
                # DPM-Solver++ third-order multistep: D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
                # D2 = (D1_0 - D1_1) / (r0 + r1)
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                # D1 ~ h x0' and D2 ~ h^2 x0'' / 2, and the exponential integrator weighs x0' by
                # alpha_t (h - 1 + e^{-h}) and x0'' by alpha_t (h^2/2 - h + 1 - e^{-h}), so
                # x_t = x_lin + alpha_t ((e^{-h} - 1) / h + 1) D1 + alpha_t (1 - 2 (e^{-h} - 1 + h) / h^2) D2.
                # (The reference code weighs D2 by half that, which leaves the step second order.)
                x = (x_lin + (lv.alpha[i + 1] * (phi1 / h + 1.0)) * d1
                     + (lv.alpha[i + 1] * (1.0 - 2.0 * (phi1 + h) / h ** 2)) * d2)
            hist = (hist + [(x0, lam_s0)])[-2:]
        if callback is not None:
            callback(i, lv.ts[i].item(), x, x0)
    return x
