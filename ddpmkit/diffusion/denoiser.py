"""The Denoiser: the one place that reads a network's output.

Every consumer of a trained network (each sampler, the variational bound, editing) asks the same question: at
(x_t, t) and an optional condition, what are the clean image x0_hat, the noise eps_hat, and the variance of the
reverse step p(x_{t-1} | x_t)? :class:`Denoiser` answers it once:

- the objective (``eps``, ``x0`` or ``v``) says how the output becomes x0_hat and eps_hat;
- ``clip_x0`` clips x0_hat to [-1, 1], and eps_hat is then the noise consistent with x_t and the clipped x0_hat;
- ``variance`` gives log sigma_t^2: ``small`` (beta_tilde_t) or ``large`` (beta_t), DDPM section 3.2; ``learned``
  (a network with 2C output channels, whose second half interpolates between the two, Improved DDPM eq. 15) or
  ``analytic`` (the optimal variance of Analytic-DPM from ``gamma``, Gamma_t per network timestep); see
  :mod:`.variance`. A 2C-channel network's second half is ignored under any other variance;
- ``cond`` is passed to the network as a third argument when it is not None;
- ``guidance`` w (with ``null_cond``, the condition that means "none") is classifier-free guidance, Ho & Salimans
  2022 eq. 6: eps = (1 + w) eps(x, c) - w eps(x, null), both evaluated in one doubled batch (see ``guided``);
- ``consistency`` (sigma_data) reads a consistency-distilled network: x0_hat is the consistency function
  c_skip x + (1 - c_skip) x0_net, which is x_t itself at t = 0 (:func:`.distill.consistency_x0`);
- ``precond`` (sigma_data) reads a network trained with EDM's preconditioning (Karras et al. 2022, table 1): every
  call of the network is ``net(c_in x, c_noise[, cond])`` at EDM's x = x_t / sqrt(alpha_bar_t) and noise level
  sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t), and its raw output is D = c_skip x + c_out F, the clean image
  (objective x0; :mod:`.precond`).

A Denoiser can be respaced onto a sub-sequence of timesteps (:meth:`Denoiser.respaced`): its schedule is then the
shorter process of Improved DDPM section 4, and its index i calls the network at the original timestep tau_i.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from ..errors import SettingError
from .precond import preconditioned
from .process import (VARIANCES, check_objective, eps_from_x0, model_variance, output_from, predict_eps,
                      predict_x0, q_posterior, split_output, x0_from_output)
from .schedule import NoiseSchedule, extract
from .variance import analytic_log_var, learned_log_var, optimal_reverse_variance, sampling_sigma2_max

__all__ = ["Prediction", "Denoiser", "GUIDANCE_SPACES", "DEFAULT_GUIDANCE"]

GUIDANCE_SPACES = ("eps", "x0")  # where classifier-free guidance combines the two predictions (see _guided_output)

# The classifier-free guidance weight w used when none is given (Ho & Salimans 2022 eq. 6), picked from
# bench/bench_guidance.py on the demo's model (1,000 samples per weight of {0, 0.1, 0.2, 0.3, 0.5, 1, 2}): the weight
# with the lowest Frechet distance, over all samples and per class, among those at which the classifier agrees with
# the class asked for on >= 97% of samples (99.1% at 0.2; docs/guidance.md). It was 0.5 when measured on the first,
# weaker 16x16 model.
DEFAULT_GUIDANCE = 0.2


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
                 clip_x0: bool = True, *, cond=None, timestep_map: torch.Tensor | None = None,
                 guidance: float | None = None, null_cond=None, guidance_space: str = "eps",
                 gamma: torch.Tensor | None = None, clip_sigma: bool = True, decoder: Callable | None = None,
                 consistency: float | None = None, precond: float | None = None):
        check_objective(objective)
        if precond is not None and not (math.isfinite(float(precond)) and float(precond) > 0):
            raise ValueError(f"precond is EDM's sigma_data, a positive number, got {precond!r}")
        if precond is not None and objective != "x0":
            raise ValueError(f"a preconditioned network's output D is the clean image: its objective is x0, not "
                             f"{objective!r}")
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}: choose one of {', '.join(VARIANCES)}")
        self.net = net
        self.schedule = schedule
        self.objective = objective
        self.variance = variance
        self.clip_x0 = bool(clip_x0)
        self.cond = cond  # the condition used when a call passes none (see with_cond)
        self.timestep_map = timestep_map  # index i of this schedule -> the network's timestep; None: identity
        if guidance is not None and not math.isfinite(float(guidance)):
            raise ValueError(f"the guidance weight must be a finite number, got {guidance!r}")
        if guidance and null_cond is None:
            raise ValueError("classifier-free guidance needs null_cond, the condition that means no class")
        if guidance_space not in GUIDANCE_SPACES:
            raise ValueError(f"unknown guidance_space {guidance_space!r}: choose {' or '.join(GUIDANCE_SPACES)}")
        self.guidance = None if guidance is None else float(guidance)
        self.null_cond = null_cond
        self.guidance_space = guidance_space
        # gamma: Gamma_t per network timestep (the analytic variance); clip_sigma: the analytic variance's clipping of
        # the last noisy step for sampling (off for the bound, see ddpmkit.metrics.nll)
        self.gamma = None if gamma is None else torch.as_tensor(gamma, dtype=torch.float64).cpu()
        self.clip_sigma = bool(clip_sigma)
        # what turns a finished sample into an image: a latent run's decoder (ddpmkit.latent); None: the identity
        self.decoder = decoder
        # a consistency model's sigma_data: x0_hat is then the consistency function f = c_skip x + (1 - c_skip) x0_net
        # (ddpmkit.diffusion.distill.consistency_x0), exactly x_t itself at t = 0; None: the network's x0_hat
        self.consistency = None if consistency is None else float(consistency)
        # EDM's sigma_data of a preconditioned network (see _call); None: the network's output is read as it is
        self.precond = None if precond is None else float(precond)
        self._gamma_steps = None  # analytic: Gamma at each step of this schedule (float64, CPU); see _fixed_log_var
        self._log_var = self._fixed_log_var()

    def _fixed_log_var(self) -> torch.Tensor | None:
        """log sigma^2 over this schedule's steps for the variances that do not depend on the output."""
        if self.variance in ("small", "large"):
            return model_variance(self.schedule, self.variance)[1]
        if self.variance != "analytic":
            return None  # learned: from the network's output
        if self.gamma is None:
            raise ValueError("the analytic variance needs gamma (Gamma_t per timestep): `ddpmkit eval variance RUN`")
        gamma = self.gamma if self.timestep_map is None else self.gamma[self.timestep_map.cpu()]
        if gamma.ndim != 1 or gamma.shape[0] != self.schedule.T:
            raise ValueError(f"gamma must hold one value per network timestep, got shape {tuple(self.gamma.shape)}")
        self._gamma_steps = gamma
        self._alpha_bar_cpu = self.schedule.alpha_bar.double().cpu()  # for step_variance, read once per sampler step
        log_var = analytic_log_var(self.schedule.to("cpu"), gamma)  # Analytic-DPM Theorem 1 (and its sec. 4)
        if self.clip_sigma and self.schedule.T > 1:  # official sampler: clip_sigma_idx = 1, clip_pixel = 2
            log_var[1] = min(float(log_var[1]), math.log(sampling_sigma2_max()))
        return log_var.float().to(self.schedule.device)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Finished samples (or x0 predictions) as images: decoded by a latent run's decoder, else as they are."""
        return x if self.decoder is None else self.decoder(x)

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
        """The network's raw output at (x_t, t), as float32 (float64 kept, for exact-arithmetic tests); with
        ``precond``, EDM's D (see :meth:`_call`)."""
        t_net = t if self.timestep_map is None else self.timestep_map.to(t.device)[t]
        cond = self.cond if cond is None else cond
        if cond is None and getattr(self.net, "needs_cond", False):
            raise ValueError(
                "this Denoiser's network is class-conditional, and no label was given: use den.with_cond(labels) "
                "(a tensor [B] of class labels, or one int for all), den.guided(w) for classifier-free guidance, or "
                "den.with_cond(run.null_class) for the unconditional model")
        if isinstance(cond, int) or (torch.is_tensor(cond) and cond.ndim == 0 and not cond.is_floating_point()):
            cond = torch.full((x_t.shape[0],), int(cond), dtype=torch.int64, device=x_t.device)  # one label for all
        if self.guidance and cond is not None:  # w = 0 (or None) is the conditional model alone: one evaluation
            out = self._guided_output(x_t, t, t_net, cond)
        else:
            out = self._call(x_t, t, t_net, cond)
        split_output(out, x_t)  # C channels, or 2C with a learned variance
        return out if out.dtype == torch.float64 else out.float()

    # ------------------------------------------------------------------ reading it
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> Prediction:
        """x0_hat, eps_hat and log sigma_t^2 at (x_t, t). ``t`` may be real-valued (a float tensor) between the
        schedule's steps: alpha_bar is then interpolated (``NoiseSchedule.alpha_bar_at``) and ``log_var`` is NaN,
        since the discrete reverse variance is defined only on the grid."""
        if t.is_floating_point():
            return self._at_real_t(x_t, t, cond)
        out, v = split_output(self.net_output(x_t, t, cond), x_t)
        x0 = self._consistent(predict_x0(self.schedule, x_t, t, out, self.objective), x_t, t)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        # the noise consistent with x_t and the (clipped) x0_hat; the output itself for eps, unclipped
        # DDPM eq. 4 solved for eps (predict_eps)
        as_is = self.objective == "eps" and not self.clip_x0 and self.consistency is None
        eps = out if as_is else predict_eps(self.schedule, x_t, t, x0)
        if self.variance == "learned":
            if v is None:
                raise ValueError("the learned variance needs a network with twice the image channels (--learn-sigma)")
            log_var = learned_log_var(self.schedule, t, v)  # Improved DDPM eq. 15, per pixel
        else:
            log_var = extract(self._log_var.to(x_t.device), t, x_t.ndim)
        return Prediction(x0, eps, log_var)

    def _at_real_t(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> Prediction:
        if self.timestep_map is not None:
            raise ValueError("a respaced Denoiser takes integer timesteps only")
        out = split_output(self.net_output(x_t, t, cond), x_t)[0]  # no variance between grid points: see __call__
        ab = self.schedule.alpha_bar_at(t).view(-1, *([1] * (x_t.ndim - 1)))
        x0 = self._consistent(x0_from_output(x_t, out, ab, self.objective), x_t, t)
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        as_is = self.objective == "eps" and not self.clip_x0 and self.consistency is None
        eps = out.double() if as_is else eps_from_x0(x_t, x0, ab)
        log_var = torch.full_like(ab, float("nan"))
        return Prediction(x0.to(x_t.dtype), eps.to(x_t.dtype), log_var.to(x_t.dtype))

    def _call(self, x_t: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor, cond) -> torch.Tensor:
        """One call of the network at (x_t, index t of this schedule, the network's timestep t_net): its output, or
        with ``precond`` EDM's D = c_skip x + c_out net(c_in x, c_noise) at the noise level of alpha_bar at t
        (EDM eq. 7 and table 1). A respaced schedule's alpha_bar at index i is the original one's at tau_i, so D
        needs no timestep_map."""
        if self.precond is None:
            return self.net(x_t, t_net) if cond is None else self.net(x_t, t_net, cond)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        return preconditioned(self.net, x_t, self.schedule.alpha_bar_at(t), self.precond, cond)

    def _consistent(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A consistency model's f from the network's x0_hat (Song et al. 2023, eq. 3); x0_hat itself otherwise."""
        if self.consistency is None:
            return x0
        from .distill import consistency_x0

        if self.timestep_map is not None:  # its boundary is the full schedule's t = 0, which a respacing may skip
            # a user's choice (`sample --sampler ddpm --steps S`, `inpaint`): one line at the command, not a traceback
            raise SettingError("sampler", "a consistency-distilled run is read on its whole schedule, not a respaced "
                                          "one (the ddpm sampler below T steps and inpaint's RePaint respace it): "
                                          "draw it with the consistency or ddim sampler, or edit it with `ddpmkit "
                                          "edit`", lead=False)
        return consistency_x0(x0, x_t, t, self.schedule, self.consistency)

    def _guided_output(self, x_t: torch.Tensor, t: torch.Tensor, t_net: torch.Tensor, cond) -> torch.Tensor:
        """The network's output under classifier-free guidance: the conditional and the null evaluation in one
        doubled batch, combined (Ho & Salimans 2022 eq. 6).

        ``guidance_space="eps"`` combines the raw outputs. For every objective the output is affine in eps with
        the same coefficients for both halves at a given (x_t, t), so this is eq. 6 itself, and x0_hat is clipped
        once, after guiding. ``"x0"`` clips each half's x0_hat first, combines the clipped ones with the same
        weights, and returns the output of that x0_hat; without clipping the two are identical.
        """
        B = x_t.shape[0]
        c = torch.as_tensor(cond, device=x_t.device)
        c = c.expand(B) if c.ndim == 0 else c
        null = torch.full_like(c, self.null_cond) if not torch.is_tensor(self.null_cond) else self.null_cond.to(c)
        tt = t_net.expand(B) if t_net.ndim == 0 else t_net
        ti = t.expand(B) if t.ndim == 0 else t
        out = self._call(torch.cat([x_t, x_t]), torch.cat([ti, ti]), torch.cat([tt, tt]),
                         torch.cat([c, null.expand_as(c)]))
        if out.shape[0] != 2 * B:
            raise ValueError(f"the network returned shape {tuple(out.shape)} for a doubled batch of {2 * B}")
        (out_c, v_c), out_u = split_output(out[:B], x_t), split_output(out[B:], x_t)[0]
        if v_c is not None:  # a learned variance: the first half is guided, the conditional variance kept (as GLIDE)
            return torch.cat([self._guide(x_t, t, out_c, out_u), v_c], dim=1)
        return self._guide(x_t, t, out_c, out_u)

    def _guide(self, x_t, t, out_c, out_u):
        w = self.guidance
        if self.guidance_space == "eps" or not self.clip_x0:
            return (1.0 + w) * out_c - w * out_u  # Ho & Salimans 2022 eq. 6
        # x0-space: alpha_bar at t (interpolated at a real-valued t), then DDPM eq. 4 both ways
        ab = (self.schedule.alpha_bar_at(t) if t.is_floating_point() else self.schedule.alpha_bar.to(t.device)[t])
        ab = ab.to(torch.float64).view(-1, *([1] * (x_t.ndim - 1)))
        x0_c = x0_from_output(x_t, out_c, ab, self.objective).clamp(-1.0, 1.0)
        x0_u = x0_from_output(x_t, out_u, ab, self.objective).clamp(-1.0, 1.0)
        x0 = ((1.0 + w) * x0_c - w * x0_u).clamp(-1.0, 1.0)  # eq. 6's weights, on the clipped x0_hat
        return output_from(x0, eps_from_x0(x_t, x0, ab), ab, self.objective).to(out_c.dtype)

    def p_mean_variance(self, x_t: torch.Tensor, t: torch.Tensor, cond=None):
        """``(mean, log_var, prediction)`` of p(x_{t-1} | x_t): the posterior mean of q(x_{t-1} | x_t, x0_hat).

        Without clipping and with the eps objective the mean equals DDPM eq. 11.
        """
        pred = self(x_t, t, cond)
        mean, _, _ = q_posterior(self.schedule, pred.x0, x_t, t)  # DDPM eq. 7 with x0_hat for x_0
        return mean, pred.log_var, pred

    def step_variance(self, t: int, t_prev: int, lambda2: float, *, last_noisy: bool = False) -> float:
        """sigma^2 of a reverse step from timestep ``t`` to ``t_prev`` < t of this schedule, for a sampler whose
        forward process q(x_prev | x_t, x_0) has variance ``lambda2`` (DDIM's family: eta^2 times eq. 16's).

        Under the analytic variance it is the optimal one, Analytic-DPM Theorem 1 with lambda_n^2 = ``lambda2``
        and Gamma at t, clipped like DDPM's when ``last_noisy`` (the step to the last visited timestep). Every
        other variance leaves the sampler its own: ``lambda2``.
        """
        if self.variance != "analytic":
            return float(lambda2)
        ab = self._alpha_bar_cpu
        var = float(optimal_reverse_variance(ab[int(t)], ab[int(t_prev)], self._gamma_steps[int(t)],
                                             torch.tensor(float(lambda2), dtype=torch.float64)))
        if last_noisy and self.clip_sigma:  # as _fixed_log_var: the official sampler's clip of the last noisy step
            var = min(var, sampling_sigma2_max())
        return var

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
        """This Denoiser with ``cond`` passed to every call that gives none: class labels [B], or one int label for
        every sample (the null class draws from the unconditional model)."""
        return self._replace(cond=cond)

    def guided(self, guidance: float | None, null_cond=None, guidance_space: str | None = None) -> "Denoiser":
        """This Denoiser with classifier-free guidance of weight ``guidance`` (Ho & Salimans 2022 eq. 6).

        ``null_cond`` is the condition the network was trained to read as "no condition" (the null class label of
        a class-conditional ddpmkit U-Net); w = 0 or None is the conditional model alone.
        """
        return self._replace(guidance=guidance, null_cond=self.null_cond if null_cond is None else null_cond,
                             guidance_space=guidance_space or self.guidance_space)

    def to(self, device) -> "Denoiser":
        """This Denoiser with its schedule on ``device`` (the network is moved by its owner)."""
        return self._replace(schedule=self.schedule.to(device))

    def _replace(self, **changes) -> "Denoiser":
        kw = dict(net=self.net, schedule=self.schedule, objective=self.objective, variance=self.variance,
                  clip_x0=self.clip_x0, cond=self.cond, timestep_map=self.timestep_map, guidance=self.guidance,
                  null_cond=self.null_cond, guidance_space=self.guidance_space, gamma=self.gamma,
                  clip_sigma=self.clip_sigma, decoder=self.decoder, consistency=self.consistency,
                  precond=self.precond)
        kw.update(changes)
        return Denoiser(**kw)

    def __repr__(self) -> str:
        g = f", guidance={self.guidance:g}" if self.guidance else ""
        g += f", precond={self.precond:g}" if self.precond is not None else ""
        return (f"Denoiser(objective={self.objective!r}, variance={self.variance!r}, clip_x0={self.clip_x0}, "
                f"T={self.T}{g})")
