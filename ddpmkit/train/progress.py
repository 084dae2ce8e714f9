"""What a training run shows and logs as it goes: the progress bar, and the window of steps behind each
metrics.csv row."""

from __future__ import annotations

import sys
import time

import torch

__all__ = ["ProgressBar", "MetricsWindow", "fd_text"]


def fd_text(r: dict) -> str:
    """A quality measurement for the progress bar: ``12.34+-0.56`` (a Frechet distance), or ``31.2dB`` (a PSNR
    alone)."""
    if r.get("fd") is None:
        return f"{r['psnr']:.1f}dB" if r.get("psnr") is not None else "-"
    se = r.get("fd_stderr")
    return f"{r['fd']:.2f}" + ("" if se is None else f"+-{se:.2f}")


class ProgressBar:
    """A bar of steps; or, for a time-limited run, of seconds with the step beside it."""

    def __init__(self, cfg, step: int, quiet: bool):
        from tqdm import tqdm

        # A time-limited run (the demo: 150 s, steps 1,000,000) shows its progress in seconds, the step beside it;
        # a bar of steps would read 0/1000000 with an ETA of a day.
        self.time_limit = cfg.time_limit
        if self.time_limit is not None:
            self.bar = tqdm(total=float(self.time_limit), disable=quiet, unit="s", dynamic_ncols=True,
                            file=sys.stderr, desc=f"step {step}",
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                       "[{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=cfg.steps, initial=step, disable=quiet, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.05)

    def advance(self, step: int, elapsed: float) -> None:
        """One step done, ``elapsed`` seconds into this session."""
        if self.time_limit is not None:
            self.bar.set_description_str(f"step {step}", refresh=False)
            self.bar.update(min(elapsed, self.time_limit) - self.bar.n)
        else:
            self.bar.update(1)

    def show(self, **values) -> None:
        self.bar.set_postfix(**values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class MetricsWindow:
    """The steps since the last metrics.csv row: their summed loss, their throughput, the task's own columns."""

    def __init__(self, batch_size: int, device, meter=None):
        self.batch_size, self.meter = batch_size, meter
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, result) -> None:
        """An applied step's :class:`ddpmkit.train.loop.StepResult`."""
        self.loss += result.losses.sum()
        if self.meter is not None:
            self.meter.add(result.losses, result.info, result.scalars)
        self.steps += 1

    def row(self, step: int, lr: float, grad_norm: torch.Tensor, wall_s: float) -> dict:
        """The metrics.csv row of the window, ending at ``step``; then a new window starts."""
        elapsed = time.perf_counter() - self.t0
        mean_loss = (self.loss / (self.steps * self.batch_size)).item()
        img_s = self.steps * self.batch_size / max(elapsed, 1e-9)
        row = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(), "img_per_s": img_s,
               "wall_s": wall_s}
        if self.meter is not None:
            row.update(self.meter.row())
        self.loss.zero_()
        self.steps, self.t0 = 0, time.perf_counter()
        return row
