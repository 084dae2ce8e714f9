"""What the summary of every kind of run shares (``summary.py`` for diffusion runs, ``summary_autoencoder.py`` for
autoencoder runs): the facts and settings rows the page shows, the data, how long it trained, the numbers of
metrics.csv, the trainer's grids, and the command that trains a run (or imports it) again.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DdpmkitError
from ..run import Run
from . import plots

__all__ = ["Fact", "Setting", "Summary", "NOT_RECORDED", "plural", "numbers", "data_fact", "metrics_of", "duration",
           "training", "figure", "last_measured", "frechet_shown", "feature_network", "trainer_grids",
           "train_again", "time_limit_note", "changed_first"]

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


# ---------------------------------------------------------------------------------------------- what
def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def numbers(v) -> str:
    """A scale or shift: one number, or one per channel."""
    if isinstance(v, (list, tuple)):
        return ", ".join(numbers(x) for x in v)
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def data_fact(config: dict) -> Fact:
    imported = config.get("imported_from")
    if isinstance(imported, dict):
        return Fact("data", "not recorded", f"imported from {imported.get('source')} ({imported.get('format')})")
    return Fact("data", str(config.get("train", {}).get("data", NOT_RECORDED)))


# ---------------------------------------------------------------------------------------------- how long
def metrics_of(run_dir: Path) -> tuple[dict | None, str]:
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


def training(run: Run, metrics: dict | None, why: str) -> list[Fact]:
    """The steps, the wall-clock time and the device of a run; ``why`` says why ``metrics`` is None."""
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


def last_measured(metrics: dict | None, column: str) -> int | None:
    """The row of the last finite value of metrics.csv's ``column``, or None where it has none."""
    values = metrics.get(column) if metrics is not None else None
    if values is None or not np.isfinite(values).any():
        return None
    return int(np.flatnonzero(np.isfinite(values))[-1])


def frechet_shown(metrics: dict, i: int) -> str:
    """metrics.csv's Frechet distance of row ``i``, with its jackknife standard error where it has one
    (metrics/quality.py)."""
    se = metrics.get("fd_stderr")
    shown = figure(float(metrics["fd"][i]))
    if se is not None and math.isfinite(float(se[i])):
        shown += f" \u00b1 {figure(float(se[i]))}"
    return shown


def feature_network(train: dict) -> str:
    """The features of a run's --eval-every Frechet distance (QualityProbe): the digits classifier's for the
    digits, else Inception's."""
    return "digits classifier" if str(train.get("data")).lower() == "digits" else "Inception"


# ---------------------------------------------------------------------------------------------- samples
def trainer_grids(run_dir: Path) -> list[Path]:
    """The trainer's sample grids (samples/grid_step_N.png), oldest first."""
    return sorted((run_dir / "samples").glob("grid_step_*.png")) if (run_dir / "samples").is_dir() else []


# ---------------------------------------------------------------------------------------------- commands
def train_again(run: Run, read_settings, command) -> Fact:
    """The command that gives the run again: an imported run's ``ddpmkit import-diffusers``, else ``command(cfg)``
    of its settings ``read_settings(config)`` (not recorded where this ddpmkit cannot read them)."""
    imported = run.config.get("imported_from")
    if isinstance(imported, dict):
        return Fact("import it again", f"ddpmkit import-diffusers {shlex.quote(str(imported.get('source')))} "
                                       f"--out {shlex.quote(str(run.dir))}")
    try:
        cfg = read_settings(run.config)
    except (DdpmkitError, TypeError) as e:
        return Fact("train it again", NOT_RECORDED, str(e))
    return command(cfg)


def time_limit_note(cfg) -> str:
    return "the steps a --time-limit allows depend on the machine" if cfg.time_limit else ""


# ---------------------------------------------------------------------------------------------- settings
def changed_first(stored: dict, changed: list[str], baseline) -> list[Setting]:
    """config.json's training settings ``stored``: those named in ``changed`` first (in that order), each with
    ``baseline(name)``, the value it differs from; then the rest by name."""
    first = [Setting(k, stored[k], baseline(k), True) for k in changed if k in stored]
    rest = [Setting(k, v) for k, v in sorted(stored.items()) if k not in changed]
    return first + rest
