"""The choice of a data source by name (``load_dataset``): one uint8 tensor [N, C, H, W] and its labels, if any.

Sources, chosen by a string, one module each (``digits``, ``cifar10``, ``folder``; what they share is ``common``):

* ``digits``  - the 1,797 8x8 handwritten digits shipped with scikit-learn (offline), upsampled to
  ``image_size`` (default 16) with an antialiased bicubic filter; 1 channel (3 = the gray replicated).
  Labels 0..9, class names "0".."9".
* ``cifar10`` - the official python-pickle distribution, read from ``DATA_DIR/cifar-10-batches-py/``
  or straight out of ``DATA_DIR/cifar-10-python.tar.gz``, through an unpickler that can build numpy
  arrays and nothing else. ``image_size`` other than 32 resizes (antialiased bicubic). Labels 0..9,
  class names ``CIFAR10_CLASSES`` (airplane .. truck).
* ``folder:PATH`` or the path of a directory - every png/jpg/jpeg/webp/bmp file below it, resized on
  the shorter side and center-cropped to a square, decoded in parallel and cached on disk as
  safetensors (never a pickle). Labelled by class subfolder (see ``folder_classes``), else unlabelled.

Downloads and the default cache folder are ``ddpmkit.files``'s; batches are served by ``data.batcher``.
"""

from __future__ import annotations

import os
from pathlib import Path


from .. import files
from ..errors import DataError
from ..limits import check_int
from .cifar10 import CIFAR10_CLASSES, CIFAR10_MD5, CIFAR10_URL, load_cifar10
from .common import _resize_uint8, _rgb_to_gray  # noqa: F401  (metrics.quality's grey and resize import them here)
from .common import DataWarning, ImageData, available_memory_bytes
from .digits import DIGITS_CLASSES, load_digits
from .folder import IMAGE_EXTENSIONS, folder_classes, load_folder

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DIGITS_CLASSES",
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataWarning",
    "ImageData",
    "available_memory_bytes",
    "folder_classes",
    "load_dataset",
    "parse_source",
]


SOURCES = "digits, cifar10, folder:PATH (or the path of an existing directory of images)"
_DEFAULTS = {"digits": (16, 1), "cifar10": (32, 3), "folder": (64, 3)}  # (image_size, channels)


def load_dataset(
    source: str = "digits",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    data_dir=None,
    download: bool = False,
    split: str = "train",
    strict: bool = False,
    cache_dir=None,
    progress: bool = True,
) -> ImageData:
    """Load a dataset named by ``source`` into one uint8 tensor. Any problem a user can cause is a DataError.

    ``data_dir`` is where CIFAR-10 lives (default ``<cache dir>/data``); ``cache_dir`` is where decoded
    folders are cached (default ``files.cache_dir()``: ``$DDPMKIT_CACHE`` or ``~/.cache/ddpmkit``).
    ``strict`` makes an unreadable image in a folder an error instead of a skipped file.
    """
    kind, path = parse_source(source)
    default_size, default_channels = _DEFAULTS[kind]
    image_size = _check_int("image_size", default_size if image_size is None else image_size, 1, 4096)
    channels = _check_int("channels", default_channels if channels is None else channels, 1, 3)
    if channels == 2:
        raise DataError("channels must be 1 or 3, got 2")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if kind == "digits":
        if split != "train":
            raise DataError("the digits source has one split, 'train' (all 1,797 images)")
        return load_digits(image_size, channels)
    if kind == "cifar10":
        root = Path(data_dir).expanduser() if data_dir is not None else files.cache_dir() / "data"
        return load_cifar10(root, split, image_size, channels, download, progress)
    if split != "train":
        raise DataError(f"a folder has one split, 'train'; got split={split!r} for {path}")
    return load_folder(path, image_size, channels, strict=strict, cache_dir=cache_dir, progress=progress)


def parse_source(source) -> tuple[str, Path | None]:
    """``source`` -> ("digits" | "cifar10" | "folder", the folder's path or None); a DataError if unknown."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"no data source given; choose one of: {SOURCES}")
    s = str(source).strip()
    low = s.lower()
    if low == "digits":
        return "digits", None
    if low in ("cifar10", "cifar-10"):
        return "cifar10", None
    if low.startswith("folder:"):
        rest = s[len("folder:"):].strip()
        if not rest:
            raise DataError("folder: needs a path, as in folder:/data/my-images")
        return "folder", Path(rest).expanduser()
    p = Path(s).expanduser()
    if p.is_dir():
        return "folder", p
    if p.exists():
        raise DataError(f"not a directory: {p} (a folder source must be a directory of images)")
    if isinstance(source, os.PathLike) or "/" in s or os.sep in s or s.startswith((".", "~")):
        raise DataError(f"no such directory: {p}")
    raise DataError(f"unknown data source {s!r}; choose one of: {SOURCES}")


def _check_int(name: str, value, lo: int, hi: int) -> int:
    return check_int(name, value, lo, hi, DataError)  # the one integer check (ddpmkit.limits), as a DataError
