"""The Denoiser: the one place that reads a network's output.

Every consumer of a trained network (each sampler, the variational bound, editing) asks the same question: at
(x_t, t) and an optional condition, what are the clean image x0_hat, the noise eps_hat, and the variance of the
reverse step p(x_{t-1} | x_t)? :class:`Denoiser` answers it once:

- the objective (``eps``, ``x0`` or ``v``) says how the output becomes x0_hat and eps_hat;
- ``clip_x0`` clips x0_hat to [-1, 1], and eps_hat is then the noise consistent with x_t and the clipped x0_hat;
- ``variance`` gives log sigma_t^2: ``small`` (beta_tilde_t) or ``large`` (beta_t), DDPM section 3.2;
- ``cond`` is passed to the network as a third argument when it is not None.

A Denoiser can be respaced onto a sub-sequence of timesteps (:meth:`Denoiser.respaced`): its schedule is then the
shorter process of Improved DDPM section 4, and its index i calls the network at the original timestep tau_i.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from .process import VARIANCES, check_objective, model_variance, predict_eps, predict_x0, q_posterior
from .schedule import NoiseSchedule, extract

__all__ = ["Prediction", "Denoiser"]


class Prediction(NamedTuple):
    """What a Denoiser says about x_t: x0_hat, eps_hat, and log sigma_t^2 of p(x_{t-1} | x_t).

    ``x0`` and ``eps`` are float32 [B, C, H, W]; ``log_var`` broadcasts against them ([B, 1, 1, 1] for a fixed
    variance).
    """

    x0: torch.Tensor
    eps: torch.Tensor
    log_var: torch.Tensor


class Denoiser:
    """``Denoiser(net, schedule, objective, variance, clip_x0)(x_t, t, cond=None) -> Prediction``.

    ``net(x_t, t)`` (or ``net(x_t, t, cond)``) is any callable returning a tensor shaped like x_t; ``t`` is a long
    tensor [B] of 0-indexed timesteps of ``schedule``.
    """

    def __init__(self, net: Callable, schedule: NoiseSchedule, objective: str = "eps", variance: str = "small",
                 clip_x0: bool = True, *, cond=None, timestep_map: torch.Tensor | None = None):
        check_objective(objective)
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}: choose 'small' (beta_tilde) or 'large' (beta)")
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.variance = variance
        self.clip_x0 = bool(clip_x0)
        self.cond = cond  # the condition used when a call passes none (see with_cond)
        self.timestep_map = timestep_map  # index i of this schedule -> the network's timestep; None: identity
        self._log_var = model_variance(schedule, variance)[1]

    # ------------------------------------------------------------------ the network
    @property
    def T(self) -> int:
        return self.schedule.T

    @property
    def device(self) -> torch.device:
        """The device of the network's parameters (the CPU for a plain function)."""
        params = getattr(self.net, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return torch.device("cpu")

    def net_output(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The network's raw output at (x_t, t), as float32."""
        t_net = t if self.timestep_map is None else self.timestep_map.to(t.device)[t]
        cond = self.cond if cond is None else cond
        out = self.net(x_t, t_net) if cond is None else self.net(x_t, t_net, cond)
        if out.shape != x_t.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for inputs {tuple(x_t.shape)}")
        return out.float()

    # ------------------------------------------------------------------ reading it
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> Prediction:
        out = self.net_output(x_t, t, cond)
        x0 = predict_x0(self.schedule, x_t, t, out, self.objective)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        # the noise consistent with x_t and the (clipped) x0_hat; the output itself for eps, unclipped
        # DDPM eq. 4 solved for eps (predict_eps)
        eps = out if (self.objective == "eps" and not self.clip_x0) else predict_eps(self.schedule, x_t, t, x0)
        log_var = extract(self._log_var.to(x_t.device), t, x_t.ndim)
        return Prediction(x0, eps, log_var)

    def p_mean_variance(self, x_t: torch.Tensor, t: torch.Tensor, cond=None):
        """``(mean, log_var, prediction)`` of p(x_{t-1} | x_t): the posterior mean of q(x_{t-1} | x_t, x0_hat).

        Without clipping and with the eps objective the mean equals DDPM eq. 11.
        """
        pred = self(x_t, t, cond)
        mean, _, _ = q_posterior(self.schedule, pred.x0, x_t, t)  # DDPM eq. 7 with x0_hat for x_0
        return mean, pred.log_var, pred

    # ------------------------------------------------------------------ variants
    def respaced(self, timesteps) -> "Denoiser":
        """The same network over the sub-process that visits only ``timesteps`` (increasing; Improved DDPM section 4).

        Index i of the new schedule is the original timestep ``timesteps[i]``; respacing at every timestep returns
        this Denoiser itself.
        """
        tau = np.asarray(timesteps, dtype=np.int64)
        schedule = self.schedule.respaced(tau)
        if schedule is self.schedule:
            return self
        base = self.timestep_map.cpu() if self.timestep_map is not None else None
        mapped = torch.from_numpy(tau) if base is None else base[torch.from_numpy(tau)]
        return self._replace(schedule=schedule.to(self.schedule.device), timestep_map=mapped)

    def with_cond(self, cond) -> "Denoiser":
        """This Denoiser with ``cond`` (for example class labels [B]) passed to every call that gives none."""
        return self._replace(cond=cond)

    def to(self, device) -> "Denoiser":
        """This Denoiser with its schedule on ``device`` (the network is moved by its owner)."""
        return self._replace(schedule=self.schedule.to(device))

    def _replace(self, **changes) -> "Denoiser":
        kw = dict(net=self.net, schedule=self.schedule, objective=self.objective, variance=self.variance,
                  clip_x0=self.clip_x0, cond=self.cond, timestep_map=self.timestep_map)
        kw.update(changes)
        return Denoiser(**kw)

    def __repr__(self) -> str:
        return (f"Denoiser(objective={self.objective!r}, variance={self.variance!r}, clip_x0={self.clip_x0}, "
                f"T={self.T})")
