"""What a person opens a run's report for, read from the run's own files: what was trained, for how long, how good
it is, one grid of samples, the commands that train it again and sample from it, and its settings with those that
differ from the preset's first.

Reading only; ``report.py`` writes the page. Each number says the file (and setting) it comes from; what a run
does not record is said to be "not recorded", never guessed.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DdpmkitError
from ..run import Run
from . import plots

__all__ = ["Fact", "Setting", "Summary", "summarize", "settings_rows", "NOT_RECORDED"]

NOT_RECORDED = "not recorded"


class Fact(NamedTuple):
    label: str
    value: str
    source: str = ""  # where the value comes from: a file, a setting, a paper


class Setting(NamedTuple):
    name: str
    value: object
    preset_value: object = None  # the preset's value, for a setting that differs from it
    changed: bool = False


@dataclass
class Summary:
    model: list[Fact]  # what was trained
    training: list[Fact]  # for how long
    quality: list[Fact]  # how good
    grid: Path | None  # one grid of samples
    grid_caption: str
    commands: list[Fact]  # (what it does, the command line, a note)


def summarize(run_dir, config: dict) -> Summary:
    """The summary of the run in ``run_dir`` whose config.json is ``config``."""
    run = Run(run_dir, config)
    metrics, why = _metrics(run.dir)
    grid, caption = summary_grid(run)
    return Summary(model=_model(run), training=_training(run, metrics, why), quality=_quality(run, metrics),
                   grid=grid, grid_caption=caption, commands=_commands(run))


# ---------------------------------------------------------------------------------------------- what
def space(config: dict) -> str:
    """Where the diffusion runs. Latent runs (DESIGN.md: data through a frozen autoencoder) will say "latent"."""
    return "pixel"


def _model(run: Run) -> list[Fact]:
    from ..limits import check_model_config

    config = run.config
    imported = config.get("imported_from")
    if isinstance(imported, dict):
        data = Fact("data", "not recorded", f"imported from {imported.get('source')} ({imported.get('format')})")
    else:
        data = Fact("data", str(config.get("train", {}).get("data", NOT_RECORDED)))
    c, h, w = run.image_shape
    params = check_model_config(config.get("model"), "config.json")  # the U-Net built on the meta device
    if run.class_cond:
        cond = Fact("conditioning", f"class-conditional, {len(run.class_names)} classes",
                    f"null label {run.null_class} for guidance" if run.null_class is not None else "no null class")
    else:
        cond = Fact("conditioning", "unconditional")
    return [data, Fact("image", f"{h}x{w}, {c} channel{'s' if c > 1 else ''}", "config.json model"),
            Fact("parameters", f"{params:,}", "U-Net of config.json"), cond,
            Fact("space", space(config), "diffusion on the images themselves")]


# ---------------------------------------------------------------------------------------------- how long
def _metrics(run_dir: Path) -> tuple[dict | None, str]:
    """metrics.csv's columns, or None and why not."""
    try:
        return plots.load_metrics(run_dir / "metrics.csv"), ""
    except plots.PlotError as e:
        return None, str(e)


def duration(seconds: float) -> str:
    """31 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _training(run: Run, metrics: dict | None, why: str) -> list[Fact]:
    train = run.config.get("train", {})
    machine = run.config.get("machine")
    device = train.get("device", "auto")
    if type(machine) is dict and machine.get("device"):  # written by the trainer (describe_machine)
        procs = machine.get("processes", 1)
        device = Fact("device", str(machine["device"]) + (f" x {procs}" if isinstance(procs, int) and procs > 1
                                                             else ""),
                      f"{machine.get('name', '')}; torch {machine.get('torch', '?')} (config.json machine)")
    else:
        device = (Fact("device", NOT_RECORDED, "--device auto: the run does not write down the device it picked")
                  if device == "auto" else Fact("device", str(device), "--device"))
    if metrics is None:
        return [Fact("steps", NOT_RECORDED, why), Fact("wall-clock", NOT_RECORDED, why), device]
    step = int(metrics["step"][-1])
    asked = [f"--steps {train['steps']:,}"] if isinstance(train.get("steps"), int) and step < train["steps"] else []
    asked += [f"--time-limit {train['time_limit']} s"] if train.get("time_limit") else []
    steps = Fact("steps", f"{step:,}", "last row of metrics.csv" + (f" ({', '.join(asked)})" if asked else ""))
    wall = metrics.get("wall_s")
    if wall is None or not math.isfinite(wall[-1]):
        clock = Fact("wall-clock", NOT_RECORDED, "metrics.csv has no wall_s")
    else:  # the trainer's wall_s: seconds since the run began, over resumes, the --eval-every measuring included
        clock = Fact("wall-clock", duration(float(wall[-1])), f"metrics.csv wall_s at step {step:,}")
    return [steps, clock, device]


# ---------------------------------------------------------------------------------------------- how good
def figure(x: float) -> str:
    """Three significant digits, no exponent: 379, 6.73, 0.0412."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:,.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def _quality(run: Run, metrics: dict | None) -> list[Fact]:
    return [frechet_fact(run, metrics), bpd_fact(run.dir), memorization_fact(run.dir)]


def frechet_fact(run: Run, metrics: dict | None) -> Fact:
    """The latest --eval-every Frechet distance in metrics.csv (metrics/quality.py)."""
    train = run.config.get("train", {})
    fd = metrics.get("fd") if metrics is not None else None
    if fd is None or not np.isfinite(fd).any():
        return Fact("Frechet distance", NOT_RECORDED, "train with --eval-every N to measure it as the run goes")
    i = int(np.flatnonzero(np.isfinite(fd))[-1])
    features = "digits classifier" if str(train.get("data")).lower() == "digits" else "Inception"  # QualityProbe
    n = train.get("eval_n")
    how = (f"{n} samples (--eval-n), " if n else "") + f"{train.get('eval_sampler')} {train.get('eval_steps')} steps"
    se = metrics.get("fd_stderr")
    shown = figure(float(fd[i]))
    if se is not None and math.isfinite(float(se[i])):  # the jackknife standard error (metrics/quality.py)
        shown += f" \u00b1 {figure(float(se[i]))}"
    return Fact("Frechet distance", shown,
                f"metrics.csv fd at step {int(metrics['step'][i]):,}: {how}, {features} features; lower is better")


def bpd_fact(run_dir: Path) -> Fact:
    """The variational bound of ``ddpmkit eval nll``: eval/nll_terms.json (the bound, its standard error, the
    images and the conditioning), else the sum of the T+1 terms of eval/nll_terms.csv."""
    notes = run_dir / "eval" / "nll_terms.json"
    try:
        d = json.loads(notes.read_text()) if notes.is_file() else None
        if d is not None:
            cond = f", conditioned on {d['conditioning']}" if d.get("conditioning") else ""
            return Fact("bits/dim", f"{float(d['bpd']):.3f} \u00b1 {float(d['bpd_stderr']):.3f}",
                        f"upper bound, DDPM eq. 5: {d['n']} images of {d['source']} ({d['split']}){cond}, "
                        f"variance {d['variance']}; eval/nll_terms.json")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact("bits/dim", "unreadable", f"{notes}: {e}")
    path = run_dir / "eval" / "nll_terms.csv"
    if not path.is_file():
        return Fact("bits/dim", "not measured", f"ddpmkit eval nll {run_dir}")
    try:
        with open(path, newline="") as f:
            bits = [float(row["bits"]) for row in csv.DictReader(f)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact("bits/dim", "unreadable", f"{path}: {e}")
    # DDPM eq. 5: L = L_T + sum_{t>1} L_{t-1} + L_0; the file's rows are the mean bits/dim of each term
    return Fact("bits/dim", f"{sum(bits):.3f}", "upper bound, DDPM eq. 5: the sum of eval/nll_terms.csv")


def memorization_fact(run_dir: Path) -> Fact:
    """The verdict of ``ddpmkit eval memorization`` (eval/memorization.json, pixel distances)."""
    path = run_dir / "eval" / "memorization.json"
    label = "memorisation check"
    if not path.is_file():
        return Fact(label, "not run", f"ddpmkit eval memorization {run_dir}")
    try:
        px = json.loads(path.read_text())["pixels"]
        near, real, n = float(px["near_copies"]), float(px["real_near_copies"]), int(px["n"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact(label, "unreadable", f"{path}: {e}")
    # metrics/memorization.py: no more near copies than real images have, up to the sampling error of n samples
    # (two binomial standard errors of the real images' rate)
    allowed = real + 2 * math.sqrt(real * (1 - real) / max(n, 1))
    verdict = "passed" if near <= allowed else "failed"
    return Fact(label, verdict, f"{100 * near:.1f}% of {n} samples are near copies of training images (real "
                                f"images: {100 * real:.1f}%); eval/memorization.json")


# ---------------------------------------------------------------------------------------------- samples
def trainer_grids(run_dir: Path) -> list[Path]:
    """The trainer's sample grids (samples/grid_step_N.png), oldest first."""
    return sorted((run_dir / "samples").glob("grid_step_*.png")) if (run_dir / "samples").is_dir() else []


def sample_grids(run_dir: Path) -> list[Path]:
    """The grids of ``ddpmkit sample`` and the demo (samples*/**/grid.png)."""
    return sorted(run_dir.glob("samples*/**/grid.png"))


def summary_grid(run: Run) -> tuple[Path | None, str]:
    """The grid the summary shows: the trainer's latest (the model at its last sampled step), else the newest
    grid of ``ddpmkit sample``."""
    rows = ", one row per class" if run.class_cond else ""
    grids = trainer_grids(run.dir)
    if grids:
        train = run.config.get("train", {})
        step = int(grids[-1].stem.rsplit("_", 1)[-1])
        how = f"{train.get('sample_sampler', '?')}, {train.get('sample_steps', '?')} steps"
        if run.class_cond:
            from ..diffusion.denoiser import DEFAULT_GUIDANCE  # the trainer guides its grid with it

            how += f", guidance {DEFAULT_GUIDANCE:g}"
        return grids[-1], f"EMA samples at step {step:,} ({how}){rows}; samples/{grids[-1].name}"
    grids = sample_grids(run.dir)
    if grids:
        newest = max(grids, key=lambda p: p.stat().st_mtime)
        return newest, f"samples{rows}; {newest.relative_to(run.dir)}"
    return None, "no samples yet: ddpmkit sample " + str(run.dir)


# ---------------------------------------------------------------------------------------------- commands
def _commands(run: Run) -> list[Fact]:
    out = shlex.quote(str(run.dir))
    sample = Fact("sample from it", f"ddpmkit sample {out}",
                  "every class in turn, one row each; --class C for one" if run.class_cond else "")
    imported = run.config.get("imported_from")
    if isinstance(imported, dict):
        return [Fact("import it again", f"ddpmkit import-diffusers {shlex.quote(str(imported.get('source')))} "
                                        f"--out {out}"), sample]
    from ..train.config import PRESETS, TrainConfig, train_arguments

    try:
        cfg = TrainConfig.from_json(run.config)
    except (DdpmkitError, TypeError) as e:
        return [Fact("train it again", NOT_RECORDED, str(e)), sample]
    if cfg.preset not in PRESETS:
        return [Fact("train it again", NOT_RECORDED, f"preset {cfg.preset!r} is unknown to this ddpmkit"), sample]
    args = train_arguments(cfg)
    note = "the steps a --time-limit allows depend on the machine" if cfg.time_limit else ""
    return [Fact("train it again", "ddpmkit train " + shlex.join(args[:2] + ["--out", str(run.dir)] + args[2:]),
                 note), sample]


# ---------------------------------------------------------------------------------------------- settings
def settings_rows(config: dict) -> list[Setting]:
    """config.json's training settings: those that differ from the preset's first (in declaration order), then
    the rest by name. A run without a ``train`` section (an imported one) has none."""
    from ..train.config import PRESETS, TrainConfig, changed_settings, preset_value

    stored = config.get("train")
    if not isinstance(stored, dict):
        return []
    changed: list[str] = []
    try:
        cfg = TrainConfig.from_json(config)
        if cfg.preset in PRESETS:
            changed = changed_settings(cfg)
    except (DdpmkitError, TypeError):
        pass  # settings this ddpmkit cannot read: shown as stored, none marked
    first = [Setting(k, stored[k], preset_value(cfg.preset, k), True) for k in changed if k in stored]
    rest = [Setting(k, v) for k, v in sorted(stored.items()) if k not in changed]
    return first + rest
