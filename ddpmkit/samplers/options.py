"""A sampler's plan: its registry entry, its options and its timesteps, checked and computed once.

``resolve`` refuses a bad setting with a SettingError naming it (``sampler``, ``steps``, ``spacing`` or the
option); ``sample``, ``sample_batches`` and SDEdit take the plan and never compute the timesteps again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SettingError
from .registry import SamplerInfo, get_sampler
from .timesteps import NOISE_SPACINGS

__all__ = ["SamplingPlan", "resolve"]


@dataclass(frozen=True)
class SamplingPlan:
    """The resolved settings of a sampling run: the sampler, its timesteps (increasing), spacing and options."""

    info: SamplerInfo
    timesteps: np.ndarray
    spacing: str
    options: dict

    @property
    def sampler(self) -> str:
        return self.info.name

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def model_calls(self) -> int:
        """Network evaluations of one run of the plan."""
        return self.info.model_calls(self.steps)

    def reads_variance(self, variance: str) -> bool:
        """Whether this plan's sampler reads the reverse ``variance`` (DDPM always; DDIM the analytic one at
        eta > 0)."""
        return self.info.reads_variance(self.options, variance)

    def tag(self) -> str:
        """A folder name for these settings: ``ddim-50-uniform-eta0``."""
        opts = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in sorted(self.options.items()))
        return f"{self.sampler}-{self.steps}-{self.spacing}{opts}"


def _refuse(setting: str, e: Exception) -> SettingError:
    return SettingError(setting, f": {e}")


def resolve(sampler: str, schedule, steps: int | None = None, spacing: str | None = None, **options) -> SamplingPlan:
    """The plan of ``sampler`` over ``schedule`` (a NoiseSchedule, or its T where the spacing needs no more).

    A sampler that takes real-valued timesteps gets the ``logsnr`` and ``karras`` spacings exactly. SettingError
    (a ValueError) with one line on an unknown sampler, spacing or option, or a step count outside [1, T].
    """
    from . import timesteps  # the function, looked up at call time

    try:
        info = get_sampler(sampler)
        known = {o.name: o for o in info.options}
        info.resolve_options({k: v for k, v in options.items() if k not in known})  # refuses unknown names
    except ValueError as e:
        raise _refuse("sampler", e) from None
    resolved = {}
    for name, o in known.items():
        try:
            resolved[name] = o.check(options.get(name, o.default))
        except ValueError as e:
            raise _refuse(name, e) from None
    T = schedule if isinstance(schedule, int) else schedule.T
    spacing = spacing or info.default_spacing
    S = info.steps_for(T, steps)
    good_steps = not isinstance(S, bool) and isinstance(S, (int, np.integer)) and 1 <= S <= T
    try:
        tau = timesteps(schedule, S, spacing, integer=not (info.continuous and spacing in NOISE_SPACINGS))
    except ValueError as e:
        raise _refuse("spacing" if good_steps else "steps", e) from None
    return SamplingPlan(info, tau, spacing, resolved)
