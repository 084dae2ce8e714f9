"""The reverse process as an animation: record a thinned chain while sampling, write it as a looping GIF.

* :class:`ChainRecorder`: a sampler callback that keeps a few samples' x_t and predicted x_0 at evenly
  spaced steps, as CPU uint8.
* :func:`save_chain_gif`: each recorded frame drawn as x_t above x0_hat, with t, the step and a progress
  bar, written atomically as one GIF (``ddpmkit.files``).

Images follow ``grids``: float [-1, 1] or uint8, [N, C, H, W], C = 1 or 3; grayscale stays grayscale.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from .grids import (PlotError, _as_uint8_nhwc, _check_int, _font, _text_size, _to_pil, _upscale, _write_file,
                    default_scale)

__all__ = ["ChainFrame", "ChainRecorder", "save_chain_gif"]


class ChainFrame(NamedTuple):
    """One recorded moment of sampling: CPU uint8 images [n, H, W, C]; ``x0_hat`` may be None."""

    step: int  # 0-based index in the sampler loop; -1 for the starting noise
    t: int | None  # the model timestep at that step (None if unknown)
    x_t: np.ndarray
    x0_hat: np.ndarray | None


class ChainRecorder:
    """Records a thinned trajectory of a sampler for :func:`save_chain_gif`.

    Call it from the sampler loop as ``recorder(i, t, x_t, x0_hat)``, where ``i`` is the 0-based step
    index, ``t`` the timestep (tensor [B] or int), ``x_t`` the sample after step ``i`` and ``x0_hat`` the
    prediction of x_0 at step ``i``. Only the first ``num_samples`` images are kept, as CPU uint8, and only
    at the step indices in :attr:`steps`:

    * if ``total_steps <= num_frames``: every step ``0 .. total_steps - 1``;
    * else ``round_half_up(k * (total_steps - 1) / (num_frames - 1))`` for k = 0 .. num_frames - 1, i.e.
      ``num_frames`` distinct indices evenly spaced from 0 to the last step (with ``num_frames = 1``: the
      last step only).

    The last step is always recorded. :meth:`initial` adds the starting noise x_T as a first frame.

    ``decode``, when given, turns what the sampler holds into images before they are kept: a latent run's decoder,
    so that the GIF shows decoded x_t and decoded x0 predictions.
    """

    def __init__(self, total_steps: int, num_samples: int = 8, num_frames: int = 40, decode=None):
        self.decode = decode
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.num_samples = _check_int("num_samples", num_samples, 1)
        self.num_frames = _check_int("num_frames", num_frames, 1)
        S, F = self.total_steps, self.num_frames
        if S <= F:
            steps = list(range(S))
        elif F == 1:
            steps = [S - 1]
        else:
            # round half up in exact integer arithmetic; spacing > 1 so the indices are distinct
            steps = [(2 * k * (S - 1) + (F - 1)) // (2 * (F - 1)) for k in range(F)]
        self.steps: tuple[int, ...] = tuple(steps)
        self._wanted = frozenset(steps)
        self.frames: list[ChainFrame] = []

    def _keep(self, x) -> np.ndarray | None:
        if x is None:
            return None
        x = x[: self.num_samples]  # slice first: only these leave the device (and are decoded)
        return _as_uint8_nhwc(x if self.decode is None else self.decode(x))

    def initial(self, x_T) -> None:
        """Record the starting noise x_T as the first frame (x0 prediction left empty)."""
        self.frames = [f for f in self.frames if f.step != -1]
        self.frames.insert(0, ChainFrame(-1, None, self._keep(x_T), None))

    def __call__(self, i, t, x_t, x0_hat=None) -> None:
        i = int(i)
        if i not in self._wanted or (self.frames and self.frames[-1].step == i):
            return
        if isinstance(t, torch.Tensor):
            t = int(t.reshape(-1)[0]) if t.numel() else None
        elif t is not None:
            t = int(t)
        self.frames.append(ChainFrame(i, t, self._keep(x_t), self._keep(x0_hat)))

    @property
    def recorded_steps(self) -> list[int]:
        """The step indices recorded so far (-1 for the initial noise)."""
        return [f.step for f in self.frames]

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        return (f"ChainRecorder(total_steps={self.total_steps}, num_samples={self.num_samples}, "
                f"num_frames={self.num_frames}, recorded={len(self.frames)})")


def _render_chain_frames(recorder: ChainRecorder, scale: int | None) -> list[Image.Image]:
    frames = recorder.frames
    n = max(f.x_t.shape[0] for f in frames)
    _, h, w, c = frames[-1].x_t.shape
    s = default_scale(h, w) if scale is None else _check_int("scale", scale, 1)
    th, tw = h * s, w * s
    pad = 2
    mode = "L" if c == 1 else "RGB"
    white = 255 if c == 1 else (255, 255, 255)
    black = 0 if c == 1 else (0, 0, 0)
    empty = 235 if c == 1 else (235, 235, 235)
    bar = 90 if c == 1 else (31, 119, 180)
    bar_bg = 220 if c == 1 else (220, 220, 220)

    font = _font(max(11, min(16, th // 4)))
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    labels = ("x_t", "x0 pred")
    label_w = max(_text_size(probe, t, font)[0] for t in labels) + 12
    text_h = _text_size(probe, "t = 0123456789 step/", font)[1]
    header_h = text_h + 14  # text, then a 3-px progress bar
    width = label_w + n * (tw + pad) + pad
    height = header_h + 2 * (th + pad) + pad
    total = recorder.total_steps

    out = []
    for fr in frames:
        if fr.x_t.shape[1:3] != (h, w):
            raise PlotError("chain frames differ in image size")
        img = Image.new(mode, (width, height), white)
        draw = ImageDraw.Draw(img)
        if fr.step < 0:
            head, done = "x_T ~ N(0, I)   start", 0.0
        else:
            tt = f"t = {fr.t}   " if fr.t is not None else ""
            head, done = f"{tt}step {fr.step + 1}/{total}", (fr.step + 1) / total
        x_text = label_w + pad
        draw.text((x_text, 3), head, fill=black, font=font)
        bar_y = header_h - 6
        draw.rectangle((x_text, bar_y, width - pad - 1, bar_y + 2), fill=bar_bg)
        bar_end = x_text + round(done * (width - pad - 1 - x_text))
        if bar_end > x_text:
            draw.rectangle((x_text, bar_y, bar_end, bar_y + 2), fill=bar)
        for r, (label, row) in enumerate(zip(labels, (fr.x_t, fr.x0_hat))):
            y = header_h + pad + r * (th + pad)
            lw, lh = _text_size(draw, label, font)
            draw.text((label_w - 8 - lw, y + (th - lh) // 2), label, fill=black, font=font)
            for k in range(n):
                x = label_w + pad + k * (tw + pad)
                if row is None or k >= row.shape[0]:
                    draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=empty)
                else:
                    img.paste(_to_pil(_upscale(row[k], s)), (x, y))
        out.append(img)
    return out


def save_chain_gif(recorder: ChainRecorder, path, hold_frames: int = 10, frame_ms: int = 80,
                   scale: int | None = None) -> int:
    """Write the recorded chain as a looping animated GIF; returns the number of frames in the file.

    Each frame shows, for every recorded sample, x_t (top row) above the predicted x_0 (bottom row),
    upscaled nearest-neighbour (default :func:`default_scale`), with the current t, the step and a
    progress bar on top. Every frame lasts ``frame_ms``; the final frame is held for ``hold_frames``
    extra frame times by giving it a longer duration (``frame_ms * (1 + hold_frames)``), not by
    repeating it, so the file has exactly one GIF frame per recorded frame.

    Frame count rule: the return value is the number of recorded frames, except that consecutive
    frames that would be pixel-identical are merged into one (their durations summed), as a GIF
    writer would do anyway; with the t / step header every recorded frame differs, so in practice it
    is ``len(recorder.frames)``. The total play time of one loop is always
    ``frame_ms * (len(recorder.frames) + hold_frames)``.
    """
    if not isinstance(recorder, ChainRecorder):
        raise PlotError(f"save_chain_gif takes a ChainRecorder, got {type(recorder).__name__}")
    if not recorder.frames:
        raise PlotError("the chain recorder holds no frames: was it passed to the sampler?")
    hold_frames = _check_int("hold_frames", hold_frames, 0)
    frame_ms = _check_int("frame_ms", frame_ms, 10)
    images = _render_chain_frames(recorder, scale)

    if images[0].mode == "RGB":
        # One shared palette for every frame (no flicker between frames), from a sample of the frames.
        pick = images if len(images) <= 16 else [images[round(j)] for j in np.linspace(0, len(images) - 1, 16)]
        montage = Image.new("RGB", (pick[0].width, pick[0].height * len(pick)))
        for j, im in enumerate(pick):
            montage.paste(im, (0, j * pick[0].height))
        palette = montage.quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        images = [im.quantize(palette=palette) for im in images]

    # Merge consecutive identical frames ourselves, so the count we return is the count in the file.
    frames: list[Image.Image] = []
    durations: list[int] = []
    last_bytes = None
    for im in images:
        b = im.convert("RGB").tobytes()
        if b == last_bytes:
            durations[-1] += frame_ms
            continue
        frames.append(im)
        durations.append(frame_ms)
        last_bytes = b
    durations[-1] += hold_frames * frame_ms

    def write(f):
        frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], duration=durations,
                       loop=0, disposal=1)

    _write_file(path, write)
    return len(frames)


