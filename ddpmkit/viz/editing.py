"""The pictures of editing: the inpainting figure (rows of original, masked, results) and the SDEdit strip (an input
and its edits over strengths). Both are tables of tiles with labels above the columns, in the look of the chain GIF
(upscaled nearest-neighbour, white padding), written atomically like every figure."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from .grids import (PlotError, _as_uint8_nhwc, _check_int, _font, _save_pil, _text_size, _to_pil, _upscale,
                    default_scale)

__all__ = ["save_table", "save_inpaint_figure", "save_sdedit_strip"]

_PAD = 2
_GAP = 8  # extra white space between the input columns and the results


def save_table(columns: Sequence, labels: Sequence[str], path, *, gap_after: int | None = None,
               scale: int | None = None):
    """Write a table of images: ``columns[j]`` is float [-1, 1] or uint8 [N, C, H, W] (every column the same N, C, H,
    W), drawn top to bottom under ``labels[j]``; a wider gap follows column ``gap_after``. Returns the path."""
    if not columns or len(columns) != len(labels):
        raise PlotError(f"a table needs one label per column, got {len(columns)} columns and {len(labels)} labels")
    cols = [_as_uint8_nhwc(c, f"column {labels[j]!r}") for j, c in enumerate(columns)]
    n, h, w, c = cols[0].shape
    for j, a in enumerate(cols):
        if a.shape != cols[0].shape:
            raise PlotError(f"column {labels[j]!r} has shape {a.shape}, the first {cols[0].shape}")
    s = default_scale(h, w) if scale is None else _check_int("scale", scale, 1)
    th, tw = h * s, w * s
    mode = "L" if c == 1 else "RGB"
    white, black = (255, 0) if c == 1 else ((255, 255, 255), (0, 0, 0))
    font = _font(max(10, min(14, tw // 5)))
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    text_h = max(_text_size(probe, str(t) or "x", font)[1] for t in labels)
    header = text_h + 8
    xs, x = [], _PAD
    for j in range(len(cols)):
        xs.append(x)
        x += tw + _PAD + (_GAP if gap_after is not None and j == gap_after else 0)
    img = Image.new(mode, (x, header + n * (th + _PAD) + _PAD), white)
    draw = ImageDraw.Draw(img)
    for j, (a, label) in enumerate(zip(cols, labels)):
        lw, _ = _text_size(draw, str(label), font)
        draw.text((xs[j] + max(0, (tw - lw) // 2), 3), str(label), fill=black, font=font)
        for i in range(n):
            img.paste(_to_pil(_upscale(a[i], s)), (xs[j], header + _PAD + i * (th + _PAD)))
    return _save_pil(img, path)


def save_inpaint_figure(originals, masked, results, path, **kw):
    """One row per input: the original, the masked input (unknown pixels gray), then its K inpaintings.

    ``originals`` and ``masked`` are [N, C, H, W], ``results`` [N, K, C, H, W] (or a list of K tensors [N, C, H, W]).
    """
    res = list(results.unbind(1)) if hasattr(results, "unbind") and results.dim() == 5 else list(results)
    labels = ["original", "masked"] + [("inpainted" if k == 0 else "") for k in range(len(res))]
    return save_table([originals, masked, *res], labels, path, gap_after=1, **kw)


def save_sdedit_strip(inputs, edits, strengths, path, **kw):
    """The input, then its edit at each strength: ``edits[j]`` [N, C, H, W] at ``strengths[j]``; one row per sample."""
    if len(edits) != len(strengths):
        raise PlotError(f"{len(edits)} edits for {len(strengths)} strengths")
    labels = ["input"] + [f"s={s:g}" for s in strengths]
    return save_table([inputs, *edits], labels, path, gap_after=0, **kw)
