"""What several commands share: the parser class, CLIError, and the sampler and class flags."""

from __future__ import annotations

import argparse

from ..errors import DdpmkitError


class CLIError(DdpmkitError):
    """A bad combination of command-line arguments."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching: ``--log-e`` is refused, never read as ``--log-every``,
    so that adding a flag can never change what an existing command line means."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line and exit status 2, as argparse does, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# the settings whose flag is not --<setting with dashes>: the one place that maps a setting to its flag
_FLAGS = {"classes": "--class"}


def flag_of(setting: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``, ``classes`` -> ``--class``."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def error_line(e: Exception) -> str:
    """The one line a user's error prints: a refused setting (``SettingError``) named by its flag."""
    from ..errors import SettingError

    return e.named(flag_of(e.setting)) if isinstance(e, SettingError) else str(e)


def int_tuple(s: str) -> tuple:
    """``"1,2,3"`` -> ``(1, 2, 3)``; ``""`` or ``"none"`` -> ``()`` (an argparse ``type``)."""
    s = s.strip()
    if s in ("", "none"):
        return ()
    try:
        return tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def samplers_epilog() -> str:
    """One line per registered sampler, for the end of --help: name, default steps and timesteps, summary."""
    from ..samplers import SAMPLERS, sampler_names

    rows = []
    for n in sampler_names():
        info = SAMPLERS[n]
        steps = "all T" if info.default_steps is None else str(info.default_steps)
        rows.append(f"  {n:<13} {steps:>5} steps, {info.default_spacing:<8} {info.summary}")
    return "samplers (name, default steps and timesteps, what it is):\n" + "\n".join(rows)


def add_sampler_flags(p, variance: bool = True, default_sampler: str = "ddim") -> None:
    """--sampler, --steps, --spacing, every registered sampler's own options, --variance (unless told not to) and
    --clip."""
    from ..diffusion import VARIANCES
    from ..samplers import SAMPLERS, SPACINGS, sampler_names

    names = sampler_names()
    p.add_argument("--sampler", default=None, metavar="NAME",
                   help=f"one of {', '.join(names)} (default: {default_sampler}, or a distilled run's own; each is "
                        "described below)")
    p.set_defaults(default_sampler=default_sampler)
    defaults = ", ".join(f"{n} {'all T' if SAMPLERS[n].default_steps is None else SAMPLERS[n].default_steps}"
                         for n in names)
    p.add_argument("--steps", type=int, default=None, help=f"timesteps to visit, 1..T (default: {defaults})")
    p.add_argument("--timesteps", "--spacing", dest="spacing", default=None, metavar="NAME",
                   help=f"which timesteps: {', '.join(SPACINGS)} (default: the sampler's own; --spacing is the "
                        "same flag)")
    owners: dict[str, list] = {}
    for n in names:
        for o in SAMPLERS[n].options:
            owners.setdefault(o.name, []).append((n, o))
    for name, pairs in sorted(owners.items()):
        o = pairs[0][1]
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"sampler_{name}", type=o.type, default=None,
                       metavar=name.upper(),
                       help=f"{o.help} ({', '.join(n for n, _ in pairs)} only; default: {o.default:g})"
                       if isinstance(o.default, float) else f"{o.help} (default: {o.default})")
    if variance:
        p.add_argument("--variance", default=None, metavar="NAME",
                       help=f"reverse-process variance: {', '.join(VARIANCES)} (beta_tilde, beta, the network's "
                            "own with --learn-sigma, or Analytic-DPM's from `eval variance`; default: the run's own)")
    p.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                   help="clip the predicted x0 to [-1, 1] (default: on)")


def add_class_flags(p, what: str = "samples", class_help: str | None = None, guidance_help: str | None = None) -> None:
    """--class and --guidance, for a class-conditional run (``class_help``, ``guidance_help``: another command's
    reading of them)."""
    from ..request import DEFAULT_GUIDANCE

    p.add_argument("--class", dest="classes", default=None, metavar="C",
                   help=class_help or f"class-conditional runs: the class of the {what}, by label or name: 7, 3,5,8 "
                                      "or all (default: every class in turn)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight w >= 0, eps = (1 + w) eps(x, c) - w eps(x, null); 0 is the "
                        "conditional model alone " + (guidance_help or "(default: {w:g} for a class-conditional "
                                                                       "run)").format(w=DEFAULT_GUIDANCE))


def check_counts(n=None, batch_size=None, *, n_min: int = 1) -> None:
    """--n (at least ``n_min``) and --batch-size (1 .. MAX_BATCH) in one line each when out of range; None: not
    given."""
    from ..limits import MAX_BATCH, check_int

    if n is not None:
        check_int("--n", n, n_min)
    if batch_size is not None:
        check_int("--batch-size", batch_size, 1, MAX_BATCH)


def sample_options(args, **extra):
    """SampleOptions from the sampler flags; an option of another sampler is refused in one line."""
    from ..generate import SampleOptions
    from ..samplers import SAMPLERS

    given = {k[len("sampler_"):]: v for k, v in vars(args).items() if k.startswith("sampler_") and v is not None}
    default = getattr(args, "default_sampler", "ddim")
    info = SAMPLERS.get(args.sampler or default)
    if info is not None and args.sampler is not None:  # the run's own sampler is known once the run is open
        takes = {o.name for o in info.options}
        for name in given:
            if name not in takes:
                raise CLIError(f"--{name.replace('_', '-')} does not apply to the {args.sampler} sampler")
    check_counts(batch_size=extra.get("batch_size"))
    return SampleOptions(sampler=args.sampler, default_sampler=default, steps=args.steps, spacing=args.spacing,
                         options=given,
                         variance=args.variance, clip_x0=args.clip, classes=getattr(args, "classes", None),
                         guidance=getattr(args, "guidance", None), **extra)
