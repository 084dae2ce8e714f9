"""A sampling request resolved once: the user's settings (``SampleOptions``) against an opened ``Run``.

A command opens the run once and builds one :class:`Request` (the sampler's plan with its timesteps, the
conditioning, the variance, the output tag); everything below takes it and never plans again or re-reads a file.
Errors name the setting they refuse (``SettingError.setting``); the CLI shows it as its flag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .diffusion.denoiser import DEFAULT_GUIDANCE
from .errors import SettingError
from .run import Run
from .samplers.options import SamplingPlan, resolve

__all__ = ["SampleOptions", "Request", "SamplingPlan", "DEFAULT_GUIDANCE", "parse_classes", "one_class_label",
           "guidance_weight", "Conditioning"]


def parse_classes(spec, class_names) -> list[int] | None:
    """The labels a ``classes`` value asks for: ``7``, ``3,5,8``, ``all`` or class names (``cat,dog``), or a list
    of labels.

    None for no value (``spec`` None). SettingError (one line) for a label or a name the run does not have, or for
    an unconditional run (``class_names`` None).
    """
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(int(c)) for c in spec)
    text = str(spec).strip()
    if class_names is None:
        raise SettingError("classes", f" {text}: this run is unconditional (trained without --class-cond), so it "
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
            raise SettingError("classes", f": no class {part!r} in this run; its classes are 0..{len(names) - 1} "
                                          f"({shown}), or all")
    if not out:
        raise SettingError("classes", ": name at least one class, or all")
    return out


def one_class_label(spec, class_names, null_class) -> int | None:
    """The one label a ``classes`` value gives every input image: None when ``spec`` is None, the null class for
    ``none``, else the label of one class (``parse_classes``). SettingError (one line) for several classes, ``none``
    on a model without a null class, or any class for an unconditional run (``class_names`` None)."""
    if spec is None:
        return None
    text = str(spec).strip()
    if text == "none" and class_names is not None:
        if null_class is None:
            raise SettingError("classes", " none: this model has no null class (it was not trained with label "
                                          "dropout), so it has no unconditional model; give a class")
        return null_class
    labels = parse_classes(text, class_names)  # refuses an unconditional run or an unknown class
    if len(labels) != 1:
        raise SettingError("classes", f" {text}: give one class for all the images, or none")
    return labels[0]


def guidance_weight(guidance, class_names, null_class, distilled: float | None = None) -> float | None:
    """The classifier-free guidance weight w of a run with ``class_names`` (None: unconditional) and ``null_class``:
    ``guidance`` checked (a number >= 0, a null class to guide with), ``DEFAULT_GUIDANCE`` when None and the run has
    a null class, else 0; None for an unconditional run, which refuses a weight. A student distilled at guidance
    ``distilled`` draws at that weight and refuses another. SettingError (one line)."""
    if distilled is not None and class_names is not None:
        if guidance is not None and not (isinstance(guidance, (int, float)) and abs(guidance - distilled) < 1e-9):
            raise SettingError("guidance", f" {guidance!r}: this student was distilled at guidance w = "
                                           f"{distilled:g}, and draws at that weight only")
        return float(distilled)
    if class_names is None:
        if guidance is not None:
            raise SettingError("guidance", ": this run is unconditional (trained without --class-cond), so "
                                           "it has nothing to guide")
        return None
    w = guidance
    if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
                          or w < 0):
        raise SettingError("guidance", f" must be a number >= 0, got {w!r}")
    if w is None:
        return DEFAULT_GUIDANCE if null_class is not None else 0.0
    if w > 0 and null_class is None:
        raise SettingError("guidance", ": this model has no null class (it was not trained with label "
                                       "dropout), so it cannot be guided; use --guidance 0")
    return float(w)


@dataclass(frozen=True)
class Conditioning:
    """What a sampling run conditions on: one label per sample (None: unconditional), the classes asked for (None:
    every class in turn) and the guidance weight (None: unguided)."""

    labels: torch.Tensor | None
    classes: list | None
    guidance: float | None

    @staticmethod
    def of(opt: "SampleOptions", class_names, null_class, n: int, *, grouped: bool,
           distilled: float | None = None) -> "Conditioning":
        """The conditioning of ``n`` samples of a run with ``class_names`` (None: unconditional) and ``null_class``.

        With classes asked for (``opt.classes``), ``grouped`` gives each class ``n / len(classes)`` consecutive
        samples (``n`` must be a multiple), else the classes take turns; a class-conditional run asked for none
        draws every class in turn. The guidance weight is ``opt.guidance``, by default ``DEFAULT_GUIDANCE`` where
        the run has a null class (a distilled student's own weight: ``distilled``); an unconditional run refuses a
        weight.
        """
        classes = parse_classes(opt.classes, class_names)
        w = guidance_weight(opt.guidance, class_names, null_class, distilled)
        if class_names is None:
            return Conditioning(None, None, None)
        pool = classes if classes is not None else list(range(len(class_names)))
        if grouped and classes is not None:
            labels = torch.tensor(pool, dtype=torch.int64).repeat_interleave(n // len(pool))
        else:
            labels = torch.tensor(pool, dtype=torch.int64).repeat(-(-n // len(pool)))[:n]
        return Conditioning(labels, classes, w)


@dataclass
class SampleOptions:
    """How to sample a run. ``steps`` and ``spacing`` default to the sampler's own (50 uniform steps for ddim,
    all T for ddpm); ``options`` holds the sampler's own settings (``{"eta": 0.5}`` for ddim); ``variance``
    defaults to the run's (``small`` unless its config says otherwise)."""

    sampler: str | None = None  # None: the run's own (a distilled student's), else default_sampler
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
    default_sampler: str = "ddim"  # the sampler when neither ``sampler`` nor the run names one

    def plan(self, schedule, run_defaults: dict | None = None) -> SamplingPlan:
        """The sampler, its timesteps and options for a run over ``schedule`` (a NoiseSchedule, or its T where the
        spacing needs no more), every setting checked (SettingError, one line).

        ``run_defaults`` (``Run.sampling_defaults``): the sampler, steps and spacing a run draws with when none is
        named, a distilled student's. Its steps and spacing apply while the sampler is its own.
        """
        from .diffusion import VARIANCES

        for name in ("n", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SettingError(name, f" must be a positive integer, got {v!r}")
        if self.variance is not None and self.variance not in VARIANCES:
            raise SettingError("variance", f"unknown variance {self.variance!r}: choose {' or '.join(VARIANCES)}",
                               lead=False)
        own = run_defaults or {}
        sampler = self.sampler or own.get("sampler") or self.default_sampler
        steps, spacing = self.steps, self.spacing
        if own and sampler == own.get("sampler"):
            steps = own.get("steps") if steps is None else steps
            spacing = own.get("spacing") if spacing is None else spacing
        return resolve(sampler, schedule, steps, spacing, **self.options)


@dataclass(frozen=True)
class Request:
    """A sampling request resolved once: the opened run, the user's options, the sampler's plan (with its
    timesteps), the conditioning of ``n`` samples and the reverse variance."""

    run: Run
    options: SampleOptions
    plan: SamplingPlan
    conditioning: Conditioning
    n: int
    variance: str

    @classmethod
    def resolve(cls, run, opt: SampleOptions, *, per_class: bool = True) -> Request:
        """Check ``opt`` against ``run`` (a Run, or a path ``Run.open`` accepts) and plan once.

        ``per_class``: ``opt.n`` samples of each class asked for, class after class (``sample``); else ``opt.n``
        in all with the classes taking turns (FID).
        """
        run = run if isinstance(run, Run) else Run.open(run)
        plan = opt.plan(run.schedule, run.sampling_defaults())
        classes = parse_classes(opt.classes, run.class_names)
        n = opt.n * (len(classes) if classes and per_class else 1)
        cond = Conditioning.of(opt, run.class_names, run.null_class, n, grouped=per_class,
                               distilled=run.distilled_guidance)
        return cls(run, opt, plan, cond, n, opt.variance or run.variance)

    @property
    def model_calls(self) -> int:
        """Network evaluations per batch."""
        return self.plan.model_calls

    def denoiser(self, device=None):
        """The run's Denoiser for this request (its weights loaded once per Run)."""
        opt = self.options
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return self.run.denoiser(ema=opt.ema, variance=opt.variance, clip_x0=opt.clip_x0, device=dev,
                                 guidance=self.conditioning.guidance)

    def tag(self) -> str:
        """A folder name for these settings: ``ddim-50-uniform-eta0[-<variance>][-class<K>][-w<w>]-seed<K>``."""
        opt, run, cond = self.options, self.run, self.conditioning
        tag = self.plan.tag()
        if self.plan.reads_variance(self.variance):
            tag += f"-{self.variance}"
        if run.class_cond:  # the classes and the guidance weight: -class3.5.8-w1, -classall-w1, -w1
            spec = opt.classes
            if spec is not None:
                spec = "all" if str(spec).strip() == "all" else ".".join(str(c) for c in cond.classes)
                tag += f"-class{spec}"
            tag += f"-w{cond.guidance:g}"
        return f"{tag}-seed{opt.seed}"

    def out_dir(self) -> Path:
        """``RUN/samples/<tag>``: where ``sample`` writes when no folder is named."""
        return self.run.dir / "samples" / self.tag()
