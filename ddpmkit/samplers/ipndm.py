"""Improved PNDM (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator" (DEIS), iPNDM):
DDIM's step with the noise prediction replaced by an Adams-Bashforth combination of the last four, with a
lower-order warm start."""

from __future__ import annotations

from ._ode import Levels
from .registry import register

# Adams-Bashforth coefficients of orders 1 to 4, newest prediction first
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


@register("ipndm", summary="improved PNDM (DEIS paper): DDIM steps on a 4th-order Adams-Bashforth noise estimate",
          default_steps=20, default_spacing="logsnr", continuous=True)
def ipndm(denoiser, x_T, timesteps, *, noise, callback=None):
    """One network call per timestep, the last step included. In y = x / alpha and the EDM noise level
    sigma_e = sigma / alpha the ODE is dy / d sigma_e = eps, and each step is
    y_{i+1} = y_i + (sigma_e,{i+1} - sigma_e,i) * sum_k c_k eps_{i-k} with the coefficients of order
    min(4, i + 1) (DEIS, iPNDM)."""
    lv = Levels(denoiser, timesteps)
    x, eps_hist = x_T, []  # newest first
    for i in range(len(lv)):
        pred = denoiser(x, lv.t(i, x))
        eps_hist = [pred.eps] + eps_hist[:3]
        coefs = _AB[len(eps_hist) - 1]
        eps = sum(c * e for c, e in zip(coefs, eps_hist))
        # DEIS iPNDM in the DDIM form: x_{i+1} / alpha_{i+1} = x_i / alpha_i + (sigma_e,{i+1} - sigma_e,i) eps
        x = lv.alpha[i + 1] * (x / lv.alpha[i] + (lv.edm_sigma[i + 1] - lv.edm_sigma[i]) * eps)
        if callback is not None:
            callback(i, lv.ts[i].item(), x, pred.x0)
    return x
