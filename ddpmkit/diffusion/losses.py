"""Training objectives: the per-sample loss of a network on a batch of clean images (DDPM algorithm 1)."""

from __future__ import annotations

from typing import Callable

import torch

from .process import check_objective, q_sample, training_target
from .schedule import NoiseSchedule

__all__ = ["sample_timesteps", "training_losses", "training_loss"]


def sample_timesteps(batch_size: int, T: int, *, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, drawn independently for every sample of a batch (DDPM algorithm 1)."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, T, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def training_losses(net: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *, objective: str = "eps",
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, cond=None):
    """Per-sample mean squared error of the objective, and the timesteps used.

    t is drawn uniformly per sample and noise from N(0, I) unless given (DDPM algorithm 1). ``cond`` (for
    example class labels [B]) is passed to the network as ``net(x_t, t, cond)`` when it is not None.
    Returns ``(losses [B], t [B])``.
    """
    check_objective(objective)
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(B, schedule.T, generator=generator, device=x0.device)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(schedule, x0, t, noise, objective)
    out = net(x_t, t) if cond is None else net(x_t, t, cond)
    # DDPM eq. 14 (L_simple): || eps - eps_theta(x_t, t) ||^2, averaged over the dimensions
    losses = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return losses, t


def training_loss(net: Callable, schedule: NoiseSchedule, x0: torch.Tensor, **kwargs) -> torch.Tensor:
    """The mean over the batch of :func:`training_losses`: the scalar to minimise."""
    return training_losses(net, schedule, x0, **kwargs)[0].mean()
