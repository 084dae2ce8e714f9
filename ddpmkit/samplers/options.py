"""How to draw samples from a run: the sampler and its settings, checked against the run's T in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

__all__ = ["SampleOptions", "SamplingPlan", "DEFAULT_GUIDANCE", "parse_classes", "one_class_label",
           "Conditioning"]

# The classifier-free guidance weight w used when none is given (Ho & Salimans 2022 eq. 6), picked from
# bench/bench_guidance.py on the digits: the smallest of {0, 0.5, 1, 2, 4} at which the classifier agrees with the
# class asked for on >= 97% of samples (99.2%), and the one with the lowest per-class Frechet distance (README).
DEFAULT_GUIDANCE = 0.5


def parse_classes(spec, class_names) -> list[int] | None:
    """The labels a ``--class`` value asks for: ``7``, ``3,5,8``, ``all`` or class names (``cat,dog``), or a list
    of labels.

    None for no value (``spec`` None). ConfigError (one line) for a label or a name the run does not have, or for
    an unconditional run (``class_names`` None).
    """
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(int(c)) for c in spec)
    text = str(spec).strip()
    if class_names is None:
        raise ConfigError(f"--class {text}: this run is unconditional (trained without --class-cond), so it "
                          f"cannot draw a chosen class")
    names = list(class_names)
    if text == "all":
        return list(range(len(names)))
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in names:  # a class name first ("7" names label 7 for the digits anyway)
            out.append(names.index(part))
        elif part.lstrip("-").isdigit() and 0 <= int(part) < len(names):
            out.append(int(part))
        else:
            shown = ", ".join(names) if len(names) <= 12 else f"{names[0]} .. {names[-1]}"
            raise ConfigError(f"--class: no class {part!r} in this run; its classes are 0..{len(names) - 1} "
                              f"({shown}), or all")
    if not out:
        raise ConfigError("--class: name at least one class, or all")
    return out


def one_class_label(spec, class_names, null_class) -> int | None:
    """The one label a ``--class`` value gives every input image: None when ``spec`` is None, the null class for
    ``none``, else the label of one class (``parse_classes``). ConfigError (one line) for several classes, ``none``
    on a model without a null class, or any class for an unconditional run (``class_names`` None)."""
    if spec is None:
        return None
    text = str(spec).strip()
    if text == "none" and class_names is not None:
        if null_class is None:
            raise ConfigError("--class none: this model has no null class (it was not trained with label dropout), "
                              "so it has no unconditional model; give a class")
        return null_class
    labels = parse_classes(text, class_names)  # refuses an unconditional run or an unknown class
    if len(labels) != 1:
        raise ConfigError(f"--class {text}: give one class for all the images, or none")
    return labels[0]


@dataclass(frozen=True)
class Conditioning:
    """What a sampling run conditions on: one label per sample (None: unconditional), the classes asked for (None:
    every class in turn) and the guidance weight (None: unguided)."""

    labels: torch.Tensor | None
    classes: list | None
    guidance: float | None

    @staticmethod
    def of(opt: "SampleOptions", class_names, null_class, n: int, *, grouped: bool) -> "Conditioning":
        """The conditioning of ``n`` samples of a run with ``class_names`` (None: unconditional) and ``null_class``.

        With classes asked for (``opt.classes``), ``grouped`` gives each class ``n / len(classes)`` consecutive
        samples (``n`` must be a multiple), else the classes take turns; a class-conditional run asked for none
        draws every class in turn. The guidance weight is ``opt.guidance``, by default ``DEFAULT_GUIDANCE`` where
        the run has a null class; an unconditional run refuses a weight.
        """
        classes = parse_classes(opt.classes, class_names)
        if class_names is None:
            if opt.guidance is not None:
                raise ConfigError("--guidance: this run is unconditional (trained without --class-cond), so it "
                                  "has nothing to guide")
            return Conditioning(None, None, None)
        w = opt.guidance
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                              or w < 0):
            raise ConfigError(f"--guidance must be a number >= 0, got {w!r}")
        if w is None:
            w = DEFAULT_GUIDANCE if null_class is not None else 0.0
        elif w > 0 and null_class is None:
            raise ConfigError("--guidance: this model has no null class (it was not trained with label dropout), "
                              "so it cannot be guided; use --guidance 0")
        pool = classes if classes is not None else list(range(len(class_names)))
        if grouped and classes is not None:
            labels = torch.tensor(pool, dtype=torch.int64).repeat_interleave(n // len(pool))
        else:
            labels = torch.tensor(pool, dtype=torch.int64).repeat(-(-n // len(pool)))[:n]
        return Conditioning(labels, classes, float(w))


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
    classes: list | None = None  # labels to draw (see parse_classes); None: every class in turn, or unconditional
    guidance: float | None = None  # classifier-free guidance weight w; None: DEFAULT_GUIDANCE

    def plan(self, schedule) -> "SamplingPlan":
        """The sampler, its timesteps and options for a run over ``schedule`` (a NoiseSchedule, or its T where the
        spacing needs no more), every setting checked (ConfigError, one line)."""
        from ..diffusion import VARIANCES
        from . import plan

        for name in ("n", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.variance is not None and self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}: choose {' or '.join(VARIANCES)}")
        try:
            info, tau, options = plan(self.sampler, schedule, self.steps, self.spacing, **self.options)
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

    def reads_variance(self, variance: str) -> bool:
        """Whether this plan's sampler reads the reverse ``variance`` (DDPM always; DDIM the analytic one at
        eta > 0)."""
        from .registry import get_sampler

        return get_sampler(self.sampler).reads_variance(self.options, variance)

    def tag(self) -> str:
        """A folder name for these settings: ``ddim-50-uniform-eta0``."""
        opts = "".join(f"-{k}{v:g}" if isinstance(v, float) else f"-{k}{v}" for k, v in sorted(self.options.items()))
        return f"{self.sampler}-{self.steps}-{self.spacing}{opts}"
