"""Every still picture of ddpmkit, in one consistent look (the chain GIF is ``animation.py``'s).

Images come in as the library's float tensors in [-1, 1] (or as uint8 tensors / arrays), shape
[N, C, H, W] with C = 1 (grayscale) or 3 (RGB). Grayscale stays grayscale in every file (PNG mode
``L``, GIF grayscale palette); RGB stays RGB.

* :func:`make_grid`, :func:`save_grid`: samples tiled on a white border, upscaled nearest-neighbour.
* :func:`save_image`, :func:`save_images`: one PNG per sample at native resolution.
* :func:`plot_schedule`: linear vs cosine schedule (beta, alpha_bar, sqrt(alpha_bar), log-SNR).
* :func:`plot_forward`: images noised in closed form at several t, one row per schedule.
* :func:`plot_loss`: the trainer's ``metrics.csv`` as loss / learning rate / throughput curves.
* :func:`plot_bpd_terms`: the variational bound's bits per dimension at each t.

Figures are drawn with matplotlib's object API (``Figure`` + the Agg canvas), never pyplot, so nothing
here touches global backend state. Every file is encoded in memory and written with
``files.atomic_write_bytes``: a failure never leaves a half-written picture behind.
"""

from __future__ import annotations

import bisect
import csv
import io
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import matplotlib
import matplotlib.cm
import matplotlib.colors
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from .. import files
from ..diffusion.schedule import NoiseSchedule
from ..errors import DdpmkitError
from ..images import from_uint8, to_uint8

__all__ = [
    "PlotError",
    "STYLE",
    "COLORS",
    "MIN_TILE_PX",
    "default_scale",
    "make_grid",
    "save_grid",
    "save_image",
    "save_images",
    "plot_schedule",
    "plot_forward",
    "load_metrics",
    "ema_smooth",
    "plot_loss",
    "plot_bpd_terms",
]


class PlotError(DdpmkitError, ValueError):
    """A picture cannot be made from what was given (bad images, missing or empty metrics, bad path)."""


# ---------------------------------------------------------------------------------------------- style
#: Smallest side, in pixels, that a tile is upscaled to by default (16x16 -> x4, 32x32 -> x2).
MIN_TILE_PX = 64

#: Fixed colours: a schedule or a quantity has the same colour in every figure.
COLORS = {
    "linear": "#1f77b4",  # blue
    "cosine": "#d95f02",  # orange
    "loss": "#1f77b4",
    "grad_norm": "#7570b3",
    "lr": "#1b9e77",
    "throughput": "#e7298a",
    "fd": "#d95f02",  # the Frechet distance of --eval-every
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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def _new_figure(figsize) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# ---------------------------------------------------------------------------------------------- files
def _write_file(path, write: Callable) -> Path:
    """Call ``write(fileobj)`` on an in-memory buffer, then write the bytes to ``path`` in one atomic write."""
    path = Path(path)
    buf = io.BytesIO()
    write(buf)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PlotError(f"cannot write {path}: {files.reason(e)}") from e
    return files.atomic_write_bytes(path, buf.getbuffer(), error=PlotError)


def _save_figure(fig: Figure, path) -> Path:
    return _write_file(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _save_pil(img: Image.Image, path, **kw) -> Path:
    return _write_file(path, lambda f: img.save(f, format="PNG", **kw))


# ---------------------------------------------------------------------------------------------- images
def _as_uint8_nhwc(images, what: str = "images") -> np.ndarray:
    """Float [-1,1] or uint8, [N,C,H,W] or [C,H,W] (tensor, array or list) -> uint8 array [N,H,W,C]."""
    x = images
    if isinstance(x, (list, tuple)):
        if not x:
            raise PlotError(f"{what}: empty list")
        x = torch.stack([torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in x])
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise PlotError(f"{what}: expected a tensor or array, got {type(images).__name__}")
    x = x.detach()
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise PlotError(f"{what}: expected shape [N, C, H, W] with C = 1 or 3, got {list(x.shape)}")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise PlotError(f"{what}: empty batch, shape {list(x.shape)}")
    x = x.cpu()
    if x.dtype == torch.uint8:
        u = x
    elif x.is_floating_point():
        # A diverged sample (NaN) shows as mid-gray instead of an undefined cast.
        u = to_uint8(torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0))
    else:
        raise PlotError(f"{what}: expected float in [-1, 1] or uint8, got dtype {x.dtype}")
    return u.permute(0, 2, 3, 1).contiguous().numpy()


def _as_float(images, what: str = "images") -> torch.Tensor:
    """Images as float32 [N,C,H,W] in [-1, 1] (uint8 is rescaled, floats are clamped)."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.detach().cpu().float()
        if x.ndim == 3 and x.shape[0] in (1, 3):
            x = x.unsqueeze(0)
        _as_uint8_nhwc(x[:1] if x.ndim == 4 else x, what)  # the shape checks and their messages
        return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    u = _as_uint8_nhwc(images, what)
    return from_uint8(torch.from_numpy(u).permute(0, 3, 1, 2))


def _to_pil(arr_hwc: np.ndarray) -> Image.Image:
    if arr_hwc.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(arr_hwc[:, :, 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(arr_hwc), mode="RGB")


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise PlotError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def default_scale(h: int, w: int) -> int:
    """The integer upscale that makes a tile at least ``MIN_TILE_PX`` on its longer side (>= 1).

    16x16 -> 4, 28x28 -> 3, 32x32 -> 2, 64x64 and larger -> 1.
    """
    return max(1, math.ceil(MIN_TILE_PX / max(h, w, 1)))


def _upscale(arr: np.ndarray, s: int) -> np.ndarray:
    """Nearest-neighbour integer upscale of [..., H, W, C]."""
    if s == 1:
        return arr
    return arr.repeat(s, axis=-3).repeat(s, axis=-2)


def make_grid(images, nrow: int | None = None, padding: int = 2, pad_value: int = 255,
              scale: int | None = None) -> np.ndarray:
    """Tile images into one uint8 picture of shape [H, W, C] (C = 1 or 3, as the input).

    Args:
        images: float [-1, 1] or uint8, [N, C, H, W] (or one [C, H, W]).
        nrow: images per row (as in torchvision); default ``ceil(sqrt(N))``. Rows = ceil(N / nrow).
        padding: border in output pixels between tiles and around the grid (not scaled).
        pad_value: gray level 0..255 of the border (white by default); unused tiles have it too.
        scale: integer nearest-neighbour upscale of each tile; default :func:`default_scale`.

    The size is exact: with ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)``,
    height = rows * (H*scale + padding) + padding and width = cols * (W*scale + padding) + padding.
    Image k lies at row ``k // cols``, column ``k % cols``.
    """
    arr = _as_uint8_nhwc(images)
    n, h, w, c = arr.shape
    cols = math.ceil(math.sqrt(n)) if nrow is None else _check_int("nrow", nrow, 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    padding = _check_int("padding", padding, 0)
    s = default_scale(h, w) if scale is None else _check_int("scale", scale, 1)
    if not 0 <= int(pad_value) <= 255:
        raise PlotError(f"pad_value must lie in 0..255, got {pad_value!r}")
    th, tw = h * s, w * s
    out = np.full((rows * (th + padding) + padding, cols * (tw + padding) + padding, c),
                  int(pad_value), dtype=np.uint8)
    tiles = _upscale(arr, s)
    for k in range(n):
        y = padding + (k // cols) * (th + padding)
        x = padding + (k % cols) * (tw + padding)
        out[y:y + th, x:x + tw] = tiles[k]
    return out


def save_grid(images, path, **kw) -> Path:
    """Write :func:`make_grid` (same keyword arguments) as a PNG at ``path``; returns the path."""
    return _save_pil(_to_pil(make_grid(images, **kw)), path)


def make_labelled_grid(images, row_labels: Sequence[str], padding: int = 2, scale: int | None = None) -> np.ndarray:
    """A grid with one row per label and the label written left of its row: uint8 [H, W, C].

    ``images`` [R * K, C, H, W] (float [-1, 1] or uint8) hold the R rows one after the other, K images each; the
    tiles are those of :func:`make_grid` with ``nrow=K``, and a white column on the left carries the labels.
    """
    arr = _as_uint8_nhwc(images)
    rows = len(row_labels)
    if rows < 1 or arr.shape[0] % rows:
        raise PlotError(f"{arr.shape[0]} images do not split into {rows} equal rows")
    grid = make_grid(images, nrow=arr.shape[0] // rows, padding=padding, scale=scale)
    _, h, w, c = arr.shape
    th = (grid.shape[0] - padding) // rows - padding  # the scaled tile height
    mode = "L" if c == 1 else "RGB"
    font = _font(max(10, min(16, th // 2)))
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    label_w = max(_text_size(probe, str(t), font)[0] for t in row_labels) + 10
    img = Image.new(mode, (label_w + grid.shape[1], grid.shape[0]), 255 if c == 1 else (255, 255, 255))
    img.paste(_to_pil(grid), (label_w, 0))
    draw = ImageDraw.Draw(img)
    for r, label in enumerate(row_labels):
        lw, lh = _text_size(draw, str(label), font)
        y = padding + r * (th + padding) + (th - lh) // 2
        draw.text((label_w - 6 - lw, y), str(label), fill=0 if c == 1 else (0, 0, 0), font=font)
    out = np.asarray(img)
    return out[..., None] if out.ndim == 2 else out


def save_labelled_grid(images, row_labels: Sequence[str], path, **kw) -> Path:
    """Write :func:`make_labelled_grid` as a PNG at ``path``; returns the path."""
    return _save_pil(_to_pil(make_labelled_grid(images, row_labels, **kw)), path)


def save_image(image, path) -> Path:
    """Write one image [C, H, W] (or [1, C, H, W]) as a PNG at native resolution; returns the path."""
    arr = _as_uint8_nhwc(image, "image")
    if arr.shape[0] != 1:
        raise PlotError(f"save_image takes one image, got a batch of {arr.shape[0]}; use save_images")
    return _save_pil(_to_pil(arr[0]), path)


def save_images(images, directory, prefix: str = "sample", start: int = 0) -> list[Path]:
    """Write each image as ``{prefix}_{start + k:05d}.png`` in ``directory`` (native resolution).

    Returns the paths in order. Each file is written atomically; existing files of the same name are replaced.
    """
    arr = _as_uint8_nhwc(images)
    start = _check_int("start", start, 0)
    directory = Path(directory)
    return [_save_pil(_to_pil(a), directory / f"{prefix}_{start + k:05d}.png") for k, a in enumerate(arr)]


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
    """Read the trainer's ``metrics.csv`` into float64 columns sorted by step.

    Needs columns ``step`` and ``loss``; every other column is read too (blank cells become NaN). If the
    step goes backwards (a resumed run re-logging steps), the earlier rows from that step on are dropped,
    so each step keeps its latest value. Raises :class:`PlotError` for a missing, empty or unreadable file.
    """
    p = Path(metrics_csv)
    if not p.is_file():
        raise PlotError(f"metrics file not found: {p}")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise PlotError(f"metrics file is empty: {p} (has training logged a step yet?)")
            names = [h.strip() for h in header]
            missing = [k for k in ("step", "loss") if k not in names]
            if missing:
                raise PlotError(f"{p}: missing column(s) {', '.join(missing)}; found {', '.join(names)}")
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
                        raise PlotError(f"{p}, line {lineno}: {names[k]} = {v!r} is not a number") from None
                s = vals[si]
                if not math.isfinite(s):
                    raise PlotError(f"{p}, line {lineno}: step is missing")
                if steps and s <= steps[-1]:
                    cut = bisect.bisect_left(steps, s)
                    del steps[cut:], rows[cut:]
                steps.append(s)
                rows.append(vals)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PlotError(f"cannot read metrics file {p}: {e}") from e
    if not rows:
        raise PlotError(f"metrics file has no rows: {p} (has training logged a step yet?)")
    data = np.asarray(rows, dtype=np.float64)
    return {name: data[:, k] for k, name in enumerate(names)}


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
    from small t, dark, to large t, light) and the latest smoothed loss per bucket as bars.

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

    with matplotlib.rc_context(STYLE):
        if buckets:
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
            ax_fd.set_ylabel("Frechet distance of samples (log)", color=COLORS["fd"])
            ax_fd.grid(False)
            ax_fd.spines["right"].set_visible(True)
            ax_fd.legend(loc="lower left")
            last_se = data["fd_stderr"][ok][-1] if "fd_stderr" in data else math.nan
            ax_loss.set_title(f"training loss; sample quality (last FD {fd[-1]:.3g}"
                              + (f" +- {last_se:.2g})" if math.isfinite(last_se) else ")"))
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
