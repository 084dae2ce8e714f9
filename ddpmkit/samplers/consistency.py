"""Multistep consistency sampling (Song et al. 2023, algorithm 1), for a consistency-distilled run."""

from __future__ import annotations

import torch

from .registry import register


@register("consistency", summary="consistency models' multistep sampler: x0 = f(x_t), then fresh noise to the next "
                                 "timestep; for a consistency-distilled run", default_steps=1,
          default_spacing="trailing")
def consistency(denoiser, x_T, timesteps, *, noise, callback=None):
    """One network call per visited timestep: the clean image is the Denoiser's x0_hat (a consistency model's
    f(x_t, t), see ``Denoiser(consistency=...)``), and before each next call it is noised afresh to the next (lower)
    timestep, z = sqrt(alpha_bar) x0_hat + sqrt(1 - alpha_bar) eps with new eps (Song et al. 2023, alg. 1). One step
    is f(x_T); the result is the last x0_hat."""
    ab = denoiser.schedule.alpha_bar.double().cpu()
    x = x_T
    B = x.shape[0]
    x0 = x
    for i, k in enumerate(range(len(timesteps) - 1, -1, -1)):
        t = int(timesteps[k])
        x0 = denoiser(x, torch.full((B,), t, dtype=torch.long, device=x.device)).x0
        if k > 0:  # Song et al. 2023, alg. 1: x_tau = x + sqrt(tau^2 - eps^2) z, in the VP form of DDPM eq. 4
            a = float(ab[int(timesteps[k - 1])])
            x = a ** 0.5 * x0 + (1.0 - a) ** 0.5 * noise.like(x0)
        else:
            x = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x
