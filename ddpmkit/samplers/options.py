"""How to draw samples from a run: the sampler and its settings, checked against the run's T in one place."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError

__all__ = ["SampleOptions", "SamplingPlan"]


@dataclass
class SampleOptions:
    """How to sample a run. ``steps`` and ``spacing`` default to the sampler's own (50 uniform steps for ddim,
    all T for ddpm); ``options`` holds the sampler's own settings (``{"eta": 0.5}`` for ddim); ``variance``
    defaults to the run's (``small`` unless its config says otherwise)."""

    sampler: str = "ddim"
    steps: int | None = None
    spacing: str | None = None
    options: dict = field(default_factory=dict)
    variance: str | None = None
    clip_x0: bool = True
    n: int = 64
    batch_size: int = 64
    seed: int = 0
    ema: bool = True
    gif_samples: int = 8
    gif_frames: int = 40

    def plan(self, T: int) -> "SamplingPlan":
        """The sampler, its timesteps and options for a T-step run, every setting checked (ConfigError, one line)."""
        from ..diffusion import VARIANCES
        from . import plan

        for name in ("n", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.variance is not None and self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}: choose {' or '.join(VARIANCES)}")
        try:
            info, tau, options = plan(self.sampler, T, self.steps, self.spacing, **self.options)
        except ValueError as e:
            msg = str(e)
            flag = next((f"--{name.replace('_', '-')}" for name in self.options if msg.startswith(name)), None)
            flag = flag or ("--steps" if "steps" in msg else "--spacing" if "spacing" in msg else "--sampler")
            raise ConfigError(f"{flag}: {msg}") from None
        return SamplingPlan(info.name, len(tau), self.spacing or info.default_spacing, options,
                            info.model_calls(len(tau)))


@dataclass(frozen=True)
class SamplingPlan:
    """The resolved settings of a sampling run: what ``SampleOptions.plan`` checked and filled in."""

    sampler: str
    steps: int
    spacing: str
    options: dict
    model_calls: int

    def tag(self) -> str:
        """A folder name for these settings: ``ddim-50-uniform-eta0``."""
        opts = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in sorted(self.options.items()))
        return f"{self.sampler}-{self.steps}-{self.spacing}{opts}"
