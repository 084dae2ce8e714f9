"""The diffusion process itself: the forward process q, the objectives' conversions, and the posterior.

Everything here is a plain function of a :class:`~ddpmkit.diffusion.schedule.NoiseSchedule` and tensors; the
network stays outside (:mod:`~ddpmkit.diffusion.denoiser` reads a network's output, :mod:`~ddpmkit.diffusion.losses`
trains one). Timesteps ``t`` are long tensors [B], 0-indexed. Images are float tensors [B, C, H, W].

Objectives (what the network predicts):
    ``eps``: the noise (DDPM's L_simple, the default);
    ``x0``: the clean image;
    ``v``: v = sqrt(alpha_bar) * eps - sqrt(1 - alpha_bar) * x0 (Salimans & Ho 2022).
"""

from __future__ import annotations

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
    "check_objective",
    "x0_from_output",
    "eps_from_x0",
    "output_from",
    "split_output",
]

OBJECTIVES = ("eps", "x0", "v")
VARIANCES = ("small", "large", "learned", "analytic")  # the last two: diffusion/variance.py


def check_objective(objective: str) -> None:
    """ValueError naming the choices unless ``objective`` is eps, x0 or v."""
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
    check_objective(objective)
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
    check_objective(objective)
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


# ---------------------------------------------------------------------------------------------- from alpha_bar itself
# The same conversions as predict_x0 / predict_eps / training_target, from a tensor ``ab`` of alpha_bar values that
# broadcasts against x_t (at real-valued timesteps, or inside guidance), in the precision of ``ab``.


def x0_from_output(x_t: torch.Tensor, out: torch.Tensor, ab: torch.Tensor, objective: str) -> torch.Tensor:
    """x0 from a network output: DDPM eq. 4 solved for x0 (eps), the output itself (x0), or
    x0 = sqrt(ab) x_t - sqrt(1 - ab) v (v; Salimans & Ho 2022)."""
    x, o = x_t.to(ab.dtype), out.to(ab.dtype)
    if objective == "eps":
        return (x - (1.0 - ab).sqrt() * o) / ab.sqrt()
    if objective == "x0":
        return o
    return ab.sqrt() * x - (1.0 - ab).sqrt() * o


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """The noise of x_t given x0: DDPM eq. 4 solved for eps."""
    return (x_t.to(ab.dtype) - ab.sqrt() * x0.to(ab.dtype)) / (1.0 - ab).sqrt()


def output_from(x0: torch.Tensor, eps: torch.Tensor, ab: torch.Tensor, objective: str) -> torch.Tensor:
    """The network output that means (x0, eps): eps, x0, or v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    return ab.sqrt() * eps - (1.0 - ab).sqrt() * x0


def split_output(out: torch.Tensor, x_t: torch.Tensor):
    """(the objective's C channels, the learned-variance channels or None) of a network's C- or 2C-channel output
    for x_t (Improved DDPM section 3.1: the network outputs the mean's prediction and v side by side)."""
    C = x_t.shape[1]
    if out.shape == x_t.shape:
        return out, None
    if out.ndim == x_t.ndim and out.shape[1] == 2 * C and out.shape[2:] == x_t.shape[2:] \
            and out.shape[0] == x_t.shape[0]:
        return out[:, :C], out[:, C:]
    raise ValueError(f"the network returned shape {tuple(out.shape)} for inputs {tuple(x_t.shape)}")
