"""The ``ddpmkit`` command line: argument parsing and printing only; the work is done by the modules."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from . import __version__
from .errors import DdpmkitError


class CLIError(DdpmkitError):
    """A bad combination of command-line arguments."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no prefix matching: ``--log`` is refused, never read as ``--log-every``,
    so that adding a flag can never change what an existing command line means."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line and exit status 2, as argparse does, without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------- train
def _int_tuple(s: str) -> tuple:
    s = s.strip()
    if s in ("", "none"):
        return ()
    try:
        return tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    from .train.config import PRESETS, TrainConfig, describe_default, flag, settings

    preset = TrainConfig.__dataclass_fields__["preset"]
    p.add_argument("--preset", default=preset.default, choices=list(PRESETS),
                   help=f"{preset.metadata['help']} (default: {preset.default})")
    for f, kind in settings():  # one flag per TrainConfig field, its help and default from the field
        kw = dict(default=None, help=f"{f.metadata['help']} ({describe_default(f.name)})")
        if kind is bool:
            p.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif kind is tuple:
            p.add_argument(flag(f.name), type=_int_tuple, metavar="N,N", **kw)
        else:
            p.add_argument(flag(f.name), type=kind, metavar=f.metadata.get("metavar"), **kw)
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar (for logs)")


def cmd_train(args) -> int:
    from .store.rundir import read_config
    from .train import TrainConfig, Trainer, config_from_preset

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    overrides = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    out = Path(args.out) if args.out else Path("runs") / args.preset
    if args.resume and (out / "config.json").is_file():
        # a resume starts from the run's own configuration; flags given now override it
        stored = TrainConfig.from_json(read_config(out))
        base = dataclasses.asdict(stored)
        base.update(overrides)
        base.pop("preset", None)
        cfg = config_from_preset(stored.preset, **base)
    else:
        cfg = config_from_preset(args.preset, **overrides)
    trainer = Trainer(cfg, out, resume=args.resume, quiet=args.quiet)
    main_rank = trainer.dist.is_main
    if main_rank and trainer.step >= cfg.steps:  # a resume asked for no more steps than the run has
        print(f"{out} is at step {trainer.step}, at or past --steps {cfg.steps}: nothing to train (give a larger "
              f"--steps to go on)", file=sys.stderr)
    elif main_rank:
        print(f"training {out} on {trainer.device} ({trainer.model.num_parameters():,} parameters, "
              f"{trainer.num_images:,} images), from step {trainer.step} to {cfg.steps}", file=sys.stderr)
    res = trainer.run()
    if res["stop"] == "signal":  # a first SIGINT/SIGTERM: the step finished and a checkpoint was written
        import shlex
        import signal

        if main_rank:
            how = "torchrun ... -m ddpmkit" if trainer.dist.enabled else "ddpmkit"
            print(f"ddpmkit: stopped by {res['signal']} at step {res['step']}; checkpoint {res['checkpoint']}; "
                  f"resume with: {how} train --out {shlex.quote(str(out))} --resume", file=sys.stderr)
        return 128 + int(signal.Signals[res["signal"]])  # 130 for SIGINT, 143 for SIGTERM, as the shell does
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


# ---------------------------------------------------------------------------------------------- sample
def samplers_epilog() -> str:
    """One line per registered sampler, for the end of --help: name, default steps and timesteps, summary."""
    from .samplers import SAMPLERS, sampler_names

    rows = []
    for n in sampler_names():
        info = SAMPLERS[n]
        steps = "all T" if info.default_steps is None else str(info.default_steps)
        rows.append(f"  {n:<13} {steps:>5} steps, {info.default_spacing:<8} {info.summary}")
    return "samplers (name, default steps and timesteps, what it is):\n" + "\n".join(rows)


# `ddpmkit sample`'s default: the best of bench/bench_fast_sampling.py's table at 10 and 20 network calls on the
# demo's digits model (the README gives the table). `eval fid` keeps DDIM, the papers' protocol.
SAMPLE_DEFAULT_SAMPLER = "dpmpp-2m-sde"


def _add_sampler_flags(p, variance: bool = True, default_sampler: str = "ddim") -> None:
    """--sampler, --steps, --spacing, every registered sampler's own options, --variance (unless told not to) and
    --clip."""
    from .diffusion import VARIANCES
    from .samplers import SAMPLERS, SPACINGS, sampler_names

    names = sampler_names()
    p.add_argument("--sampler", default=default_sampler, metavar="NAME",
                   help=f"one of {', '.join(names)} (default: {default_sampler}; each is described below)")
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


def _add_class_flags(p, what: str = "samples", class_help: str | None = None, guidance_help: str | None = None) -> None:
    """--class and --guidance, for a class-conditional run (``class_help``, ``guidance_help``: another command's
    reading of them)."""
    from .samplers.options import DEFAULT_GUIDANCE

    p.add_argument("--class", dest="classes", default=None, metavar="C",
                   help=class_help or f"class-conditional runs: the class of the {what}, by label or name: 7, 3,5,8 "
                                      "or all (default: every class in turn)")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="classifier-free guidance weight w >= 0, eps = (1 + w) eps(x, c) - w eps(x, null); 0 is the "
                        "conditional model alone " + (guidance_help or "(default: {w:g} for a class-conditional "
                                                                       "run)").format(w=DEFAULT_GUIDANCE))


def _sample_options(args, **extra):
    """SampleOptions from the sampler flags; an option of another sampler is refused in one line."""
    from .generate import SampleOptions
    from .samplers import SAMPLERS

    given = {k[len("sampler_"):]: v for k, v in vars(args).items() if k.startswith("sampler_") and v is not None}
    info = SAMPLERS.get(args.sampler)
    if info is not None:
        takes = {o.name for o in info.options}
        for name in given:
            if name not in takes:
                raise CLIError(f"--{name.replace('_', '-')} does not apply to the {args.sampler} sampler")
    from .limits import MAX_BATCH, check_int

    if extra.get("batch_size") is not None:
        check_int("--batch-size", extra["batch_size"], 1, MAX_BATCH)
    return SampleOptions(sampler=args.sampler, steps=args.steps, spacing=args.spacing, options=given,
                         variance=args.variance, clip_x0=args.clip, classes=getattr(args, "classes", None),
                         guidance=getattr(args, "guidance", None), **extra)


def cmd_sample(args) -> int:
    from .generate import default_out_dir, generate

    source = args.checkpoint or args.run_dir
    n = args.n
    if n is None:  # 64 images, or 8 of each class when several are asked for
        several = args.classes is not None and ("," in args.classes or args.classes.strip() == "all")
        n = 8 if several else 64
    opt = _sample_options(args, n=n, batch_size=args.batch_size, seed=args.seed, ema=args.ema)
    out = Path(args.out) if args.out else default_out_dir(source, opt)
    res = generate(source, out, opt, gif_path=args.gif, device=args.device, progress=not args.quiet)
    guided = f", guidance w = {res['guidance']:g}" if res.get("guidance") is not None else ""
    print(f"{res['n']} samples in {res['seconds']:.1f} s ({res['per_second']:.2f} samples/s, "
          f"{res['steps']} network calls per batch{guided})")
    print(f"samples: {res['dir']}")
    print(f"grid:    {res['grid']}")
    if "gif" in res:
        print(f"gif:     {res['gif']} ({res['gif_frames']} frames)")
    return 0


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(out=args.out, train_seconds=args.train_seconds, quiet=args.quiet, n=args.n)
    return 0


# ---------------------------------------------------------------------------------------------- plot
def cmd_plot(args) -> int:
    from .diffusion import NoiseSchedule

    from .limits import check_T

    check_T(args.T, "--T")  # before the schedule's arrays are allocated
    try:
        NoiseSchedule.linear(args.T)
    except ValueError as e:
        raise CLIError(f"--T: {e}") from None
    from .viz import figures as plots

    if args.what == "schedule":
        path = plots.plot_schedule(args.out or "schedule.png", T=args.T)
    elif args.what == "loss":
        if not args.run_dir:
            raise CLIError("plot loss needs a RUN_DIR")
        run = Path(args.run_dir)
        path = plots.plot_loss(run / "metrics.csv", args.out or run / "loss.png")
    else:  # forward
        from .demo import forward_images

        images = forward_images(args.data, args.image, args.data_dir)
        ts = _int_tuple(args.t) if args.t else (0, 50, 100, 200, 300, 500, 700, 999)
        ts = tuple(t for t in ts if t < args.T) or (0,)
        path = plots.plot_forward(images, args.out or "forward.png", ts=ts, T=args.T)
    print(path)
    return 0


# ---------------------------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .run import Run

    Run.open(args.run_dir)  # a clear one-line error before any work when it is not a run
    if args.what == "fid":
        return _eval_fid(args)
    if args.what == "memorization":
        return _eval_memorization(args)
    if args.what == "variance":
        return _eval_variance(args)
    from .metrics.nll import evaluate_nll, write_terms_csv
    from .viz import plot_bpd_terms

    args.n = 256 if args.n is None else args.n
    args.batch_size = 16 if args.batch_size is None else args.batch_size
    for name in ("n", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    from .diffusion import VARIANCES

    if args.variance not in (None, *VARIANCES):
        raise CLIError(f"unknown variance {args.variance!r}: choose one of {', '.join(VARIANCES)}")
    res = evaluate_nll(args.run_dir, data=args.data, split=args.split, n=args.n, batch_size=args.batch_size,
                       ema=args.ema, variance=args.variance, seed=args.seed, classes=args.classes,
                       guidance=args.guidance)
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if res.get("note"):
        print(f"note: {res['note']}", file=sys.stderr)
    import json

    from .files import atomic_write_text

    name = f"nll_terms{res['tag']}"  # -classnone, -class3, -w0.5: each conditioning keeps its own files
    csv_path = write_terms_csv(out / f"{name}.csv", res["terms"])
    png = plot_bpd_terms(res["terms"], out / f"{name}.png")
    keys = ("bpd", "bpd_stderr", "n", "source", "split", "variance", "objective", "ema", "T", "conditioning",
            "guidance", "seed", "note")
    notes = atomic_write_text(out / f"{name}.json", json.dumps({k: res.get(k) for k in keys}, indent=2) + "\n")
    cond = f", conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"NLL bound: {res['bpd']:.4f} +- {res['bpd_stderr']:.4f} bits/dim on {res['n']} images of "
          f"{res['source']} ({res['split']}){cond}, variance {res['variance']}, {'EMA' if res['ema'] else 'raw'} "
          f"weights, {res['seconds']:.1f} s")
    print(f"terms: {csv_path} (notes: {notes.name})")
    print(f"plot:  {png}")
    return 0


def _eval_variance(args) -> int:
    """`eval variance RUN`: Gamma_t of the analytic variance (Analytic-DPM), stored in the run."""
    import time

    from .run import Run

    n = 256 if args.n is None else args.n
    batch_size = 32 if args.batch_size is None else args.batch_size
    for name, v in (("n", n), ("batch-size", batch_size)):
        if v < 1:
            raise CLIError(f"--{name} must be a positive integer, got {v}")
    run = Run.open(args.run_dir)
    start = time.perf_counter()
    gamma, note = run.estimate_gamma(n=n, batch_size=batch_size, seed=args.seed, ema=args.ema, data=args.data)
    path = run.save_gamma(gamma, note)
    print(f"Gamma_t over {note['n']} images of {note['source']} (checkpoint step {note['step']}, "
          f"{'EMA' if args.ema else 'raw'} weights): min {float(gamma.min()):.4f}, max {float(gamma.max()):.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    print(f"stored: {path} (use it with --variance analytic)")
    return 0


def _eval_memorization(args) -> int:
    """`eval memorization RUN`: each sample's nearest training image, against real images' own (issue 19)."""
    from .metrics.memorization import evaluate_memorization
    from .samplers import SAMPLERS, sampler_names

    sampler = args.sampler or "ddim"
    if sampler not in SAMPLERS:
        raise CLIError(f"unknown --sampler {sampler!r}: choose one of {', '.join(sampler_names())}")
    res = evaluate_memorization(args.run_dir, n=500 if args.n is None else args.n, sampler=sampler,
                                steps=args.steps, seed=args.seed, out=args.out, ema=args.ema,
                                guidance=getattr(args, "guidance", None), log=lambda m: print(m, file=sys.stderr))
    print(f"memorisation check: {res['n']} samples ({sampler}) against the {res['n_train']} training images, "
          f"{res['seconds']:.1f} s")
    for key, name in (("pixels", "pixels"), ("features", res.get("features", {}).get("name"))):
        r = res.get(key)
        if r is None:
            continue
        print(f"  {name}: nearest training image at {r['samples_median']:.4g} (median; real images "
              f"{r['real_median']:.4g}); samples closer than real images: {r['closer_than_real']:.3f} "
              f"(0.5 = alike, 1 = copies); near copies {100 * r['near_copies']:.1f}% (real "
              f"{100 * r['real_near_copies']:.1f}%, below {r['threshold']:.4g})")
    print(f"result: {res['json']}")
    if res.get("figure"):
        print(f"pairs:  {res['figure']}")
    return 0


def _eval_fid(args) -> int:
    from .metrics.fid import evaluate_fid
    from .samplers import get_sampler

    n = 50_000 if args.n is None else args.n
    if n < 2 or (args.batch_size is not None and args.batch_size < 1):
        raise CLIError("--n must be at least 2 and --batch-size positive")
    if args.sampler is None:  # left unset (so that --protocol can tell): ddim, or the protocol's
        args.sampler = "ddpm" if args.protocol == "ddpm-paper" else "ddim"
    opt = _sample_options(args, ema=args.ema)
    res = evaluate_fid(args.run_dir, n=n, reference=args.reference, data_dir=args.data_dir, features=args.features,
                       inception_path=args.inception, download=args.download, sample_options=opt,
                       batch_size=args.batch_size, seed=args.seed, protocol=args.protocol)
    opts = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}" for k, v in res["options"].items())
    reads = get_sampler(res["sampler"]).reads_variance(res["options"], res["variance"])
    variance = f", {res['variance']} variance" if reads else ""
    sampler = f"{res['sampler']}{variance}, {res['steps']} steps{opts}, {res['spacing']} spacing"
    if res.get("guidance") is not None:
        sampler += f", guidance w = {res['guidance']:g}"
        if res.get("classes") is not None:
            sampler += f", class {','.join(res['class_names'])}"
    # the protocol beside every FID: the DDPM paper's exactly, or custom and how it differs from it
    protocol = res["protocol"] + ("" if not res["protocol_differences"] else
                                  f", not ddpm-paper: {'; '.join(res['protocol_differences'])}")
    print(f"FID ({res['features']} features, protocol {protocol}): {res['fid']:.3f} for {res['n']} samples "
          f"({sampler}) against "
          f"{res['n_reference']} images of {res['reference']}; sampling {res['sample_seconds']:.1f} s, "
          f"scoring {res['score_seconds']:.1f} s")
    if "noise_floor" in res:
        floor = f"{res['noise_floor']:.3f} ({res['noise_floor_n']} held-out real digits)"
        if "noise_floor_at_n" in res:
            floor += f", {res['noise_floor_at_n']:.3f} at n = {res['n']}"
        print(f"noise floor, real against real: {floor}")
    return 0


# ---------------------------------------------------------------------------------------------- report
def cmd_report(args) -> int:
    from .run import Run
    from .viz.report import write_report

    Run.open(args.run_dir)  # a one-line error when it is not a run
    print(write_report(args.run_dir, args.out))
    return 0


# ---------------------------------------------------------------------------------------------- diffusers
def cmd_import_diffusers(args) -> int:
    from .interop import import_diffusers

    run = import_diffusers(args.source, args.out)
    print(f"run: {run}")
    print(f"sample with: ddpmkit sample {run} --sampler ddim --steps 50")
    return 0


def cmd_export_diffusers(args) -> int:
    from .interop import export_diffusers

    export_diffusers(args.run_dir, args.out, ema=args.ema)
    return 0


# ---------------------------------------------------------------------------------------------- inpaint, edit
def cmd_inpaint(args) -> int:
    from .edit.commands import inpaint_run

    res = inpaint_run(args.checkpoint or args.run_dir, image=args.image, mask=args.mask, out=args.out,
                      jump=args.jump, resample=args.resample, n=args.n, steps=args.steps, spacing=args.spacing,
                      variance=args.variance, clip_x0=args.clip, seed=args.seed, batch_size=args.batch_size,
                      ema=args.ema, device=args.device, resize=args.resize, classes=args.classes,
                      guidance=args.guidance)
    cond = f"; conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"{res['n']} inpaintings in {res['seconds']:.1f} s (RePaint, {res['steps']} steps, jump "
          f"{args.jump}, resample {args.resample}: {res['model_calls']} network calls per image{cond})")
    print(f"images: {res['dir']}")
    print(f"figure: {res['figure']}")
    return 0


def cmd_edit(args) -> int:
    from .edit.commands import edit_run, parse_strengths

    strengths = parse_strengths(args.strength)
    opt = _sample_options(args, n=args.n, batch_size=args.batch_size, seed=args.seed, ema=args.ema)
    res = edit_run(args.checkpoint or args.run_dir, image=args.image, strengths=strengths, sample_options=opt,
                   out=args.out, device=args.device, resize=args.resize)
    calls = ", ".join(f"{c} at {s:g}" for s, c in zip(res["strengths"], res["model_calls"]))
    cond = f"; conditioned on {res['conditioning']}" if res["conditioning"] else ""
    print(f"{res['n']} edits in {res['seconds']:.1f} s (SDEdit with {res['plan'].sampler}; network calls per "
          f"image: {calls}{cond})")
    print(f"images: {res['dir']}")
    print(f"strip:  {res['figure']}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddpmkit",
                description="Denoising diffusion (DDPM, DDIM) for images: train, sample, plot.")
    p.add_argument("--version", action="version", version=f"ddpmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="train on the embedded digits and draw samples, pictures and GIFs",
                       description="Train the digits preset for a few minutes on this machine, sample with DDPM "
                                   "(1000 steps) and DDIM (50 steps), and write grids, GIFs, the schedule, "
                                   "forward-process and loss plots.")
    d.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: runs/demo, or runs/demo-2, ... when that exists)")
    d.add_argument("--train-seconds", type=float, default=None,
                   help="wall-clock budget for training (default: 150)")
    d.add_argument("--n", type=int, default=64, help="samples per sampler (default: 64)")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a diffusion model", description="Train a diffusion model. "
                       "A preset gives every setting; any flag overrides it.")
    _add_train_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample from a trained run",
                       description="Sample from a run with its own schedule and model.", epilog=samplers_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory (default: the run's latest intact one)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    _add_sampler_flags(s, default_sampler=SAMPLE_DEFAULT_SAMPLER)
    _add_class_flags(s)
    s.add_argument("--n", type=int, default=None, help="number of samples, of each class with --class (default: 64; "
                                                      "8 of each with several classes)")
    s.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    s.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: RUN_DIR/samples/<sampler settings>-seed<K>)")
    s.add_argument("--gif", default=None, metavar="PATH", help="also write a GIF of the chain for a few samples")
    s.add_argument("--device", default=None, help="device to sample on (default: cpu)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="measure a run: bits/dim (nll), FID (fid), Gamma_t of the analytic variance "
                                    "(variance), copying of training images (memorization)",
                       description="`eval nll RUN_DIR`: the variational bound (DDPM eq. 5) in bits/dim, term by "
                                   "term as in the official DDPM code. `eval fid RUN_DIR`: the Frechet distance of "
                                   "samples to a reference set, with Inception features or, offline for the "
                                   "digits, the features of a small digits classifier. `eval variance RUN_DIR`: "
                                   "Gamma_t = E||eps_theta(x_t, t)||^2 / d for every t on --n training images "
                                   "(default 256), stored in the run for --variance analytic (Analytic-DPM). "
                                   "`eval memorization RUN_DIR`: the distance of --n samples (default 500; "
                                   "--sampler, --steps, default DDIM 50) to their nearest training images, in "
                                   "pixels and features, against real images' own; writes eval/memorization.*",
                       epilog=samplers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("what", choices=["nll", "fid", "variance", "memorization"])
    e.add_argument("run_dir", metavar="RUN_DIR")
    e.add_argument("--n", type=int, default=None, help="images: nll 256, fid 50000 samples, memorization 500 "
                                                            "samples (default)")
    e.add_argument("--batch-size", type=int, default=None, help="images per batch (default: nll 16, fid 64)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    g = e.add_argument_group("nll")
    g.add_argument("--data", default=None, help="data source (default: the run's own)")
    g.add_argument("--split", default="test", help="train or test; digits and folders have only train "
                                                  "(default: test)")
    g.add_argument("--out", default=None, metavar="DIR", help="where the per-term CSV and plot go "
                                                             "(default: RUN_DIR/eval)")
    f = e.add_argument_group("fid")
    f.add_argument("--features", default="inception", choices=["inception", "digits"],
                   help="Inception pool features, or the digits classifier's (default: inception)")
    f.add_argument("--reference", default=None, help="reference images: cifar10-train (default for inception), "
                                                     "cifar10-test, digits, or a data source")
    f.add_argument("--data-dir", default=None, metavar="DIR", help="folder with CIFAR-10 for the reference")
    f.add_argument("--inception", default=None, metavar="PATH",
                   help="inception-2015-12-05.pt (default: in the cache folder)")
    f.add_argument("--download", action="store_true", help="download the Inception network when it is absent")
    _add_sampler_flags(f, variance=False)
    f.add_argument("--protocol", default=None, choices=["ddpm-paper"],
                   help="ddpm-paper: exactly the DDPM paper's CIFAR-10 FID (1000 ancestral steps, large variance, "
                        "EMA, 50,000 samples against the CIFAR-10 train set, Inception features); the FID line "
                        "always names the protocol (default: custom, from the flags)")
    e.set_defaults(sampler=None)  # ddim unless --protocol says otherwise (_eval_fid)
    _add_class_flags(f, class_help="class-conditional runs. fid: the class of the samples, and of the reference "
                                   "images when they have labels: 7, 3,5,8 or all (default: every class in turn). "
                                   "nll: the label of every image, one class or none (the null class: the model as "
                                   "an unconditional one) (default: each image's true label)",
                     guidance_help="(default: fid and memorization {w:g} for a class-conditional run; nll 0, "
                                   "the conditional model's bound: w > 0 gives the bound of DDPM's guided ancestral "
                                   "chain)")
    e.add_argument("--variance", default=None, metavar="NAME",
                   help="small, large, learned (a --learn-sigma run) or analytic (after `eval variance`): the "
                        "bound's variance, or the sampler's for fid (default: the run's own, its `variance` setting)")
    e.set_defaults(func=cmd_eval)

    r = sub.add_parser("report", help="write one self-contained report.html of a run",
                       description="One HTML page of a run: a summary (samples, quality, training time, the commands "
                                   "that reproduce it), then samples, curves, evaluation, GIFs, figures and the "
                                   "configuration, every picture embedded, viewable offline.")
    r.add_argument("run_dir", metavar="RUN_DIR")
    r.add_argument("--out", default=None, metavar="FILE", help="output file (default: RUN_DIR/report.html)")
    r.set_defaults(func=cmd_report)

    pl = sub.add_parser("plot", help="draw the schedules, the forward process or a run's training curves",
                        description="Pictures: `plot schedule`, `plot forward`, `plot loss RUN_DIR`.")
    pl.add_argument("what", choices=["schedule", "forward", "loss"])
    pl.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR", help="the run (for `plot loss`)")
    pl.add_argument("--T", type=int, default=1000, help="diffusion steps (default: 1000)")
    pl.add_argument("--data", default="digits", help="images for `plot forward` (default: digits)")
    pl.add_argument("--data-dir", default=None, metavar="DIR", help="folder of CIFAR-10 for --data cifar10")
    pl.add_argument("--image", default=None, metavar="FILE", help="one image file for `plot forward`")
    pl.add_argument("--t", default=None, metavar="T,T,...", help="timesteps for `plot forward`")
    pl.add_argument("--out", default=None, metavar="FILE", help="output PNG")
    pl.set_defaults(func=cmd_plot)

    im = sub.add_parser("import-diffusers", help="turn a diffusers UNet2DModel (e.g. google/ddpm-cifar10-32) "
                                                 "into a ddpmkit run",
                        description="Read a diffusers UNet2DModel folder (config.json and safetensors or .bin "
                                    "weights, with scheduler_config.json beside it or in scheduler/) or a hub id, "
                                    "and write a ddpmkit run directory whose model gives the same outputs.")
    im.add_argument("source", metavar="SOURCE", help="a local diffusers model folder, or a hub id when the hub "
                                                     "can be reached")
    im.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run directory (must not exist or "
                                                                    "be empty)")
    im.set_defaults(func=cmd_import_diffusers)

    ex = sub.add_parser("export-diffusers", help="write a run as a diffusers pipeline folder",
                        description="Write a run's model and schedule as a diffusers pipeline folder "
                                    "(model_index.json, unet/, scheduler/): a DDPMPipeline, or for a "
                                    "class-conditional run a ClassConditionalDDPMPipeline in the folder's own "
                                    "pipeline.py, which takes class labels and a guidance weight. It prints the "
                                    "Python call that loads and runs the folder.")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--out", required=True, metavar="DIR", help="the new folder (must not exist or be empty)")
    ex.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                    help="export the EMA weights (default: on)")
    ex.set_defaults(func=cmd_export_diffusers)

    ip = sub.add_parser("inpaint", help="fill in the masked part of an image with a trained run (RePaint)",
                        description="RePaint (Lugmayr et al. 2022): at each reverse step the known pixels are "
                                    "re-noised from the image and the unknown ones come from the model; every "
                                    "--jump steps the chain goes back up and down again, --resample times. "
                                    "Writes each result as a PNG and one figure: original, masked, results.")
    _add_edit_inputs(ip)
    ip.add_argument("--mask", required=True, metavar="MASK",
                    help="a grayscale PNG, white where the image is known, or a shortcut naming the missing part: "
                         "bottom-half, top-half, left-half, right-half, center, random:P (a fraction P missing)")
    ip.add_argument("--jump", type=int, default=10, help="J: go back up J steps at a time (default: 10)")
    ip.add_argument("--resample", type=int, default=10, help="R: pass each stretch R times; 1 is no resampling "
                                                            "(default: 10)")
    ip.add_argument("--steps", type=int, default=None, help="timesteps of the respaced DDPM process, 1..T "
                                                            "(default: 250, the paper's, or T when smaller)")
    ip.add_argument("--timesteps", "--spacing", dest="spacing", default="uniform", metavar="NAME",
                    help="which timesteps (default: uniform)")
    ip.add_argument("--variance", default=None, metavar="NAME",
                    help="reverse-process variance: small or large (default: the run's own)")
    ip.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                    help="clip the predicted x0 to [-1, 1] (default: on)")
    ip.add_argument("--n", type=int, default=8, help="results per image (default: 8)")
    ip.set_defaults(func=cmd_inpaint)

    ed = sub.add_parser("edit", help="turn an image into a plausible one of the run's kind (SDEdit)",
                        description="SDEdit (Meng et al. 2022): noise the image to t0 = strength x T, then run any "
                                    "sampler from t0. Strength 0 returns the image, 1 is plain sampling. Writes "
                                    "each result as a PNG and one strip: the input, then each strength.",
                        epilog=samplers_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_edit_inputs(ed)
    ed.add_argument("--strength", default="0.5", metavar="S[,S...]",
                    help="how much to change, in [0, 1]; several, comma-separated, make the strip (default: 0.5)")
    _add_sampler_flags(ed)
    ed.add_argument("--n", type=int, default=4, help="results per image and strength (default: 4)")
    ed.set_defaults(func=cmd_edit)
    return p


def _add_edit_inputs(p) -> None:
    """RUN_DIR, --image and the flags inpaint and edit share."""
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--image", required=True, metavar="IMG",
                   help="an image file of the model's size and channels (grayscale or RGB), or digits:I[,J,...], "
                        "real digits by index")
    p.add_argument("--resize", action="store_true", help="resize an image or mask of another size to the model's")
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help="a checkpoint directory (default: the run's latest intact one)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights (default: on)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN_DIR/edits/<settings>)")
    p.add_argument("--device", default=None, help="device (default: cpu)")
    _add_class_flags(p, class_help="class-conditional runs: the class of every input image, by label or name (7), "
                                   "or none: the null class, the model as an unconditional one (default: the "
                                   "image's own label, digits:I of a digits run, else none)",
                     guidance_help="(default: {w:g} with a class, refused with none)")


# What to reduce when a command runs out of memory (CPU RAM or GPU memory).
_OOM_HINT = {
    "train": "reduce --batch-size, or keep it and split it with --grad-accum K; or use a smaller model "
             "(--base-channels, --channel-mults, --num-res-blocks, --attention-resolutions)",
    "demo": "reduce --n",
    "plot": "use a smaller --image or fewer --t",
}


def _is_out_of_memory(e: BaseException) -> bool:
    """A failed allocation: MemoryError (numpy), torch.OutOfMemoryError (a GPU), or the CPU allocator's
    RuntimeError ("DefaultCPUAllocator: can't allocate memory")."""
    import torch

    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _oom_detail(e: BaseException) -> str:
    import re

    m = re.search(r"allocate ([0-9]+) bytes", str(e))
    if m:
        return f"{int(m.group(1)) / 2**30:,.1f} GiB could not be allocated"
    m = re.search(r"allocate ([0-9.]+ [KMGT]i?B)", str(e))
    return f"{m.group(1)} could not be allocated" if m else type(e).__name__


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed as one line
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except DdpmkitError as e:
        print(f"ddpmkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"ddpmkit: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:  # out of memory: one line that says what to reduce
        if not _is_out_of_memory(e):
            raise
        hint = _OOM_HINT.get(args.command, "reduce --batch-size")
        print(f"ddpmkit: error: out of memory in `{args.command}` ({_oom_detail(e)}): {hint}", file=sys.stderr)
        return 1
    except OSError as e:  # a file system problem the modules did not anticipate: still one line
        print(f"ddpmkit: error: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
