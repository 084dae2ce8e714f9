"""The matplotlib figures of ddpmkit, in one consistent look (grids and PNGs of samples are ``grids``'s).

* :func:`plot_schedule`: linear vs cosine schedule (beta, alpha_bar, sqrt(alpha_bar), log-SNR).
* :func:`plot_forward`: images noised in closed form at several t, one row per schedule.
* :func:`plot_loss`: the trainer's ``metrics.csv`` as loss / learning rate / throughput curves.
* :func:`plot_bpd_terms`: the variational bound's bits per dimension at each t.
* :func:`plot_nearest_pairs`: the memorisation check's samples above their nearest training images.

Figures are drawn with matplotlib's object API (``Figure`` + the Agg canvas), never pyplot, so nothing
here touches global backend state. Every file is written atomically through ``grids._write_file``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..diffusion.schedule import NoiseSchedule
from ..store import metrics_log
from .grids import PlotError, _as_float, _as_uint8_nhwc, _check_int, _write_file

__all__ = [
    "STYLE",
    "COLORS",
    "plot_schedule",
    "plot_forward",
    "load_metrics",
    "ema_smooth",
    "plot_loss",
    "plot_bpd_terms",
    "plot_nearest_pairs",
]


# ---------------------------------------------------------------------------------------------- style
#: Fixed colours: a schedule or a quantity has the same colour in every figure.
COLORS = {
    "linear": "#1f77b4",  # blue
    "cosine": "#d95f02",  # orange
    "loss": "#1f77b4",
    "grad_norm": "#7570b3",
    "lr": "#1b9e77",
    "throughput": "#e7298a",
    "fd": "#d95f02",  # the Frechet distance of --eval-every
    # an autoencoder run's parts of the loss and its held-out PSNR
    "rec": "#1b9e77",
    "kl": "#7570b3",
    "g_loss": "#e7298a",
    "d_loss": "#66a61e",
    "psnr": "#a6761d",
}
RAW_ALPHA = 0.3  # the unsmoothed curve, drawn light under its EMA
BUCKET_CMAP = "viridis"  # timestep buckets: small t dark, large t light

DPI = 120

#: The one matplotlib style of every figure (applied with ``rc_context``, never globally).
STYLE = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "figure.titlesize": 12,
    "figure.titleweight": "bold",
    "axes.grid": True,
    "axes.grid.which": "major",
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.6,
}


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Figure, path) -> Path:
    return _write_file(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


# ---------------------------------------------------------------------------------------------- schedules
def plot_schedule(path, T: int = 1000) -> Path:
    """The linear and cosine schedules side by side: beta_t, alpha_bar_t, sqrt(alpha_bar_t), log-SNR vs t.

    Both schedules are drawn on each of the 4 panels, each in its fixed colour (``COLORS``).
    """
    T = _check_int("T", T, 2)
    scheds = {"linear": NoiseSchedule.linear(T), "cosine": NoiseSchedule.cosine(T)}
    t = np.arange(T)
    panels = [
        (r"$\beta_t$  (log scale)", lambda s: s.betas, True),
        (r"$\bar\alpha_t$: signal variance kept", lambda s: s.alpha_bar, False),
        (r"$\sqrt{\bar\alpha_t}$: weight of $x_0$ in $x_t$", lambda s: s.sqrt_alpha_bar, False),
        (r"log-SNR $= \log\,\bar\alpha_t/(1-\bar\alpha_t)$", lambda s: s.log_snr(), False),
    ]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((9.0, 6.4))
        axes = fig.subplots(2, 2, sharex=True)
        for ax, (title, get, logy) in zip(axes.flat, panels):
            for name, s in scheds.items():
                ax.plot(t, get(s).double().numpy(), color=COLORS[name], label=name)
            ax.set_title(title)
            if logy:
                ax.set_yscale("log")
            ax.set_xlim(0, T - 1)
            ax.margins(x=0)
        axes[1, 1].axhline(0.0, color="0.4", lw=0.8, ls="--")
        # The cosine log-SNR plunges at the very last step (alpha_bar -> 0); keep the informative range.
        # (At small T the linear schedule itself reaches alpha_bar = 0, so only finite values count.)
        snr = scheds["linear"].log_snr().double()
        snr = snr[torch.isfinite(snr)]
        if snr.numel():
            axes[1, 1].set_ylim(float(snr.min()) - 2.5, None)
        for ax in axes[1]:
            ax.set_xlabel("timestep t")
        axes[0, 0].legend(loc="upper left")
        fig.suptitle(f"Noise schedules, T = {T}: cosine destroys information more gently")
        return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- forward process
def plot_forward(images, path, ts: Sequence[int] = (0, 50, 100, 200, 300, 500, 700, 999), T: int = 1000,
                 seed: int = 0) -> Path:
    """The forward process: each image noised in closed form at each t, one row per schedule.

    x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4), t 0-indexed, so the column
    ``t = 0`` is one step of noise (std 0.01 for the linear schedule): visually the clean image. One eps
    per image (from ``seed``) is shared by every t and both schedules, so the two rows of an image differ
    only by the schedule. For several images, each image gets a (linear, cosine) row pair.
    Column headers give t; under each tile is alpha_bar_t.
    """
    x0 = _as_float(images)
    T = _check_int("T", T, 2)
    ts = [int(v) for v in ts]
    if not ts:
        raise PlotError("plot_forward needs at least one timestep")
    bad = [v for v in ts if not 0 <= v < T]
    if bad:
        raise PlotError(f"timesteps must lie in 0..{T - 1} (0-indexed), got {bad}")
    n, c = x0.shape[0], x0.shape[1]
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(x0.shape, generator=g)
    scheds = {"linear": NoiseSchedule.linear(T), "cosine": NoiseSchedule.cosine(T)}

    cell = 1.15
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((max(6.0, 0.9 + cell * len(ts)), 0.5 + 1.32 * cell * 2 * n))
        axes = fig.subplots(2 * n, len(ts), squeeze=False)
        for i in range(n):
            for r, (name, s) in enumerate(scheds.items()):
                row = 2 * i + r
                for j, t in enumerate(ts):
                    # DDPM eq. 4: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)
                    xt = s.sqrt_alpha_bar[t] * x0[i] + s.sqrt_one_minus_alpha_bar[t] * eps[i]
                    u = _as_uint8_nhwc(xt)[0]
                    ax = axes[row, j]
                    if c == 1:
                        ax.imshow(u[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                    else:
                        ax.imshow(u, interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.grid(False)
                    for sp in ax.spines.values():
                        sp.set_visible(True)
                        sp.set_color(COLORS[name])
                        sp.set_linewidth(1.2)
                    ab = float(s.alpha_bar[t])
                    ab_s = f"{ab:.3f}" if ab >= 1e-3 else f"{ab:.0e}"
                    ax.set_xlabel(rf"$\bar\alpha$={ab_s}", fontsize=8, labelpad=2)
                    if row == 0:
                        ax.set_title(f"t = {t}", fontsize=10)
                    if j == 0:
                        label = name if n == 1 else f"#{i}  {name}"
                        ax.set_ylabel(label, color=COLORS[name], fontsize=10, fontweight="bold")
        fig.suptitle(r"Forward process $q(x_t \mid x_0)$: the same noise, two schedules")
        return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- training curves
_BUCKET_RE = re.compile(r"^loss_t(\d+)$")


def load_metrics(metrics_csv) -> dict[str, np.ndarray]:
    """The trainer's ``metrics.csv`` as float64 columns sorted by step (``store.metrics_log``), or a PlotError."""
    return metrics_log.load_metrics(metrics_csv, error=PlotError)


def _auto_beta(n: int) -> float:
    """EMA factor giving a window of about n/80 rows (no smoothing for very short runs)."""
    w = min(max(n // 80, 1), 100)
    return 1.0 - 1.0 / w


def ema_smooth(values, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as in Adam); NaNs are skipped and keep the last value."""
    v = np.asarray(values, dtype=np.float64)
    out = np.full_like(v, np.nan)
    m, k = 0.0, 0
    for i, x in enumerate(v):
        if math.isfinite(x):
            m = beta * m + (1.0 - beta) * x
            k += 1
        if k:
            out[i] = m / (1.0 - beta ** k) if beta > 0 else m
    return out


def _has(data: dict, key: str) -> bool:
    return key in data and bool(np.isfinite(data[key]).any())


def _curve(ax, step, y, color, beta, label, logy):
    ok = np.isfinite(y)
    if logy:
        ok &= y > 0
    if not ok.any():
        _no_data(ax, f"{label}: no values logged")
        return
    if beta > 0 and ok.sum() > 2:
        ax.plot(step[ok], y[ok], color=color, alpha=RAW_ALPHA, lw=0.9, label=f"{label} (raw)")
        ax.plot(step[ok], ema_smooth(y[ok], beta), color=color, lw=1.8, label=f"{label} (EMA)")
    else:  # too few rows to smooth: the raw curve in full colour
        ax.plot(step[ok], y[ok], color=color, marker="o" if ok.sum() < 30 else None, ms=3, label=label)
    if logy:
        _log_y(ax)


def _fmt_step(v, _pos=None) -> str:
    v = float(v)
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def _step_axis(ax):
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5, integer=True))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_fmt_step))
    ax.set_xlabel("step")


def _log_y(ax):
    """Log y axis labelled with plain numbers (0.05, 0.1, 0.2) instead of powers of ten."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    # few decades: label 1-2-3-5 so the plateau of a loss curve has a label near it; many: 1-2-5
    subs = (1.0, 2.0, 3.0, 5.0) if hi / max(lo, 1e-300) < 100 else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _p: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=np.arange(1, 10)))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="minor", alpha=0.12)


def _no_data(ax, text: str):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.45")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for sp in ax.spines.values():
        sp.set_visible(False)


def plot_loss(metrics_csv, path, smoothing: float | None = None) -> Path:
    """Training curves from the trainer's ``metrics.csv``, against step.

    Panels: the loss (raw, light, and its bias-corrected EMA, log y); the gradient norm; the learning
    rate; images per second. If the file has per-timestep-bucket columns ``loss_t0`` .. ``loss_t{K-1}``
    (bucket k = t in [k T/K, (k+1) T/K)), two more: each bucket's smoothed loss over steps (coloured
    from small t, dark, to large t, light) and the latest smoothed loss per bucket as bars. An autoencoder
    run's file (a ``rec`` column) gets instead the loss's parts (L1 reconstruction and KL, log y; the
    adversarial losses, linear, on their own axis) and the held-out PSNR of --eval-every.

    ``smoothing`` is the EMA factor in [0, 1); default 1 - 1/w with a window w of about 1/80 of the rows.
    Raises :class:`PlotError` if the file is missing, empty, or lacks ``step``/``loss``.
    """
    data = load_metrics(metrics_csv)
    step = data["step"]
    n = len(step)
    if smoothing is None:
        beta = _auto_beta(n)
    else:
        beta = float(smoothing)
        if not 0 <= beta < 1:
            raise PlotError(f"smoothing must lie in [0, 1), got {smoothing!r}")
    buckets = sorted(((int(m.group(1)), k) for k in data if (m := _BUCKET_RE.match(k))), key=lambda x: x[0])
    buckets = [(b, k) for b, k in buckets if _has(data, k)]
    autoencoder = "rec" in data  # the autoencoder task's columns (train/tasks/autoencoder.py)

    with matplotlib.rc_context(STYLE):
        if autoencoder:
            fig = _new_figure((13.0, 6.4))
            axes = fig.subplots(2, 3)
            ax_loss, ax_parts, ax_psnr = axes[0]
            ax_gn, ax_lr, ax_ips = axes[1]
            buckets = []
        elif buckets:
            fig = _new_figure((13.0, 7.0))
            axes = fig.subplots(2, 3)
            ax_loss, ax_bl, ax_gn = axes[0]
            ax_lr, ax_ips, ax_bar = axes[1]
        else:
            fig = _new_figure((9.0, 6.4))
            axes = fig.subplots(2, 2)
            (ax_loss, ax_gn), (ax_lr, ax_ips) = axes
        _curve(ax_loss, step, data["loss"], COLORS["loss"], beta, "loss", True)
        ax_loss.set_title("training loss")
        ax_loss.legend(loc="upper right")
        if _has(data, "fd"):  # --eval-every: the sample quality over the steps, on its own axis
            ok = np.isfinite(data["fd"])
            fd = data["fd"][ok]
            ax_fd = ax_loss.twinx()
            ax_fd.plot(step[ok], fd, color=COLORS["fd"], marker="o", ms=3, label="Frechet distance"
                       + (" +- s.e." if _has(data, "fd_stderr") else ""))
            if _has(data, "fd_stderr"):  # its standard error (runs from before it was logged have none)
                se = np.nan_to_num(data["fd_stderr"][ok])
                # on the log axis a bar that would reach 0 stops at fd / 10
                ax_fd.errorbar(step[ok], fd, yerr=[np.minimum(se, 0.9 * fd), se], fmt="none", ecolor=COLORS["fd"],
                               elinewidth=1, capsize=2, alpha=0.6)
            ax_fd.set_yscale("log")
            ax_fd.set_ylabel("FD of reconstructions (log)" if autoencoder else "Frechet distance of samples (log)",
                             color=COLORS["fd"])
            ax_fd.grid(False)
            ax_fd.spines["right"].set_visible(True)
            ax_fd.legend(loc="lower left")
            last_se = data["fd_stderr"][ok][-1] if "fd_stderr" in data else math.nan
            ax_loss.set_title(("loss; reconstructions" if autoencoder else "training loss; sample quality")
                              + f" (last FD {fd[-1]:.3g}"
                              + (f" +- {last_se:.2g})" if math.isfinite(last_se) else ")"))
        if autoencoder:
            _autoencoder_panels(ax_parts, ax_psnr, step, data, beta)
        if _has(data, "grad_norm"):
            _curve(ax_gn, step, data["grad_norm"], COLORS["grad_norm"], beta, "grad norm", True)
        else:
            _no_data(ax_gn, "grad_norm not logged")
        ax_gn.set_title("gradient norm (before clipping)")
        if _has(data, "lr"):
            ok = np.isfinite(data["lr"])
            ax_lr.plot(step[ok], data["lr"][ok], color=COLORS["lr"])
            ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax_lr.set_ylim(bottom=0)
        else:
            _no_data(ax_lr, "lr not logged")
        ax_lr.set_title("learning rate")
        if _has(data, "img_per_s"):
            _curve(ax_ips, step, data["img_per_s"], COLORS["throughput"], beta, "img/s", False)
            ax_ips.set_ylim(bottom=0)
        else:
            _no_data(ax_ips, "img_per_s not logged")
        ax_ips.set_title("throughput (images / s)")
        for ax in (ax_loss, ax_gn, ax_lr, ax_ips):
            if ax.has_data():
                _step_axis(ax)

        if buckets:
            K = max(b for b, _ in buckets) + 1
            cmap = matplotlib.colormaps[BUCKET_CMAP]
            colors = {b: cmap(0.9 * b / max(K - 1, 1)) for b, _ in buckets}
            latest = []
            for b, k in buckets:
                y = data[k]
                ok = np.isfinite(y) & (y > 0)
                if not ok.any():
                    continue
                sm = ema_smooth(y[ok], beta)
                ax_bl.plot(step[ok], sm, color=colors[b], lw=1.4)
                latest.append((b, sm[-1]))
            _log_y(ax_bl)
            _step_axis(ax_bl)
            ax_bl.set_title("loss by timestep bucket (EMA)")
            norm = matplotlib.colors.BoundaryNorm(np.arange(K + 1), K)
            sm_map = matplotlib.cm.ScalarMappable(
                norm=norm, cmap=matplotlib.colors.ListedColormap([cmap(0.9 * b / max(K - 1, 1)) for b in range(K)]))
            cb = fig.colorbar(sm_map, ax=ax_bl, ticks=np.arange(K) + 0.5, fraction=0.06, pad=0.02)
            cb.ax.set_yticklabels([str(b) for b in range(K)])
            cb.set_label(f"bucket k: t in [kT/{K}, (k+1)T/{K})", fontsize=8)
            if latest:
                bs, vs = zip(*latest)
                ax_bar.bar(bs, vs, color=[colors[b] for b in bs], width=0.8)
                ax_bar.set_xticks(range(K))
                ax_bar.set_xlabel(f"timestep bucket k (t in [kT/{K}, (k+1)T/{K}))")
                ax_bar.set_ylabel("loss (EMA)")
                ax_bar.grid(False, axis="x")
            ax_bar.set_title(f"loss by timestep at step {int(step[-1])}")

        title = f"training: {int(step[-1])} steps"
        if _has(data, "wall_s"):
            wall = float(np.nanmax(data["wall_s"]))
            title += f" in {_fmt_duration(wall)}"
        fin = data["loss"][np.isfinite(data["loss"])]
        if fin.size:
            smoothed = beta > 0 and fin.size > 2
            title += f", final loss{' (EMA)' if smoothed else ''} {ema_smooth(fin, beta if smoothed else 0.0)[-1]:.4g}"
        fig.suptitle(title)
        return _save_figure(fig, path)


def _autoencoder_panels(ax_parts, ax_psnr, step, data, beta) -> None:
    """An autoencoder run's panels: the parts of its loss, and the held-out PSNR of --eval-every."""
    for key, label in (("rec", "reconstruction (L1)"), ("kl", "KL (unweighted)")):
        if _has(data, key):
            _curve(ax_parts, step, data[key], COLORS[key], beta, label, True)
    adversarial = [k for k in ("g_loss", "d_loss") if _has(data, k)]
    if adversarial:  # the generator's loss can be negative: a linear axis of its own
        ax_adv = ax_parts.twinx()
        for key in adversarial:
            ok = np.isfinite(data[key])
            ax_adv.plot(step[ok], ema_smooth(data[key][ok], beta) if ok.sum() > 2 else data[key][ok],
                        color=COLORS[key], lw=1.4, ls="--", label=f"{key} (adversarial)")
        ax_adv.set_ylabel("adversarial losses", color="0.35")
        ax_adv.grid(False)
        ax_adv.spines["right"].set_visible(True)
        ax_adv.legend(loc="lower left")
    if ax_parts.has_data():
        ax_parts.legend(loc="upper right")
        _step_axis(ax_parts)
    else:
        _no_data(ax_parts, "rec, kl not logged")
    ax_parts.set_title("the loss's parts" + ("" if adversarial else " (no discriminator)"))
    if _has(data, "psnr"):
        ok = np.isfinite(data["psnr"])
        ax_psnr.plot(step[ok], data["psnr"][ok], color=COLORS["psnr"], marker="o", ms=3)
        ax_psnr.set_ylabel("dB")
        _step_axis(ax_psnr)
        ax_psnr.set_title(f"held-out PSNR (last {data['psnr'][ok][-1]:.2f} dB)")
    else:
        _no_data(ax_psnr, "no PSNR: train with --eval-every N")
        ax_psnr.set_title("held-out PSNR")


def _fmt_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def plot_bpd_terms(terms, path, *, title: str | None = None) -> Path:
    """The bits per dimension that the variational bound spends at each t (L_0 at t = 0, the prior at t = T)."""
    y = np.asarray(terms, dtype=np.float64)
    if y.ndim != 1 or y.size < 2:
        raise PlotError("plot_bpd_terms needs the T + 1 terms of the bound")
    T = y.size - 1
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((7.0, 3.6))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(np.arange(T), np.clip(y[:T], 1e-6, None), color=COLORS["linear"], lw=1.4)
        ax.set_yscale("log")
        ax.set_xlabel("t")
        ax.set_ylabel("bits / dim")
        ax.set_title(title or f"variational bound by timestep: {y.sum():.3f} bits/dim in all\n"
                              f"L_0 (decoder) {y[0]:.3f}, prior L_T {y[T]:.2g}")
        return _save_figure(fig, path)


def plot_nearest_pairs(samples, nearest, distances, threshold: float | None, path) -> Path:
    """The memorisation check's figure: each sample (top row) above its nearest training image (bottom row), with
    their distance (RMS over pixels in [0, 1]); ``threshold`` is the near-copy distance, named in the title."""
    a, b = _as_uint8_nhwc(samples, "samples"), _as_uint8_nhwc(nearest, "nearest images")
    k = a.shape[0]
    if k < 1 or b.shape != a.shape or len(distances) != k:
        raise PlotError("plot_nearest_pairs needs as many samples, nearest images and distances, at least one")
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((1.3 * k + 0.6, 3.2))
        axes = np.atleast_2d(fig.subplots(2, k, squeeze=False))
        cmap = "gray" if a.shape[-1] == 1 else None
        for i in range(k):
            for row, img in ((0, a[i]), (1, b[i])):
                ax = axes[row, i]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap=cmap, vmin=0, vmax=255,
                          interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                ax.grid(False)
            axes[0, i].set_title(f"{float(distances[i]):.3f}", fontsize=9, fontweight="normal")
        axes[0, 0].set_ylabel("sample")
        axes[1, 0].set_ylabel("nearest\ntraining")
        sub = f" (near copy: below {threshold:.3f})" if threshold is not None else ""
        fig.suptitle(f"closest samples to the training set, RMS pixel distance{sub}", fontsize=10)
        return _save_figure(fig, path)
