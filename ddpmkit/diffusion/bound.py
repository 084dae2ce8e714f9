"""The terms of the variational bound (DDPM eq. 5): Gaussian KL, the discretized Gaussian decoder, one term per t.

They live here, below both users: the evaluation of the bound (``ddpmkit.metrics.nll``) and the training loss
of a learned variance (L_vlb of Improved DDPM's L_hybrid, ``ddpmkit.diffusion.losses``). Everything is in nats
per element unless a name says bits.
"""

from __future__ import annotations

import math

import torch

from .process import q_posterior
from .schedule import NoiseSchedule

__all__ = ["normal_kl", "approx_standard_normal_cdf", "discretized_gaussian_log_likelihood", "vlb_term_bits"]

_LN2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats (arguments broadcast)."""
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=tensor.dtype,
                                                                                          device=tensor.device)
                                      for a in (mean1, logvar1, mean2, logvar2))
    # Gaussian KL: 0.5 * (log s2^2/s1^2 + (s1^2 + (m1 - m2)^2) / s2^2 - 1)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that the official DDPM code uses."""
    # Page 1977 tanh approximation: Phi(x) ~ 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood in nats, per element, of data ``x`` in [-1, 1] on the 256-level grid under a Gaussian.

    Each level owns a bin of width 2/255 centred on it; the lowest bin extends to -inf (x < -0.999) and the
    highest to +inf (x > 0.999). Probabilities are clamped at 1e-12 before the log, as in the official code.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    # DDPM eq. 13: p(x0|x1) = prod_i int_{delta_-(x_i)}^{delta_+(x_i)} N(x; mu_i, sigma_1^2) dx
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_term_bits(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  model_mean: torch.Tensor, model_log_var: torch.Tensor) -> torch.Tensor:
    """Term t of the bound for each image, in bits/dim [B]: the decoder NLL -log p(x_0 | x_1) where t == 0 and
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) elsewhere (1-indexed x's; DDPM eq. 5 and 13).

    ``model_mean`` and ``model_log_var`` are p(x_{t-1} | x_t)'s (``log_var`` broadcasts: per pixel for a learned
    variance). The same computation as Improved DDPM's ``_vb_terms_bpd``.
    """
    true_mean, _, true_logvar = q_posterior(schedule, x0, x_t, t)    # DDPM eqs. 6-7
    # DDPM eq. 5: L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)), / ln 2 for bits
    kl = normal_kl(true_mean, true_logvar, model_mean, model_log_var).flatten(1).mean(dim=1) / _LN2
    # DDPM eq. 13: L_0 = -log p(x_0|x_1), discretized Gaussian decoder, log_scale = 0.5 log sigma_1^2
    log_scale = (0.5 * model_log_var).expand_as(x0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, log_scale).flatten(1).mean(dim=1) / _LN2
    return torch.where(t == 0, nll, kl)
