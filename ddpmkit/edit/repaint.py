"""Inpainting with an unconditional model: RePaint (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising
Diffusion Probabilistic Models", algorithm 1 and section 4.2).

The chain walks the S timesteps tau_0 < ... < tau_{S-1} of a respaced process (``Denoiser.respaced``; S = T is the
paper's process, S = 250 of T = 1000 its experiments). Call "level i" the state at timestep tau_i, and level -1 the
clean image. Going down from level i to level i-1:

- the known pixels are drawn afresh from the image, x_known ~ q(x_{i-1} | x_0) (DDPM eq. 4; x_0 itself at the last
  step);
- the unknown pixels come from the model's step p(x_{i-1} | x_t) (DDPM algorithm 2 on the respaced process);
- the two are joined by the mask: x_{i-1} = m * x_known + (1 - m) * x_unknown (RePaint eq. 9).

Resampling (RePaint section 4.2): after reaching each level j = 0, J, 2J, ... (j < S - J), the chain goes back up J
levels with J forward steps q(x_i | x_{i-1}) = N(sqrt(1 - beta_i) x_{i-1}, beta_i I) (DDPM eq. 2) and comes down
again, R - 1 times, so that the generated part has time to agree with the known part. R = 1 is plain
replacement. The walk is the official code's ``get_schedule_jump``.

Why it works, and why no DDIM variant is offered: going up one level with q and down with the ancestral step is,
for small steps, one step of Langevin dynamics on the noisy density q(x_i) (drift beta grad log q, noise variance
2 beta); alternated with drawing the known pixels afresh it pulls the unknown pixels towards their conditional law.
Down with DDIM at eta = 0 instead is, in the same limit, Langevin with half the step (the forward noise is the only
noise; the deterministic step removes half the drift), so a DDIM variant is sound only where DDPM's is, and mixes
about half as fast per network call. Measured on the exact Gaussian of tests/test_edit.py (S = 250 of T = 1000,
J = 10, 2000 samples, whitened error of the conditional mean): DDPM R = 5 0.22, R = 10 0.10; DDIM eta 0 R = 5 0.40,
R = 10 0.17. DDIM's reason to exist, few large steps, is where both go wrong (S = 50: the conditional variance comes
out 20-25% too small at any R). It would cost more for the same result, so only the ancestral step is offered.
RePaint is not exact at any R: the known pixels at level i are drawn given x_0, not given the unknown pixels'
noisy values, and the last levels mix slowly; the tests state the bias that remains.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..samplers import timesteps as make_timesteps
from ..samplers.noise import as_noise

__all__ = ["repaint", "repaint_levels", "repaint_model_calls", "DEFAULT_JUMP", "DEFAULT_RESAMPLE"]

# RePaint section 5 (its experiments): j = 10 levels back, r = 10 resamplings, on T = 250 respaced steps
DEFAULT_JUMP = 10
DEFAULT_RESAMPLE = 10


def _check_positive(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def repaint_levels(steps: int, jump: int = DEFAULT_JUMP, resample: int = DEFAULT_RESAMPLE) -> list[int]:
    """The levels the chain visits, from S - 1 down to -1 (the clean image), jumps included.

    After arriving at level j for j in 0, J, 2J, ... below S - J, the walk goes up J levels and back down, R - 1
    times (the official RePaint code's ``get_schedule_jump(t_T=S, jump_length=J, jump_n_sample=R)``).
    """
    S = _check_positive("steps", steps)
    J = _check_positive("jump", jump)
    R = _check_positive("resample", resample)
    jumps = {j: R - 1 for j in range(0, S - J, J)}
    levels = [S - 1]
    t = S - 1
    while t >= 0:
        t -= 1
        levels.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(J):
                t += 1
                levels.append(t)
    return levels


def repaint_model_calls(steps: int, jump: int = DEFAULT_JUMP, resample: int = DEFAULT_RESAMPLE) -> int:
    """Network evaluations per image: one per downward move of :func:`repaint_levels`."""
    lv = repaint_levels(steps, jump, resample)
    return sum(1 for a, b in zip(lv, lv[1:]) if b < a)


@torch.inference_mode()
def repaint(denoiser, image: torch.Tensor, mask: torch.Tensor, *, steps: int | None = None,
            spacing: str = "uniform", jump: int = DEFAULT_JUMP, resample: int = DEFAULT_RESAMPLE, noise=None,
            x_T: torch.Tensor | None = None, callback: Callable | None = None, timesteps=None) -> torch.Tensor:
    """Fill in the pixels of ``image`` where ``mask`` is False; the known pixels (mask True) come back unchanged.

    Args:
        denoiser: a :class:`~ddpmkit.diffusion.Denoiser` (its variance, clipping and condition are used).
        image: float [B, C, H, W] in the model's range ([-1, 1]); its unknown pixels are ignored.
        mask: bool (or 0/1) tensor broadcastable to ``image``, True where the pixel is known.
        steps: S, the timesteps of the respaced process (default all T), as for the samplers.
        spacing: how those S timesteps are spaced, as for the samplers.
        jump: J of RePaint (10 by default, the paper's).
        resample: R of RePaint (10 by default, the paper's).
        noise: a NoiseSource, int seed (per-sample streams), torch.Generator or None, as for ``sample``.
        x_T: the starting noise (default drawn from ``noise``).
        callback: ``callback(k, t, x, x0_hat)`` after each downward move k with the timestep t just denoised.
        timesteps: the respaced timesteps when already computed (then ``steps`` and ``spacing`` are not read).

    Returns float [B, C, H, W]: exactly ``image`` where the mask is True, the model's completion elsewhere.
    """
    if timesteps is None:
        tau = make_timesteps(denoiser.schedule, denoiser.T if steps is None else steps, spacing)
    else:
        tau = timesteps
    levels = repaint_levels(len(tau), jump, resample)
    noise = as_noise(noise)
    dev = denoiser.device
    x0 = image.to(device=dev, dtype=torch.float32)
    known = torch.as_tensor(mask, device=dev).to(torch.bool).expand_as(x0)
    den = denoiser.respaced(tau).to(dev)
    sched = den.schedule
    sqrt_ab, sqrt_1mab = sched.sqrt_alpha_bar.double().cpu(), sched.sqrt_one_minus_alpha_bar.double().cpu()
    betas = sched.betas.double().cpu()
    x = noise.initial(x0.shape, dev) if x_T is None else x_T.to(device=dev, dtype=torch.float32)
    B = x.shape[0]
    k = 0
    for a, b in zip(levels, levels[1:]):
        if b < a:  # down from level a to a - 1
            tt = torch.full((B,), a, dtype=torch.long, device=dev)
            mean, log_var, pred = den.p_mean_variance(x, tt)
            if a > 0:
                # DDPM algorithm 2: x_{t-1} = mu_theta(x_t, t) + sigma_t z
                unknown = mean + torch.exp(0.5 * log_var) * noise.like(x)
                # DDPM eq. 4: the known pixels at level a - 1, x = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps
                known_x = float(sqrt_ab[a - 1]) * x0 + float(sqrt_1mab[a - 1]) * noise.like(x)
            else:
                unknown, known_x = mean, x0
            x = torch.where(known, known_x, unknown)  # RePaint eq. 9
            if callback is not None:
                callback(k, int(tau[a]), x, pred.x0)
            k += 1
        else:  # up from level a to a + 1 = b
            # DDPM eq. 2: q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
            beta = float(betas[b])
            x = (1.0 - beta) ** 0.5 * x + beta ** 0.5 * noise.like(x)
    return x
