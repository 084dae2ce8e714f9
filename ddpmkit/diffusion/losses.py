"""Training objectives: the per-sample loss of a network on a batch of clean images (DDPM algorithm 1)."""

from __future__ import annotations

from typing import Callable

import torch

from .bound import vlb_term_bits
from .precond import edm_loss_weight, preconditioned, sigma_of_alpha_bar
from .process import check_objective, predict_x0, q_posterior, q_sample, split_output, training_target
from .variance import learned_log_var
from .schedule import NoiseSchedule

__all__ = ["sample_timesteps", "sample_edm_timesteps", "edm_training_losses", "training_losses", "training_loss",
           "HYBRID_LAMBDA", "hybrid_vlb", "vlb_loss", "TIMESTEP_SAMPLERS", "LossSecondMomentSampler", "LOSS_WEIGHTS",
           "loss_weights"]

LOSS_WEIGHTS = ("none", "min-snr")


def sample_timesteps(batch_size: int, T: int, *, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """t ~ U{0, ..., T-1}, drawn independently for every sample of a batch (DDPM algorithm 1)."""
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, T, (batch_size,), generator=generator, device=gen_device)
    return t.to(device) if device is not None else t


def training_losses(net: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *, objective: str = "eps",
                    t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, cond=None, loss_weight: str = "none",
                    min_snr_gamma: float = 5.0, vlb_only: bool = False):
    """Per-sample mean squared error of the objective, and the timesteps used.

    t is drawn uniformly per sample and noise from N(0, I) unless given (DDPM algorithm 1). ``cond`` (for
    example class labels [B]) is passed to the network as ``net(x_t, t, cond)`` when it is not None.
    ``loss_weight="min-snr"`` multiplies each sample's loss by :func:`loss_weights` (Hang et al. 2023).
    A network with 2C output channels (a learned variance) trains on L_hybrid (:func:`hybrid_vlb` added), or
    with ``vlb_only`` on L_vlb alone (:func:`vlb_loss`, the mean trained by the bound too; Improved DDPM sec. 3.3).
    Returns ``(losses [B], t [B])``.
    """
    check_objective(objective)
    if vlb_only and loss_weight != "none":
        raise ValueError("L_vlb alone is the bound itself: it takes no loss weight")
    B = x0.shape[0]
    if t is None:
        t = sample_timesteps(B, schedule.T, generator=generator, device=x0.device)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = q_sample(schedule, x0, t, noise)
    target = training_target(schedule, x0, t, noise, objective)
    out = net(x_t, t) if cond is None else net(x_t, t, cond)
    out, v = split_output(out, x_t)  # v: the variance channels of a --learn-sigma network, else None
    if vlb_only:
        if v is None:
            raise ValueError("training on L_vlb alone needs a learned variance: a network with twice the image "
                             "channels (--learn-sigma)")
        return vlb_loss(schedule, x0, x_t, t, out, v, objective, stop_mean_gradient=False), t
    # DDPM eq. 14 (L_simple): || eps - eps_theta(x_t, t) ||^2, averaged over the dimensions
    losses = (out.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if loss_weight != "none":
        losses = losses * loss_weights(schedule, t, objective, loss_weight, min_snr_gamma).to(losses.device)
    if v is not None:
        losses = losses + hybrid_vlb(schedule, x0, x_t, t, out, v, objective)
    return losses, t


def sample_edm_timesteps(batch_size: int, schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2, *,
                         generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Real-valued timesteps (float64 [B]) of EDM's training noise levels, ln sigma ~ N(p_mean, p_std^2) per
    sample (EDM table 1, "Ours"), each mapped onto ``schedule``: the t whose interpolated alpha_bar is
    1 / (1 + sigma^2) (:func:`~ddpmkit.diffusion.precond.sigma_of_alpha_bar` inverted), clamped to [0, T-1].

    A sigma beyond the schedule's range takes its end; the loss computes sigma again from t, so the pair stays
    consistent. Under the linear schedule (T = 1000, sigma from 0.0100 at t = 0 to 157 at t = 999) EDM's defaults
    put 0.23% of the draws below the range (z = -2.84) and 1e-7 above it (z = 5.22).
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(batch_size, generator=generator, device=gen_device, dtype=torch.float64)
    log_sigma = (p_mean + p_std * z).cpu()  # EDM table 1: ln(sigma) ~ N(P_mean, P_std^2)
    log_ab = -torch.log1p(torch.exp(2.0 * log_sigma))  # alpha_bar = 1 / (1 + sigma^2) (EDM sec. 2)
    t = torch.from_numpy(schedule.timestep_of_log_alpha_bar(log_ab.numpy())).clamp(0.0, schedule.T - 1)
    return t.to(device) if device is not None else t


def edm_training_losses(net: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *, sigma_data: float = 0.5,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, cond=None, p_mean: float = -1.2,
                        p_std: float = 1.2):
    """EDM's per-sample training loss of a preconditioned network (Karras et al. 2022, eq. 8 and table 1), and the
    timesteps used: lambda(sigma) mean((D(x_t, t) - x0)^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

    ``t`` are real-valued timesteps of ``schedule`` (drawn by :func:`sample_edm_timesteps` unless given), sigma is
    the EDM noise level of each, x_t = sqrt(alpha_bar) (x0 + sigma n) the VP sample at t, and D the
    preconditioned network's estimate of x0 (:func:`~ddpmkit.diffusion.precond.preconditioned`), ``net`` called as
    ``net(c_in x, c_noise[, cond])``. Returns ``(losses [B], t [B])``.
    """
    B = x0.shape[0]
    if t is None:
        t = sample_edm_timesteps(B, schedule, p_mean, p_std, generator=generator, device=x0.device)
    if noise is None:
        gen_device = generator.device if generator is not None else x0.device
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    ab = schedule.alpha_bar_at(t.to(x0.device).double())
    sigma = sigma_of_alpha_bar(ab)
    col = (-1,) + (1,) * (x0.ndim - 1)
    # EDM sec. 2: x = y + sigma n, and the VP sample x_t = sqrt(ab) x (DDPM eq. 4)
    x_t = (ab.sqrt().view(col) * (x0.double() + sigma.view(col) * noise.double())).to(x0.dtype)
    D = preconditioned(net, x_t, ab, sigma_data, cond)
    weight = edm_loss_weight(sigma, sigma_data).float()  # EDM table 1: lambda(sigma)
    # EDM eq. 8: lambda(sigma) ||D(y + n; sigma) - y||^2, averaged over the dimensions
    losses = weight * (D.float() - x0.float()).pow(2).flatten(1).mean(dim=1)
    return losses, t


# Improved DDPM eq. 16 and section 3.1: L_hybrid = L_simple + lambda L_vlb with lambda = 0.001
HYBRID_LAMBDA = 0.001


def vlb_loss(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
             v: torch.Tensor, objective: str = "eps", *, stop_mean_gradient: bool = True) -> torch.Tensor:
    """T * L_t per sample [B], in bits/dim: the one-sample estimate, under uniform t, of L_vlb = sum_t L_t (the
    bound without its prior term, which has no parameters; the official code's ``vb * num_timesteps``).

    L_t (:func:`~ddpmkit.diffusion.bound.vlb_term_bits`) compares q(x_{t-1} | x_t, x_0) with the model's mean, the
    posterior mean at the unclipped x0_hat of ``out`` (as training does in the Improved DDPM code), and its
    learned variance from ``v`` (eq. 15). With ``stop_mean_gradient`` the mean comes from the detached output, so
    that the bound trains the variance channels alone (L_hybrid, "stop-gradient to the mu_theta(x_t, t) output",
    sec. 3.1); without it the bound trains both (L_vlb alone, sec. 3.3).
    """
    mean_out = out.detach().float() if stop_mean_gradient else out.float()
    x0_hat = predict_x0(schedule, x_t, t, mean_out, objective)
    mean = q_posterior(schedule, x0_hat, x_t, t)[0]                   # DDPM eq. 7 with x0_hat
    log_var = learned_log_var(schedule, t, v.float())                 # Improved DDPM eq. 15
    return schedule.T * vlb_term_bits(schedule, x0.float(), x_t.float(), t, mean, log_var)


def hybrid_vlb(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor,
               v: torch.Tensor, objective: str = "eps") -> torch.Tensor:
    """lambda * T * L_t per sample [B]: the L_vlb part of L_hybrid (Improved DDPM eq. 16), the mean's gradient
    stopped, so that it trains the variance channels ``v`` alone (:func:`vlb_loss`)."""
    return HYBRID_LAMBDA * vlb_loss(schedule, x0, x_t, t, out, v, objective, stop_mean_gradient=True)


def training_loss(net: Callable, schedule: NoiseSchedule, x0: torch.Tensor, **kwargs) -> torch.Tensor:
    """The mean over the batch of :func:`training_losses`: the scalar to minimise."""
    return training_losses(net, schedule, x0, **kwargs)[0].mean()


def loss_weights(schedule: NoiseSchedule, t: torch.Tensor, objective: str = "eps", kind: str = "min-snr",
                 gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights [B] (float32) at timesteps ``t``: ones for ``none``; for ``min-snr`` the
    Min-SNR-gamma weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").

    The paper weights the x0-space error by min(SNR_t, gamma), SNR_t = alpha_bar_t / (1 - alpha_bar_t)
    (its eq. 9 and section 3.4). Each objective's error is a fixed multiple of the x0 error (DDPM eq. 4;
    Salimans & Ho 2022 for v), so the same weighting reads, on each objective's own loss:

    * x0:  ||x0 - x0_hat||^2                                       -> min(SNR, gamma)
    * eps: x0 - x0_hat = -(eps - eps_hat) / sqrt(SNR), so ||.||^2 = ||eps err||^2 / SNR
                                                                   -> min(SNR, gamma) / SNR = min(1, gamma / SNR)
    * v:   x0 = sqrt(ab) x_t - sqrt(1 - ab) v, so ||x0 err||^2 = (1 - ab) ||v err||^2 = ||v err||^2 / (SNR + 1)
                                                                   -> min(SNR, gamma) / (SNR + 1)
    """
    check_objective(objective)
    if kind not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss weight {kind!r}: choose one of {', '.join(LOSS_WEIGHTS)}")
    if kind == "none":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if not gamma > 0:
        raise ValueError(f"min-SNR gamma must be positive, got {gamma}")
    ab = schedule.alpha_bar.double().to(t.device)[t]
    snr = ab / (1.0 - ab)  # Hang et al. 2023 eq. 9: SNR_t = alpha_bar_t / (1 - alpha_bar_t)
    if objective == "x0":
        w = snr.clamp(max=gamma)  # Hang et al. 2023: min(SNR_t, gamma)
    elif objective == "eps":
        w = (gamma / snr).clamp(max=1.0)  # min(SNR, gamma) / SNR, written so that SNR -> 0 gives 1, not 0/0
    else:
        w = snr.clamp(max=gamma) / (snr + 1.0)  # min(SNR, gamma) / (SNR + 1) (Hang et al. 2023, section 3.4)
    return w.float()


TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")


class LossSecondMomentSampler:
    """Importance sampling of t for the bound (Improved DDPM section 3.3), as the official ``resample.py`` does.

    p_t is proportional to sqrt(E[L_t^2]) over the last ``history`` losses of every t, mixed with
    ``uniform_prob`` of the uniform law; uniform until every t has ``history`` losses (the warm-up). A drawn t
    carries the weight 1 / (T p_t), so that the weighted mean of the losses is an unbiased estimate of their mean
    under uniform t. The history is state (``state_dict``): a resumed run draws the same timesteps; every process
    updates it with the losses of the whole global batch, so all ranks agree.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001):
        self.T, self.history, self.uniform_prob = int(T), int(history), float(uniform_prob)
        self.losses = torch.zeros(self.T, self.history, dtype=torch.float64)
        self.counts = torch.zeros(self.T, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t, float64 [T]."""
        if not self.warmed_up():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        # Improved DDPM eq. 18: p_t proportional to sqrt(E[L_t^2]), sum p_t = 1
        w = self.losses.pow(2).mean(dim=1).sqrt()
        w = w / w.sum()
        # official resample.py: w * (1 - uniform_prob) + uniform_prob / T
        return w * (1.0 - self.uniform_prob) + self.uniform_prob / self.T

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None, device=None):
        """(t [B] long, weights [B] float32): t ~ p, weight 1 / (T p_t)."""
        p = self.probabilities()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator).cpu()
        weights = (1.0 / (self.T * p[t])).float()  # importance weight: E_p[w L] = E_uniform[L]
        return (t.to(device), weights.to(device)) if device is not None else (t, weights)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record the (unweighted) losses of timesteps t, the oldest of a full history dropped first."""
        for ti, li in zip(t.detach().cpu().tolist(), losses.detach().double().cpu().tolist()):
            if self.counts[ti] == self.history:  # official: shift out the oldest loss term
                self.losses[ti, :-1] = self.losses[ti, 1:].clone()
                self.losses[ti, -1] = li
            else:
                self.losses[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        losses, counts = torch.as_tensor(state["losses"]), torch.as_tensor(state["counts"])
        if tuple(losses.shape) != (self.T, self.history) or tuple(counts.shape) != (self.T,):
            raise ValueError(f"the timestep sampler's history has shape {tuple(losses.shape)}, expected "
                             f"{(self.T, self.history)}")
        self.losses = losses.to(torch.float64).clone()
        self.counts = counts.to(torch.int64).clone()
