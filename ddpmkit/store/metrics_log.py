"""A run's ``metrics.csv``: the writer the training loop appends to and the reader the plots and the report use."""

from __future__ import annotations

import bisect
import csv
import math
from pathlib import Path

import numpy as np

from ..errors import DdpmkitError
from ..files import ErrorClass, atomic_write_text

__all__ = ["NUM_BUCKETS", "MetricsLog", "MetricsFileError", "load_metrics"]

NUM_BUCKETS = 10  # metrics.csv reports the loss in T/10 timestep buckets


class MetricsFileError(DdpmkitError, ValueError):
    """A metrics.csv is missing, empty, or not a table of numbers with ``step`` and ``loss``."""


class MetricsLog:
    """metrics.csv of a run, appended row by row; a resume first drops the rows past the checkpoint."""

    # the loop's columns; then the task's own (the diffusion task's: the loss in ten timestep buckets); then
    # --eval-every's Frechet distance and its standard error, on its steps' rows
    LOOP_COLUMNS = ["step", "loss", "lr", "grad_norm", "img_per_s", "wall_s"]
    QUALITY_COLUMNS = ["fd", "fd_stderr"]

    def __init__(self, path: Path, resume_step: int | None = None, task_columns=()):
        self.path = path
        columns = self.LOOP_COLUMNS + list(task_columns) + self.QUALITY_COLUMNS
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if r and _int_or(r[0], -1) <= resume_step] if rows else []
            if keep:
                atomic_write_text(path, "".join(",".join(r) + "\n" for r in keep))
        if not path.exists():
            atomic_write_text(path, ",".join(columns) + "\n")
        with open(path, newline="") as f:  # a run started by an older version keeps its file's columns
            self.columns = next(csv.reader(f), None) or columns

    def append(self, row: dict) -> None:
        line = ",".join(_fmt(row.get(c)) for c in self.columns) + "\n"
        with open(self.path, "a") as f:
            f.write(line)


def _int_or(s, default):
    try:
        return int(s)
    except ValueError:
        return default


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def load_metrics(metrics_csv, *, error: ErrorClass = MetricsFileError) -> dict[str, np.ndarray]:
    """Read the trainer's ``metrics.csv`` into float64 columns sorted by step.

    Needs columns ``step`` and ``loss``; every other column is read too (blank cells become NaN). If the
    step goes backwards (a resumed run re-logging steps), the earlier rows from that step on are dropped,
    so each step keeps its latest value. Raises ``error`` for a missing, empty or unreadable file.
    """
    p = Path(metrics_csv)
    if not p.is_file():
        raise error(f"metrics file not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise error(f"metrics file is empty: {p} (has training logged a step yet?)")
            names = [h.strip() for h in header]
            missing = [k for k in ("step", "loss") if k not in names]
            if missing:
                raise error(f"{p}: missing column(s) {', '.join(missing)}; found {', '.join(names)}")
            rows: list[list[float]] = []
            steps: list[float] = []
            si = names.index("step")
            for lineno, rec in enumerate(reader, start=2):
                if not rec or not any(v.strip() for v in rec):
                    continue
                vals = []
                for k in range(len(names)):
                    v = rec[k].strip() if k < len(rec) else ""
                    try:
                        vals.append(float(v) if v else math.nan)
                    except ValueError:
                        raise error(f"{p}, line {lineno}: {names[k]} = {v!r} is not a number") from None
                s = vals[si]
                if not math.isfinite(s):
                    raise error(f"{p}, line {lineno}: step is missing")
                if steps and s <= steps[-1]:
                    cut = bisect.bisect_left(steps, s)
                    del steps[cut:], rows[cut:]
                steps.append(s)
                rows.append(vals)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise error(f"cannot read metrics file {p}: {e}") from e
    if not rows:
        raise error(f"metrics file has no rows: {p} (has training logged a step yet?)")
    data = np.asarray(rows, dtype=np.float64)
    return {name: data[:, k] for k, name in enumerate(names)}
