"""Images to PNG files without matplotlib: grids, labelled grids, one file per sample, and the helpers they share.

Images come in as the library's float tensors in [-1, 1] (or as uint8 tensors / arrays), shape
[N, C, H, W] with C = 1 (grayscale) or 3 (RGB). Grayscale stays grayscale in every file (PNG mode
``L``); RGB stays RGB. Every file is encoded in memory and written with ``files.atomic_write_bytes``:
a failure never leaves a half-written picture behind.

* :func:`make_grid`, :func:`save_grid`: samples tiled on a white border, upscaled nearest-neighbour.
* :func:`make_labelled_grid`, :func:`save_labelled_grid`: one row per label, the label left of its row.
* :func:`save_image`, :func:`save_images`: one PNG per sample at native resolution.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .. import files
from ..errors import DdpmkitError
from ..images import from_uint8, to_uint8
from ..limits import check_int

__all__ = [
    "PlotError",
    "MIN_TILE_PX",
    "default_scale",
    "make_grid",
    "save_grid",
    "make_labelled_grid",
    "save_labelled_grid",
    "save_image",
    "save_images",
]


class PlotError(DdpmkitError, ValueError):
    """A picture cannot be made from what was given (bad images, missing or empty metrics, bad path)."""


# ---------------------------------------------------------------------------------------------- tiles
#: Smallest side, in pixels, that a tile is upscaled to by default (16x16 -> x4, 32x32 -> x2).
MIN_TILE_PX = 64


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


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
    return check_int(name, v, lo, None, PlotError)  # the one integer check (ddpmkit.limits), as a PlotError


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
