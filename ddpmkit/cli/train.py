"""`ddpmkit train`: one flag per training setting, then the training loop."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .common import int_tuple


def add_parser(sub) -> None:
    """Register `train` and its flags."""
    t = sub.add_parser("train", help="train a diffusion model", description="Train a diffusion model. "
                       "A preset gives every setting; any flag overrides it.")
    add_train_flags(t)
    t.set_defaults(func=run)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """--preset, one flag per TrainConfig field, --out, --resume and --quiet."""
    from ..train.config import PRESETS, TrainConfig, describe_default

    preset = TrainConfig.__dataclass_fields__["preset"]
    p.add_argument("--preset", default=preset.default, choices=list(PRESETS),
                   help=f"{preset.metadata['help']} (default: {preset.default})")
    add_settings_flags(p, TrainConfig, describe_default)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")


def add_settings_flags(p: argparse.ArgumentParser, cls, describe_default) -> None:
    """One flag per field of settings class ``cls`` (train/settings.py), its help and default from the field;
    ``describe_default(name)`` writes the default. Every flag defaults to None: a given flag overrides."""
    from ..train.settings import flag, settings

    for f, kind in settings(cls):
        add_setting_flag(p, flag(f.name), f, kind, default=None, help=f"{f.metadata['help']} "
                                                                      f"({describe_default(f.name)})")


# A second spelling of a setting's flag. torchrun's own parser takes any prefix of its flags for the flag, also among
# the arguments it hands the script: `torchrun ... -m ddpmkit train --log x` stops there ("--log could match --log-dir,
# --logs-specs"), so under torchrun --log is written --log-to.
ALIASES = {"log": ("--log-to",)}


def add_setting_flag(p: argparse.ArgumentParser, option: str, f, kind, int_metavar: str | None = None, **kw) -> None:
    """The flag ``option`` of settings field ``f`` (its values of type ``kind``): --x/--no-x for a boolean, N,N for a
    tuple of integers, a repeatable word for a ``repeat`` setting, else one value of its type (shown as the field's
    metavar, or ``int_metavar`` for an integer)."""
    if kind is bool:
        p.add_argument(option, action=argparse.BooleanOptionalAction, **kw)
    elif f.metadata.get("repeat"):
        p.add_argument(option, *ALIASES.get(f.name, ()), action=RepeatedWords, metavar=f.metadata.get("metavar"), **kw)
    elif kind is tuple:
        p.add_argument(option, type=int_tuple, metavar="N,N", **kw)
    else:
        p.add_argument(option, type=kind, metavar=f.metadata.get("metavar", int_metavar if kind is int else None), **kw)


class RepeatedWords(argparse.Action):
    """A flag given once per word (``--log tensorboard --log wandb``, or comma-separated): the tuple of the words,
    each once, in order; ``none`` adds nothing (``--log none`` alone: the empty tuple)."""

    def __call__(self, parser, namespace, values, option_string=None):
        words = tuple(w for w in (x.strip() for x in values.split(",")) if w and w != "none")
        setattr(namespace, self.dest, tuple(dict.fromkeys(tuple(getattr(namespace, self.dest, None) or ()) + words)))


def run(args) -> int:
    """Train (or resume) a run and print where it stopped."""
    from ..train import TrainConfig, Trainer, resolve_run

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    out = Path(args.out) if args.out else Path("runs") / args.preset
    cfg, stored = resolve_run(args.preset, overrides, out, args.resume)  # a resume: the run's settings, read once
    trainer = Trainer(cfg, out, resume=args.resume, quiet=args.quiet, stored_config=stored)
    what = (f"{out} on {trainer.device} ({trainer.model.num_parameters():,} parameters, {trainer.num_images:,} "
            "images)")
    return run_loop(trainer, cfg, out, "train", what)


def run_loop(loop, cfg, out: Path, command: str, what: str) -> int:
    """Say what trains (rank 0: ``training WHAT, from step A to B``, or that a resumed run has its steps already),
    run the loop, and :func:`finish`."""
    if loop.dist.is_main and loop.step >= cfg.steps:  # a resume asked for no more steps than the run has
        print(f"{out} is at step {loop.step}, at or past --steps {cfg.steps}: nothing to train (give a larger "
              f"--steps to go on)", file=sys.stderr)
    elif loop.dist.is_main:
        print(f"training {what}, from step {loop.step} to {cfg.steps}", file=sys.stderr)
    return finish(loop, loop.run(), out, command)


def finish(loop, res: dict, out: Path, command: str) -> int:
    """Print where a training run stopped (rank 0) and return the exit status: 0, or 128 + the signal that
    stopped it (130 for SIGINT, 143 for SIGTERM, as the shell does). ``command``: what resumes it."""
    main_rank = loop.dist.is_main
    if res["stop"] == "signal":  # a first SIGINT/SIGTERM: the step finished and a checkpoint was written
        import shlex
        import signal

        if main_rank:
            how = "torchrun ... -m ddpmkit" if loop.dist.enabled else "ddpmkit"
            print(f"ddpmkit: stopped by {res['signal']} at step {res['step']}; checkpoint {res['checkpoint']}; "
                  f"resume with: {how} {command} --out {shlex.quote(str(out))} --resume", file=sys.stderr)
        return 128 + int(signal.Signals[res["signal"]])
    if not main_rank:
        return 0
    how = "time limit reached" if res["stop"] == "time_limit" else "done"
    loss = f"loss {res['loss']:.4f}" if res["loss"] == res["loss"] else "no step taken"  # NaN: no step was taken
    print(f"{how} at step {res['step']}: {loss}, {res['seconds']:.0f} s")
    if res["checkpoint"]:
        print(f"checkpoint: {res['checkpoint']}")
    if res["grid"]:
        print(f"samples:    {res['grid']}")
    return 0
