"""Image-to-image with an unconditional model: SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing
with Stochastic Differential Equations", algorithm 1).

Noise the input to t0 = strength x T with q(x_t0 | x_0) (DDPM eq. 4), then run any registered sampler from t0 down
to a clean image. The sampler visits its own timesteps (those of a plain run at the same ``steps`` and
``spacing``) that lie at or below t0, so a strength s costs about s times the network calls of plain sampling
(as diffusers' img2img pipelines do); the input is noised to the first of them.

- strength 0 visits no timestep and returns the input unchanged;
- strength 1 visits every timestep of plain sampling and starts from pure noise, x_T = eps, so it *is* plain
  sampling with the same noise (the input's remaining weight there, sqrt(alpha_bar_{T-1}) = 0.006 for the linear
  schedule at T = 1000, is dropped);
- in between, low strengths keep the input's layout and colours, high ones keep less and less of it.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ..samplers.noise import as_noise
from ..samplers.options import SamplingPlan, resolve
from .masks import EditError

__all__ = ["sdedit", "sdedit_timesteps", "check_strength"]


def check_strength(strength) -> float:
    """``strength`` as a float in [0, 1]; EditError (one line) otherwise."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise EditError(f"--strength must be a number in [0, 1], got {strength!r}") from None
    if not (math.isfinite(s) and 0.0 <= s <= 1.0):
        raise EditError(f"--strength must lie in [0, 1], got {strength!r}")
    return s


def sdedit_timesteps(tau, T: int, strength: float) -> np.ndarray:
    """The timesteps of a plain run (``tau``, increasing, 0-indexed) that SDEdit at ``strength`` visits.

    Timestep tau_i is step tau_i + 1 of T in the paper's 1-indexed count; it is visited when tau_i + 1 <= s T, so
    that s = 1 keeps every one and s = 0 none.
    """
    s = check_strength(strength)
    tau = np.asarray(tau)
    return tau[tau + 1 <= s * T + 1e-9]


@torch.inference_mode()
def sdedit(denoiser, image: torch.Tensor, strength: float, *, sampler: str | SamplingPlan = "ddim",
           steps: int | None = None, spacing: str | None = None, noise=None, callback: Callable | None = None,
           **options) -> torch.Tensor:
    """Edit ``image`` (float [B, C, H, W] in [-1, 1]) at ``strength`` in [0, 1] with ``sampler``.

    ``steps`` and ``spacing`` are those of the plain run whose tail is walked (the sampler's defaults when None);
    ``noise`` and ``options`` are as for :func:`ddpmkit.samplers.sample`. The first draw of ``noise`` is the eps of
    q(x_t0 | x_0), the later ones the sampler's, so strength 1 with a seed equals ``sample`` with that seed.
    ``sampler`` may be a :class:`~ddpmkit.samplers.SamplingPlan`, whose timesteps are used as they are.
    """
    s = check_strength(strength)
    p = sampler if isinstance(sampler, SamplingPlan) else resolve(sampler, denoiser.schedule, steps, spacing,
                                                                  **options)
    info, tau, opts = p.info, p.timesteps, p.options
    x0 = image.to(device=denoiser.device, dtype=torch.float32)
    sub = sdedit_timesteps(tau, denoiser.T, s)
    if len(sub) == 0:
        return x0.clone()
    noise = as_noise(noise)
    eps = noise.initial(x0.shape, x0.device)
    if len(sub) == len(tau):  # strength 1: plain sampling from x_T = eps
        x_t0 = eps
    else:
        ab = float(denoiser.schedule.alpha_bar_at(torch.as_tensor(sub[-1])))  # real-valued t interpolated
        # DDPM eq. 4: x_t0 = sqrt(alpha_bar_t0) x_0 + sqrt(1 - alpha_bar_t0) eps
        x_t0 = math.sqrt(ab) * x0 + math.sqrt(1.0 - ab) * eps
    return info.fn(denoiser.to(x0.device), x_t0, sub, noise=noise, callback=callback, **opts)
