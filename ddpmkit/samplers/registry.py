"""The table of samplers by name. Each sampler is one module of this package that registers itself here."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["Option", "SamplerInfo", "SAMPLERS", "register", "get_sampler", "sampler_names"]


@dataclass(frozen=True)
class Option:
    """A sampler's own setting: its name (also the CLI flag), type, default and help."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None  # a number below this (or a non-finite one) is refused
    maximum: float | None = None  # a number above this is refused
    why: str = ""  # the reason for the range, appended to the refusal

    def check(self, value) -> Any:
        """The value converted to the option's type; ValueError with one line otherwise."""
        try:
            v = self.type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a {self.type.__name__}, got {value!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{self.name} must be a finite number, got {value!r}")
        if self.minimum is not None and v < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum:g}, got {value!r}{self.why}")
        if self.maximum is not None and v > self.maximum:
            raise ValueError(f"{self.name} must be <= {self.maximum:g}, got {value!r}{self.why}")
        return v


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler: ``fn(denoiser, x_T, timesteps, *, noise, callback, **options) -> x_0``."""

    name: str
    fn: Callable
    summary: str
    default_steps: int | None  # None: all T steps
    default_spacing: str
    options: tuple[Option, ...] = field(default=())
    calls: Callable[[int], int] | None = None  # network evaluations for S timesteps (None: S)
    continuous: bool = False  # takes real-valued timesteps (the logsnr and karras spacings are then exact)
    variance: Callable[[dict, str], bool] | bool = False  # whether it reads the Denoiser's reverse variance

    def reads_variance(self, options: dict, variance: str) -> bool:
        """Whether a run with these (resolved) options reads the Denoiser's reverse ``variance``: a different
        variance then gives other samples."""
        return bool(self.variance(options, variance) if callable(self.variance) else self.variance)

    def steps_for(self, T: int, steps: int | None) -> int:
        """The number of timesteps to visit: ``steps``, else the sampler's default (at most T)."""
        if steps is not None:
            return steps
        return T if self.default_steps is None else min(self.default_steps, T)

    def resolve_options(self, given: dict) -> dict:
        """Every option of this sampler, from ``given`` or its default, checked; unknown names refused."""
        known = {o.name: o for o in self.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            takes = ", ".join(known) or "no options"
            raise ValueError(f"the {self.name} sampler has no option {', '.join(unknown)} (it takes {takes})")
        return {name: o.check(given.get(name, o.default)) for name, o in known.items()}

    def model_calls(self, steps: int) -> int:
        """How many network evaluations a run over ``steps`` timesteps makes."""
        return steps if self.calls is None else self.calls(steps)


SAMPLERS: dict[str, SamplerInfo] = {}


def register(name: str, *, summary: str, default_steps: int | None = 50, default_spacing: str = "uniform",
             options: tuple[Option, ...] = (), calls: Callable[[int], int] | None = None, continuous: bool = False,
             variance: Callable[[dict, str], bool] | bool = False):
    """Decorator that enters a sampler function in :data:`SAMPLERS` under ``name``. ``variance``: whether it
    reads the Denoiser's reverse variance (a bool, or a function of its options and the variance)."""

    def deco(fn: Callable) -> Callable:
        if name in SAMPLERS and SAMPLERS[name].fn is not fn:
            raise ValueError(f"a sampler named {name!r} is already registered")
        SAMPLERS[name] = SamplerInfo(name, fn, summary, default_steps, default_spacing, tuple(options), calls,
                                     continuous, variance)
        return fn

    return deco


def sampler_names() -> list[str]:
    return sorted(SAMPLERS)


def get_sampler(name: str) -> SamplerInfo:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(sampler_names())}") from None
