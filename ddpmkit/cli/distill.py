"""`ddpmkit distill`: a trained run distilled into a student that draws in a few steps."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import CLIError


def add_parser(sub) -> None:
    """Register `distill` and its flags."""
    d = sub.add_parser(
        "distill", help="distil a trained run into a few-step student",
        description="Progressive distillation (Salimans & Ho 2022): a copy of the run's network learns to take one "
                    "DDIM step where its teacher takes two; each round halves the steps, from --teacher-steps down "
                    "to --steps, and each round's student teaches the next. Consistency distillation (--method "
                    "consistency, Song et al. 2023): the copy learns to map any noise level to the end of the "
                    "teacher's ODE, and draws in --steps steps. The student is a run: `ddpmkit sample "
                    "DIR` draws with its own sampler and steps, and every other command takes it. A class-"
                    "conditional teacher is distilled with classifier-free guidance at --guidance, so that the "
                    "student draws guided in one network call per step.")
    d.add_argument("run_dir", metavar="RUN", nargs="?", default=None,
                   help="the trained run to distil (not needed with --resume)")
    from ..train.distill_config import DistillConfig, distill_fields, distill_flag
    from ..train.settings import settings, show_value
    from .train import add_setting_flag

    fields = dict((f.name, (f, kind)) for f, kind in settings(DistillConfig))
    for name in distill_fields():
        if name == "teacher":
            continue
        f, kind = fields[name]
        shown = "sampling's default weight" if name == "guidance" else show_value(f.default)
        help_text = f.metadata["help"] if name == "guidance" else f"{f.metadata['help']} (default: {shown})"
        add_setting_flag(d, distill_flag(name), f, kind, int_metavar="N", default=None, dest=name, help=help_text)
    d.add_argument("--out", required=True, metavar="DIR", help="the student's run directory")
    d.add_argument("--resume", action="store_true", help="continue the distillation in --out from its latest "
                                                         "checkpoint")
    d.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")
    d.set_defaults(func=run)


def resolve_distill(args):
    """(DistillConfig, the stored config.json or None) of the command line: a new student of RUN, or the run in
    --out resumed with the flags on top."""
    import dataclasses

    from ..run import Run
    from ..store.rundir import CONFIG_NAME, read_config
    from ..train.config import TrainConfig
    from ..train.distill_config import DistillConfig, distill_fields
    from ..train.resume import check_locked

    out = Path(args.out)
    overrides = {k: getattr(args, k) for k in distill_fields() if getattr(args, k, None) is not None}
    if args.resume and (out / CONFIG_NAME).is_file():
        stored_json = read_config(out)
        if "distill" not in stored_json:
            raise CLIError(f"{out} is not a distillation run: resume it with `ddpmkit train --out {out} --resume`")
        stored = DistillConfig.from_json(stored_json)
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(stored.teacher).resolve():
            raise CLIError(f"{out} distils {stored.teacher}, not {args.run_dir}")
        cfg = dataclasses.replace(stored, **overrides)
        check_locked(cfg, stored, out)
        return cfg, stored_json
    if args.run_dir is None:
        raise CLIError("name the run to distil: ddpmkit distill RUN --out DIR")
    teacher = Run.open(args.run_dir)
    if teacher.kind != "diffusion" or "train" not in teacher.config:
        raise CLIError(f"{teacher.dir} is not a diffusion run trained by ddpmkit: distil one that `ddpmkit train` "
                       "made (its data and settings are in its config.json)")
    if "distill" in teacher.config:
        raise CLIError(f"{teacher.dir} is itself a distilled student: distil its teacher "
                       f"({teacher.config['distill'].get('teacher')}) to fewer --steps instead")
    from ..diffusion.denoiser import DEFAULT_GUIDANCE

    tcfg = TrainConfig.from_json(teacher.config)
    if tcfg.class_cond and overrides.get("guidance") is None and teacher.null_class is not None:
        overrides["guidance"] = DEFAULT_GUIDANCE
    if not args.resume and out.exists() and any(out.iterdir()):
        raise CLIError(f"{out} exists and is not empty: choose another --out, or --resume the distillation there")
    return DistillConfig.from_teacher(tcfg, str(teacher.dir), **overrides), None


def run(args) -> int:
    """Distil (or resume distilling) and print where it stopped."""
    from ..train.loop import TrainingLoop
    from ..train.tasks.distill import DistillTask
    from .train import finish

    cfg, stored = resolve_distill(args)
    out = Path(args.out)
    loop = TrainingLoop(DistillTask, cfg, out, resume=args.resume, quiet=args.quiet, stored_config=stored)
    task = loop.task
    if loop.dist.is_main:
        if loop.step >= cfg.steps:
            print(f"{out} is at step {loop.step}, the end of its {cfg.rounds} rounds: nothing to distil",
                  file=sys.stderr)
        else:
            what = (f"consistency distillation, {cfg.round_steps} steps over {cfg.cd_levels} noise levels"
                    if cfg.method == "consistency" else f"{cfg.rounds} round(s) of {cfg.round_steps} steps, "
                    f"{cfg.teacher_steps} teacher steps -> {cfg.student_steps}")
            print(f"distilling {cfg.teacher} into {out} on {loop.device}: {what}"
                  + (f", guidance w = {cfg.guidance:g}" if cfg.guidance is not None else "")
                  + f"; from step {loop.step} (round {task.round + 1})", file=sys.stderr)
    res = loop.run()
    if loop.dist.is_main:
        _record_reached(loop, out)
    code = finish(loop, res, out, "distill")
    if loop.dist.is_main and res["stop"] != "signal":
        reached = task.reached_steps(loop.step)
        if reached != cfg.student_steps:
            print(f"note: the distillation stopped in round {task.round + 1} of {cfg.rounds}: the student draws in "
                  f"{reached} steps so far; resume with: ddpmkit distill --out {out} --resume", file=sys.stderr)
        else:
            print(f"sample it with: ddpmkit sample {out}  ({cfg.distill_section()['sampler']}, {reached} "
                  f"step{'s' if reached > 1 else ''}, trailing timesteps)")
    return code


def _record_reached(loop, out: Path) -> None:
    """config.json's ``distill.reached_steps``: the steps of the student as it stands, which sampling defaults to."""
    from ..store.rundir import read_config, write_config

    config = read_config(out)
    config["distill"]["reached_steps"] = int(loop.task.reached_steps(loop.step))
    write_config(out, config)
