"""EDM's preconditioning of a network (Karras et al. 2022, section 5 and table 1), on ddpmkit's discrete VP schedule.

EDM trains a denoiser D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma)) of
x = y + sigma n, y the clean image, and scales F's input and its target to unit variance at every noise level.
A timestep t of a VP schedule is EDM's noise level sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t) with
x = x_t / sqrt(alpha_bar_t) (EDM section 2; k-diffusion's ``external.py`` reads a DDPM model the same way), so a
preconditioned network is a denoiser of (x_t, t) whose output D is x0_hat: the Denoiser reads it with objective x0.

Functions over tensors; the coefficients are float64 tensors [B] (one per sample).
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["sigma_of_alpha_bar", "edm_scalings", "edm_loss_weight", "preconditioned"]


def sigma_of_alpha_bar(ab) -> torch.Tensor:
    """EDM's noise level of a VP timestep with alpha_bar ``ab``: sqrt((1 - ab) / ab), float64."""
    ab = torch.as_tensor(ab, dtype=torch.float64)
    return ((1.0 - ab) / ab).sqrt()  # EDM sec. 2: x_t = sqrt(ab) (y + sigma n), so sigma^2 = (1 - ab) / ab


def edm_scalings(sigma, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise) at noise levels ``sigma`` (float64), EDM table 1 ("Ours")."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data must be positive, got {sigma_data}")
    sd2 = float(sigma_data) ** 2
    total = sigma * sigma + sd2
    c_skip = sd2 / total  # EDM table 1: sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out = sigma * sigma_data / total.sqrt()  # EDM table 1: sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in = 1.0 / total.sqrt()  # EDM table 1: 1 / sqrt(sigma^2 + sigma_data^2)
    c_noise = sigma.log() / 4.0  # EDM table 1: ln(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, float64 (EDM table 1): 1 / c_out^2, which
    makes the weighted loss of D the unit-variance loss of F (EDM eq. 8)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (sigma * sigma + sigma_data ** 2) / (sigma * sigma_data) ** 2  # EDM table 1, lambda(sigma)


def preconditioned(net: Callable, x_t: torch.Tensor, ab, sigma_data: float, cond=None) -> torch.Tensor:
    """D(x; sigma) of the backbone ``net`` at the VP sample ``x_t`` [B, ...] whose alpha_bar is ``ab`` (a number or
    a tensor [B]): ``net(c_in x, c_noise[, cond])`` with x = x_t / sqrt(ab) and c_noise a float tensor [B], and
    D = c_skip x + c_out F (EDM eq. 7). D is the clean image's estimate, float32 (float64 for a float64 x_t)."""
    B = x_t.shape[0]
    ab = torch.as_tensor(ab, dtype=torch.float64, device=x_t.device)
    ab = ab.expand(B) if ab.ndim == 0 else ab
    if ab.shape != (B,):
        raise ValueError(f"alpha_bar must be one number or one per sample ({B}), got shape {tuple(ab.shape)}")
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma_of_alpha_bar(ab), sigma_data)

    def col(c):
        return c.view(-1, *([1] * (x_t.ndim - 1)))

    x = x_t.double() / col(ab.sqrt())  # EDM sec. 2: the VP sample as EDM's x = y + sigma n
    inp = (col(c_in) * x).to(x_t.dtype)
    noise_label = c_noise.to(x_t.dtype)
    F = net(inp, noise_label) if cond is None else net(inp, noise_label, cond)
    if F.shape != x_t.shape:
        raise ValueError(f"a preconditioned network must output the image's shape {tuple(x_t.shape)}, got "
                         f"{tuple(F.shape)}")
    D = col(c_skip) * x + col(c_out) * F.double()  # EDM eq. 7: D = c_skip x + c_out F(c_in x; c_noise)
    return D.to(torch.float64 if x_t.dtype == torch.float64 else torch.float32)
