"""DDPM's ancestral sampler (DDPM algorithm 2), at any number of steps by respacing (Improved DDPM section 4)."""

from __future__ import annotations

import torch

from .registry import register


@register("ddpm", summary="ancestral sampling, DDPM algorithm 2; S < T respaces the betas (Improved DDPM sec. 4)",
          default_steps=None, default_spacing="uniform", variance=True)
def ddpm(denoiser, x_T, timesteps, *, noise, callback=None):
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z over the visited timesteps; the last step returns the mean.

    At S < T the process is the one whose alpha_bar are those of the visited timesteps (``Denoiser.respaced``),
    and sigma_t^2 is the Denoiser's variance of that process; at S = T this is the paper's sampler.
    """
    den = denoiser.respaced(timesteps)
    x = x_T
    B = x.shape[0]
    for step, i in enumerate(range(den.T - 1, -1, -1)):
        tt = torch.full((B,), i, dtype=torch.long, device=x.device)
        mean, log_var, pred = den.p_mean_variance(x, tt)
        if i > 0:
            # DDPM algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z
            x = mean + torch.exp(0.5 * log_var) * noise.like(x)
        else:
            x = mean
        if callback is not None:
            callback(step, int(timesteps[i]), x, pred.x0)
    return x
