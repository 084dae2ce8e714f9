"""DDIM (Song et al. 2020): eq. 12 with sigma from eq. 16 scaled by eta."""

from __future__ import annotations

import math

import torch

from .registry import Option, register

# Above 1, sigma^2 can exceed 1 - a_prev: the coefficient sqrt(1 - a_prev - sigma^2) of eps_hat in eq. 12 is
# imaginary, and clamping it to 0 silently samples another process (its x_t no longer has the trained marginals).
_ETA_WHY = (" (DDIM's eta lies in [0, 1]: above 1, sigma^2 can exceed 1 - alpha_bar_prev in eq. 12 and the "
            "sampler is no longer DDIM)")


@register("ddim", summary="DDIM eq. 12; eta 0 is deterministic, eta 1 at S = T is DDPM with beta_tilde",
          default_steps=50, default_spacing="uniform",
          options=(Option("eta", float, 0.0, "DDIM eta in [0, 1]: 0 deterministic, 1 DDPM-like", minimum=0.0,
                          maximum=1.0, why=_ETA_WHY),),
          variance=lambda options, variance: variance == "analytic" and options.get("eta", 0.0) > 0)
def ddim(denoiser, x_T, timesteps, *, noise, callback=None, eta: float = 0.0):
    """One network call per visited timestep; the last step goes to alpha_bar = 1 and returns x0_hat.

    With eta > 0 the noise of each step is the Denoiser's :meth:`~ddpmkit.diffusion.Denoiser.step_variance` of
    DDIM's sigma^2: the same sigma^2 for a fixed variance, Analytic-DPM's optimal one under ``analytic``. eta = 0
    stays the deterministic sampler under every variance.
    """
    ab = denoiser.schedule.alpha_bar.double().cpu().numpy()
    x = x_T
    B = x.shape[0]
    for i, k in enumerate(range(len(timesteps) - 1, -1, -1)):
        t = int(timesteps[k])
        a_t = float(ab[t])
        a_prev = float(ab[timesteps[k - 1]]) if k > 0 else 1.0
        pred = denoiser(x, torch.full((B,), t, dtype=torch.long, device=x.device))
        # DDIM eq. 16: sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        # DDIM eq. 12: x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z
        x = math.sqrt(a_prev) * pred.x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * pred.eps
        if sigma > 0:
            # Analytic-DPM: the mean of eq. 12 (lambda = sigma) with the Denoiser's variance of that step
            var = denoiser.step_variance(t, timesteps[k - 1], sigma ** 2, last_noisy=k == 1)
            x = x + math.sqrt(var) * noise.like(x)
        if callback is not None:
            callback(i, t, x, pred.x0)
    return x
