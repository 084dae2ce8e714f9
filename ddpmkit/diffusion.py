"""The diffusion process itself: the forward process, the training objectives, and the posterior.

Everything here is a plain function of a :class:`~ddpmkit.schedule.NoiseSchedule` and tensors; the network
stays outside. Timesteps ``t`` are long tensors [B], 0-indexed. Images are float tensors [B, C, H, W].

Objectives (what the network predicts):
    ``eps``: the noise (DDPM's L_simple, the default);
    ``x0``: the clean image;
    ``v``: v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import NoiseSchedule, extract

__all__ = [
    "OBJECTIVES",
    "VARIANCES",
    "q_sample",
    "training_target",
    "predict_x0",
    "predict_eps",
    "q_posterior",
    "model_variance",
    "p_mean_variance",
    "sample_timesteps",
    "training_losses",
    "training_loss",
]

OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("small", "large")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draw x_t from q(x_t | x_0) in closed form (DDPM eq. 4)."""
    # DDPM eq. 4: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    return (extract(schedule.sqrt_alpha_bar, t, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim) * noise)


def training_target(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    objective: str = "eps") -> torch.Tensor:
    """What the network should output at (x_t, t) for the given objective."""
    _check_objective(objective)
    if objective == "eps":
        return noise
    if objective == "x0":
        return x0
    # Salimans & Ho 2022, eq. 8 (with alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar))
    return (extract(schedule.sqrt_alpha_bar, t, x0.ndim) * noise
            - extract(schedule.sqrt_one_minus_alpha_bar, t, x0.ndim) * x0)


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor,
               objective: str = "eps") -> torch.Tensor:
    """The clean image implied by a model output at (x_t, t)."""
    _check_objective(objective)
    if objective == "eps":
        # DDPM eq. 4 solved for x_0: x_0 = x_t / sqrt(alpha_bar) - sqrt(1/alpha_bar - 1) eps
        return (extract(schedule.sqrt_recip_alpha_bar, t, x_t.ndim) * x_t
                - extract(schedule.sqrt_recipm1_alpha_bar, t, x_t.ndim) * model_output)
    if objective == "x0":
        return model_output
    # Salimans & Ho 2022: x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v
    return (extract(schedule.sqrt_alpha_bar, t, x_t.ndim) * x_t
            - extract(schedule.sqrt_one_minus_alpha_bar, t, x_t.ndim) * model_output)


def predict_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The noise implied by x_t and a (possibly clipped) x_0 at step t."""
    # DDPM eq. 4 solved for eps: eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1/alpha_bar - 1)
    return ((extract(schedule.sqrt_recip_alpha_bar, t, x_t.ndim) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alpha_bar, t, x_t.ndim))


def q_posterior(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6 and 7)."""
    # DDPM eq. 7: mu_tilde = sqrt(ab_{t-1}) beta_t / (1 - ab_t) x_0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
    mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
            + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
    var = extract(schedule.posterior_variance, t, x_t.ndim)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, var, log_var


def model_variance(schedule: NoiseSchedule, variance: str = "small"):
    """The fixed reverse-process variance sigma_t^2 and its log, as arrays over t (DDPM section 3.2).

    ``small`` is beta_tilde_t (its log clipped at t=0); ``large`` is beta_t, except at t=0 where, as in the
    official DDPM code, beta_tilde of the next step is used so that the decoder's variance is not beta_1.
    """
    if variance == "small":
        return schedule.posterior_variance, schedule.posterior_log_variance_clipped
    if variance == "large":
        var = torch.cat([schedule.posterior_variance[1:2], schedule.betas[1:]]) if schedule.T > 1 \
            else schedule.betas.clone()
        return var, torch.log(var)
    raise ValueError(f"unknown variance {variance!r}: choose 'small' (beta_tilde) or 'large' (beta)")


def p_mean_variance(schedule: NoiseSchedule, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                    objective: str = "eps", variance: str = "small", clip_x0: bool = True):
    """Mean, variance, log-variance of p(x_{t-1} | x_t) and the x_0 prediction behind the mean.

    The mean is the posterior mean of q(x_{t-1} | x_t, x0_hat) with x0_hat the model's clean-image prediction,
    clipped to [-1, 1] when ``clip_x0`` (as the official DDPM sampler does). Without clipping and with the
    ``eps`` objective this equals DDPM eq. 11.
    """
    x0_hat = predict_x0(schedule, x_t, t, model_output, objective)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    mean, _, _ = q_posterior(schedule, x0_hat, x_t, t)
    var_arr, log_var_arr = model_variance(schedule, variance)
    return mean, extract(var_arr, t, x_t.ndim), extract(log_var_arr, t, x_t.ndim), x0_hat


def sample_timesteps(batch_size: int, T: int, *, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, drawn independently for every sample of a batch (DDPM algorithm 1)."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, T, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def training_losses(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *, objective: str = "eps",
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None):
    """Per-sample mean squared error of the objective, and the timesteps used.

    t is drawn uniformly per sample and noise from N(0, I) unless given (DDPM algorithm 1). Returns
    ``(losses [B], t [B])``.
    """
    _check_objective(objective)
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(B, schedule.T, generator=generator, device=x0.device)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(schedule, x0, t, noise, objective)
    out = model(x_t, t)
    # DDPM eq. 14 (L_simple): || eps - eps_theta(x_t, t) ||^2, averaged over the dimensions
    losses = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return losses, t


def training_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, **kwargs) -> torch.Tensor:
    """The mean over the batch of :func:`training_losses`: the scalar to minimise."""
    return training_losses(model, schedule, x0, **kwargs)[0].mean()
