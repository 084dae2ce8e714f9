"""Noise schedules: betas and every array derived from them.

Timesteps are 0-indexed, t in {0, ..., T-1}. Index t of every array refers to the step that produces
x_{t+1} from x_t in the 1-indexed notation of the DDPM paper (so ``alpha_bar[0] = 1 - beta_1``).
Everything is computed in float64 and stored as float32 tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

__all__ = ["NoiseSchedule"]

_ARRAYS = (
    "betas",
    "alphas",
    "alpha_bar",
    "alpha_bar_prev",
    "sqrt_alpha_bar",
    "sqrt_one_minus_alpha_bar",
    "sqrt_recip_alpha_bar",
    "sqrt_recipm1_alpha_bar",
    "log_one_minus_alpha_bar",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "log_betas",
)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete noise schedule beta_1..beta_T and its derived arrays, as float32 tensors of length T.

    Attributes (all of shape [T]):
        betas: beta_t.
        alphas: 1 - beta_t.
        alpha_bar: prod_{s<=t} alpha_s (DDPM eq. 4).
        alpha_bar_prev: alpha_bar at t-1, with 1 at t=0.
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar: the coefficients of q(x_t | x_0).
        sqrt_recip_alpha_bar, sqrt_recipm1_alpha_bar: the coefficients that turn eps into x0.
        log_one_minus_alpha_bar: log(1 - alpha_bar).
        posterior_variance: beta_tilde_t (DDPM eq. 7); zero at t=0.
        posterior_log_variance_clipped: log beta_tilde, with the t=0 value replaced by that of t=1.
        posterior_mean_coef1, posterior_mean_coef2: the coefficients of x_0 and x_t in mu_tilde (DDPM eq. 7).
        log_betas: log beta_t.
    """

    betas: torch.Tensor
    alphas: torch.Tensor
    alpha_bar: torch.Tensor
    alpha_bar_prev: torch.Tensor
    sqrt_alpha_bar: torch.Tensor
    sqrt_one_minus_alpha_bar: torch.Tensor
    sqrt_recip_alpha_bar: torch.Tensor
    sqrt_recipm1_alpha_bar: torch.Tensor
    log_one_minus_alpha_bar: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor
    kind: str = "custom"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_betas(cls, betas, kind: str = "custom") -> "NoiseSchedule":
        """Build a schedule from explicit betas (any sequence of floats in (0, 1])."""
        b = np.asarray(betas.detach().cpu().numpy() if isinstance(betas, torch.Tensor) else betas,
                       dtype=np.float64)
        if b.ndim != 1 or b.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {b.shape}")
        if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b > 1):
            raise ValueError("betas must be finite and lie in (0, 1]")
        alphas = 1.0 - b
        alpha_bar = np.cumprod(alphas)  # DDPM eq. 4: alpha_bar_t = prod_s alpha_s
        alpha_bar_prev = np.append(1.0, alpha_bar[:-1])
        # DDPM eq. 7: beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        post_var = b * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        # beta_tilde is 0 at t=0; the official code clips its log by using the t=1 value there.
        post_log_var = np.log(np.append(post_var[1], post_var[1:])) if b.size > 1 else np.log(b)
        # DDPM eq. 7: mu_tilde = coef1 * x0 + coef2 * x_t
        coef1 = b * np.sqrt(alpha_bar_prev) / (1.0 - alpha_bar)
        coef2 = (1.0 - alpha_bar_prev) * np.sqrt(alphas) / (1.0 - alpha_bar)
        arrays = {
            "betas": b,
            "alphas": alphas,
            "alpha_bar": alpha_bar,
            "alpha_bar_prev": alpha_bar_prev,
            "sqrt_alpha_bar": np.sqrt(alpha_bar),
            "sqrt_one_minus_alpha_bar": np.sqrt(1.0 - alpha_bar),
            "sqrt_recip_alpha_bar": np.sqrt(1.0 / alpha_bar),
            "sqrt_recipm1_alpha_bar": np.sqrt(1.0 / alpha_bar - 1.0),
            "log_one_minus_alpha_bar": np.log(1.0 - alpha_bar),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_log_var,
            "posterior_mean_coef1": coef1,
            "posterior_mean_coef2": coef2,
            "log_betas": np.log(b),
        }
        tensors = {k: torch.from_numpy(v).to(torch.float32) for k, v in arrays.items()}
        return cls(**tensors, kind=kind)

    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """The linear schedule of DDPM, 1e-4 to 0.02 at T=1000, scaled by 1000/T for other T (Improved DDPM)."""
        T = _check_T(T)
        scale = 1000.0 / T
        betas = np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)
        if betas[-1] >= 1:
            raise ValueError(f"T={T} is too small for the linear schedule: beta_T = {betas[-1]:.3g} >= 1 "
                             f"(T must be at least 21)")
        return cls.from_betas(betas, kind="linear")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """The cosine schedule of Improved DDPM (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta."""
        T = _check_T(T)
        if not 0 < max_beta <= 1:
            raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")

        def f(t):  # Improved DDPM eq. 17 (before normalisation by f(0), which cancels in the ratio)
            return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

        betas = np.array([min(1.0 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)
        return cls.from_betas(betas, kind="cosine")

    @classmethod
    def from_name(cls, name: str, T: int) -> "NoiseSchedule":
        """``linear`` or ``cosine``, by name."""
        if name == "linear":
            return cls.linear(T)
        if name == "cosine":
            return cls.cosine(T)
        raise ValueError(f"unknown schedule {name!r}: choose 'linear' or 'cosine'")

    def alpha_bar_at(self, t) -> torch.Tensor:
        """alpha_bar at timesteps ``t`` (a tensor, integer or real-valued, in [0, T-1]), as float64.

        Between grid points log alpha_bar is interpolated linearly, so that real-valued timesteps (the network
        evaluated between the schedule's steps) see a smooth schedule; at integer t this is alpha_bar[t].
        """
        t = torch.as_tensor(t)
        log_ab = torch.log(self.alpha_bar.double().to(t.device))
        if not t.is_floating_point():
            return log_ab[t].exp()
        t = t.double()
        if bool(((t < 0) | (t > self.T - 1)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.T - 1}], got {t.min().item()}..{t.max().item()}")
        lo = t.floor().long().clamp(max=self.T - 1)
        hi = (lo + 1).clamp(max=self.T - 1)
        w = t - lo.double()
        ab = self.alpha_bar.double().to(t.device)
        # at an integer-valued t the grid value itself, not exp(log()) of it
        return torch.where(w == 0, ab[lo], torch.exp((1 - w) * log_ab[lo] + w * log_ab[hi]))

    def timestep_of_log_alpha_bar(self, log_ab) -> np.ndarray:
        """The real-valued timesteps whose interpolated log alpha_bar (see :meth:`alpha_bar_at`) is ``log_ab``."""
        grid = np.log(self.alpha_bar.double().cpu().numpy())
        # log alpha_bar decreases with t: interpolate t over the increasing sequence -log alpha_bar
        return np.interp(-np.asarray(log_ab, dtype=np.float64), -grid, np.arange(self.T, dtype=np.float64))

    def respaced(self, timesteps) -> "NoiseSchedule":
        """The schedule of the sub-process that visits only ``timesteps`` (increasing, from {0, ..., T-1}).

        Its alpha_bar at index i is alpha_bar[timesteps[i]], and its betas follow from the ratios:
        beta'_i = 1 - alpha_bar[tau_i] / alpha_bar[tau_{i-1}], with alpha_bar[tau_{-1}] = 1 (Improved DDPM,
        section 4, as in its respace.py). Respacing at every timestep returns this schedule itself.
        """
        tau = np.asarray(timesteps, dtype=np.int64)
        if tau.ndim != 1 or tau.size < 1 or np.any(np.diff(tau) <= 0) or tau[0] < 0 or tau[-1] >= self.T:
            raise ValueError(f"timesteps must be increasing values in [0, {self.T - 1}], got {tau.tolist()}")
        if tau.size == self.T:
            return self
        ab = self.alpha_bar.detach().cpu().double().numpy()[tau]
        # Improved DDPM section 4: beta_i = 1 - alpha_bar_{tau_i} / alpha_bar_{tau_{i-1}}
        betas = 1.0 - ab / np.append(1.0, ab[:-1])
        return NoiseSchedule.from_betas(betas, kind=f"{self.kind}-respaced")

    # ------------------------------------------------------------------ helpers
    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    @property
    def num_timesteps(self) -> int:
        return self.T

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device) -> "NoiseSchedule":
        """The same schedule with every array on ``device`` (float32 kept)."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in _ARRAYS:
            kw[k] = kw[k].to(device)
        return NoiseSchedule(**kw)

    def log_snr(self) -> torch.Tensor:
        """log(alpha_bar / (1 - alpha_bar)) for every t."""
        return torch.log(self.alpha_bar) - self.log_one_minus_alpha_bar

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, T={self.T}, device={self.device})"


def _check_T(T) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    return int(T)


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather ``a[t]`` for a batch of timesteps and shape it [B, 1, ..., 1] to broadcast over ``ndim`` dims."""
    out = a.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))
