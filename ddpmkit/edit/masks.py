"""The inputs of editing: images and masks, from files, from a data set, or from a shortcut.

A mask is a bool tensor [1, 1, H, W] (one per image, shared by the channels), True where the pixel is known. Mask
files are white where known: grayscale (mode ``L`` or ``1``), a pixel of 128 or more is known. The shortcuts name
the part that is *missing*:

- ``bottom-half``, ``top-half``, ``left-half``, ``right-half``: that half is unknown;
- ``center``: the central square of half the side is unknown;
- ``random:P``: a random fraction P of the pixels (0 < P < 1) is unknown, drawn from ``seed``.

Images are files (grayscale ``L`` for a 1-channel model, ``RGB`` for a 3-channel one) or ``digits:I[,J,...]``, real
digits by their index in the data set, at the model's size. A file of another size is refused unless ``resize`` is
set; another channel count or mode is always refused, with the conversion that would fix it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DdpmkitError
from ..images import from_uint8

__all__ = ["EditError", "MASK_SHORTCUTS", "make_mask", "load_mask", "parse_mask", "check_mask", "load_images",
           "masked_view"]

MASK_SHORTCUTS = ("bottom-half", "top-half", "left-half", "right-half", "center", "random:P")


class EditError(DdpmkitError, ValueError):
    """An image, a mask or a setting of an edit that cannot be used; the CLI prints it as one line."""


# ---------------------------------------------------------------------------------------------- masks
def make_mask(spec: str, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The bool mask [1, 1, H, W] of a shortcut (True = known); EditError on an unknown name."""
    H, W = (int(s) for s in size)
    known = torch.ones(1, 1, H, W, dtype=torch.bool)
    if spec == "bottom-half":
        known[..., H // 2:, :] = False
    elif spec == "top-half":
        known[..., :H - H // 2, :] = False
    elif spec == "left-half":
        known[..., :, :W - W // 2] = False
    elif spec == "right-half":
        known[..., :, W // 2:] = False
    elif spec == "center":
        h, w = max(1, H // 2), max(1, W // 2)
        y, x = (H - h) // 2, (W - w) // 2
        known[..., y:y + h, x:x + w] = False
    elif spec.startswith("random:"):
        try:
            p = float(spec[len("random:"):])
        except ValueError:
            p = float("nan")
        if not 0 < p < 1:
            raise EditError(f"--mask {spec}: the fraction of unknown pixels must lie strictly between 0 and 1")
        g = torch.Generator().manual_seed(int(seed))
        hidden = torch.randperm(H * W, generator=g)[:round(p * H * W)]
        known.view(-1)[hidden] = False
    else:
        raise EditError(f"unknown mask {spec!r}: give a PNG (white where known) or one of "
                        f"{', '.join(MASK_SHORTCUTS)}")
    return known


def load_mask(path, size: tuple[int, int], *, resize: bool = False) -> torch.Tensor:
    """A mask file (grayscale, white where known) as bool [1, 1, H, W]; EditError on another mode or size."""
    from PIL import Image

    path = Path(path)
    im = _open(path, "mask")
    with im:
        if im.mode not in ("L", "1"):
            raise EditError(f"mask {path}: mode {im.mode}, expected a grayscale PNG (mode L or 1), white where "
                            f"known (convert it with PIL's .convert('L'))")
        im = im.convert("L")
        if im.size != (size[1], size[0]):
            if not resize:
                raise EditError(f"mask {path}: {im.size[0]}x{im.size[1]} pixels, the model's images are "
                                f"{size[1]}x{size[0]} (pass --resize to resize it)")
            im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
        a = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(a >= 128).view(1, 1, *a.shape)


def parse_mask(spec: str, size: tuple[int, int], *, seed: int = 0, resize: bool = False) -> torch.Tensor:
    """A shortcut or the path of a mask file -> bool [1, 1, H, W], checked to have a known pixel."""
    if spec in MASK_SHORTCUTS[:-1] or spec.startswith("random:"):
        mask = make_mask(spec, size, seed)
    elif Path(spec).is_file():
        mask = load_mask(spec, size, resize=resize)
    else:
        raise EditError(f"--mask {spec}: no such file, and not one of the shortcuts {', '.join(MASK_SHORTCUTS)}")
    return check_mask(mask, (1, *size), what=f"--mask {spec}")


def check_mask(mask: torch.Tensor, chw, what: str = "the mask") -> torch.Tensor:
    """``mask`` as bool, after checking that it broadcasts over images [B, *chw] and knows at least one pixel."""
    m = torch.as_tensor(mask)
    if m.dtype != torch.bool:
        if not torch.all((m == 0) | (m == 1)):
            raise EditError(f"{what}: a mask holds only 0/1 or True/False")
        m = m.to(torch.bool)
    C, H, W = (int(s) for s in chw)
    if m.dim() != 4 or m.shape[-2:] != (H, W) or m.shape[1] not in (1, C):
        raise EditError(f"{what}: shape {tuple(m.shape)} does not fit images of shape [B, {C}, {H}, {W}]")
    if not bool(m.any()):
        raise EditError(f"{what}: no pixel is known (white in the file); there is nothing to inpaint from")
    return m


def masked_view(image: torch.Tensor, mask: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """The image with its unknown pixels set to ``fill`` (mid-gray by default), to show what the model saw."""
    return torch.where(mask.to(torch.bool).expand_as(image), image, torch.full_like(image, fill))


# ---------------------------------------------------------------------------------------------- images
def _open(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise EditError(f"{what} {path}: no such file")
    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError) as e:
        raise EditError(f"{what} {path}: not an image PIL can read ({e})") from None


def load_images(spec: str, chw, *, resize: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """``(images, labels, names)``: float [N, C, H, W] in [-1, 1] from a file or ``digits:I[,J,...]``.

    ``labels`` is the data set's labels for ``digits:``, None for a file; ``names`` says where each image came from.
    """
    C, H, W = (int(s) for s in chw)
    if spec.startswith("digits:"):
        return _dataset_images(spec, C, H, W)
    from PIL import Image

    path = Path(spec)
    im = _open(path, "image")
    with im:
        want = "L" if C == 1 else "RGB"
        if im.mode != want:
            raise EditError(f"image {path}: mode {im.mode}, the model makes {C}-channel images: give a "
                            f"{'grayscale (mode L)' if C == 1 else 'RGB'} image (PIL's .convert({want!r}))")
        if im.size != (W, H):
            if not resize:
                raise EditError(f"image {path}: {im.size[0]}x{im.size[1]} pixels, the model's images are "
                                f"{W}x{H} (pass --resize to resize it)")
            im = im.resize((W, H), Image.Resampling.BICUBIC)
        a = np.asarray(im, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return from_uint8(torch.from_numpy(a.copy())).unsqueeze(0), None, [str(path)]


def _dataset_images(spec: str, C: int, H: int, W: int):
    from ..data import load_dataset

    body = spec[len("digits:"):]
    try:
        idx = [int(s) for s in body.split(",")]
    except ValueError:
        raise EditError(f"--image {spec}: expected digits:INDEX or digits:I,J,... with integer indices") from None
    if H != W:
        raise EditError(f"--image {spec}: the model's images are {W}x{H}, the digits are square")
    ds = load_dataset("digits", image_size=H, channels=C, progress=False)
    bad = [i for i in idx if not 0 <= i < ds.num_images]
    if bad:
        raise EditError(f"--image {spec}: index {bad[0]} outside the {ds.num_images} digits (0..{ds.num_images - 1})")
    sel = torch.tensor(idx)
    return from_uint8(ds.images[sel]), ds.labels[sel].clone(), [f"digits:{i}" for i in idx]

