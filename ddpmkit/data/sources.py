"""Data sources turned into one uint8 tensor [N, C, H, W] with their labels, when they have them.

Sources, chosen by a string (``load_dataset``):

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

import concurrent.futures
import hashlib
import io
import json
import os
import pickle
import posixpath
import tarfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import files
from ..errors import DataError, DdpmkitError

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

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR10_ROW = 3 * 32 * 32
# The label names of the official archive's batches.meta, in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DIGITS_CLASSES = tuple(str(d) for d in range(10))

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCES = "digits, cifar10, folder:PATH (or the path of an existing directory of images)"
_DEFAULTS = {"digits": (16, 1), "cifar10": (32, 3), "folder": (64, 3)}  # (image_size, channels)

# Bump when the decoding of folder images or the cache's contents change, so that old caches are not reused
# (the version is part of the cache key, hence of the file name). v2: labels and class names are stored.
_FOLDER_CACHE_VERSION = 2
# Refuse a dataset whose tensor would take more than this share of the memory now available.
_MEMORY_SHARE = 0.9


class DataWarning(UserWarning):
    """Something in the data was skipped or ignored (an unreadable image, a corrupt cache file)."""


@dataclass
class ImageData:
    """A whole dataset in memory: ``images`` uint8 [N, C, H, W] on the CPU, ``labels`` int64 [N] or None.

    ``skipped`` names the files of a folder that could not be read (and were left out). ``class_names``
    names label k as ``class_names[k]`` (None when there are no labels or no names).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    skipped: tuple[str, ...] = field(default=())
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {tuple(self.labels.shape)} labels for {self.images.shape[0]} images")
        if self.class_names is not None:
            self.class_names = tuple(str(c) for c in self.class_names)
            if self.labels is None:
                raise DataError(f"{self.name}: class names given without labels")
            k = len(self.class_names)
            if self.labels.numel() and not (0 <= int(self.labels.min()) and int(self.labels.max()) < k):
                raise DataError(f"{self.name}: labels must lie in 0..{k - 1} for {k} class names")

    @property
    def num_classes(self) -> int | None:
        """How many classes the labels index (``len(class_names)``); None without class names."""
        return None if self.class_names is None else len(self.class_names)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def __repr__(self) -> str:
        if self.labels is None:
            lab = "no labels"
        elif self.class_names is None:
            lab = "labels"
        else:
            lab = f"labels of {len(self.class_names)} classes"
        return (f"ImageData({self.name!r}, {self.num_images} images, {self.channels}x{self.image_size}"
                f"x{self.image_size}, {self.nbytes / 2**20:.1f} MiB, {lab})")


# --------------------------------------------------------------------------------------------------
# The entry point


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
        return _load_digits(image_size, channels)
    if kind == "cifar10":
        root = Path(data_dir).expanduser() if data_dir is not None else files.cache_dir() / "data"
        return _load_cifar10(root, split, image_size, channels, download, progress)
    if split != "train":
        raise DataError(f"a folder has one split, 'train'; got split={split!r} for {path}")
    return _load_folder(path, image_size, channels, strict=strict, cache_dir=cache_dir, progress=progress)


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


def _describe(e: BaseException) -> str:
    """An exception as one short line, for messages that must stay on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise DataError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------
# Memory


def available_memory_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, capped by a cgroup v2 limit. None if unknown."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's limit can be far below the machine's free memory
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            avail = min(avail, max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return avail


def _check_fits(nbytes: int, what: str) -> None:
    avail = available_memory_bytes()
    if avail is not None and nbytes > _MEMORY_SHARE * avail:
        raise DataError(
            f"{what} needs {nbytes / 2**30:.2f} GiB of memory as uint8 but only {avail / 2**30:.2f} GiB "
            f"is available; use a smaller image_size or fewer images"
        )


# --------------------------------------------------------------------------------------------------
# Resizing a uint8 tensor


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, size, size], bicubic with antialiasing (when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        y = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bicubic",
                          align_corners=False, antialias=True)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> uint8 [N, 1, H, W] with the ITU-R 601-2 luma weights (as PIL's 'L')."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.uint8)
    for i in range(0, x.shape[0], 4096):
        out[i:i + 4096] = (x[i:i + 4096].float() * w).sum(1, keepdim=True).round_().clamp_(0, 255)
    return out


# --------------------------------------------------------------------------------------------------
# digits


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as (float [1797, 8, 8] in 0..16, int64 [1797]).

    Importing scikit-learn takes seconds, so first read the very file ``load_digits`` reads
    (``sklearn/datasets/data/digits.csv.gz``) without importing the package; fall back to
    ``sklearn.datasets.load_digits`` if that file is not where this expects it or looks wrong.
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("sklearn")
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
        a = np.loadtxt(path, delimiter=",")
        if a.shape == (1797, 65) and a.min() >= 0 and a[:, :64].max() <= 16 and a[:, 64].max() <= 9:
            return a[:, :64].reshape(-1, 8, 8), a[:, 64].astype(np.int64)
    except Exception:  # any surprise: take the slow, official route
        pass
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def _load_digits(image_size: int, channels: int) -> ImageData:
    images, target = _digits_arrays()
    x = torch.from_numpy(images * (255.0 / 16.0)).round().clamp(0, 255)  # 0..16 -> 0..255
    x = x.to(torch.uint8).unsqueeze(1)  # [1797, 1, 8, 8]
    x = _resize_uint8(x, image_size)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return ImageData(x.contiguous(), torch.from_numpy(target).clone(), "digits", class_names=DIGITS_CLASSES)


# --------------------------------------------------------------------------------------------------
# CIFAR-10


class _RefusedGlobal(Exception):
    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


def _numpy_globals() -> dict[tuple[str, str], object]:
    # The one function numpy pickles arrays through, however this numpy version names its module.
    reconstruct = np.zeros(1, np.uint8).__reduce__()[0]
    return {
        ("numpy.core.multiarray", "_reconstruct"): reconstruct,  # numpy < 2 (and the official files)
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,  # numpy >= 2
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, bytes, ints and numpy arrays; refuses every other global, so no code runs."""

    _allowed = _numpy_globals()

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _RefusedGlobal(module, name)
        return obj

    def persistent_load(self, pid):
        raise _RefusedGlobal("<persistent id>", repr(pid)[:40])


def _read_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one batch safely and check it: uint8 data [n, 3072] and n labels in 0..9."""
    try:
        d = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise DataError(
            f"{where}: refused to load: the file asks to import {e.module}.{e.name}, which a CIFAR-10 "
            f"batch never needs (only numpy arrays); it is not a genuine CIFAR-10 file"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # truncated or garbled pickles raise many kinds of errors
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({_describe(e)})") from None
    if not isinstance(d, dict):
        raise DataError(f"{where}: not a CIFAR-10 batch (a {type(d).__name__}, not a dict)")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        keys = sorted(repr(k) for k in d)
        raise DataError(f"{where}: not a CIFAR-10 batch (keys {', '.join(keys)}; needs b'data' and b'labels')")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR10_ROW:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: b'data' must be uint8 [n, 3072], got {desc}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise DataError(f"{where}: b'labels' is not a list of integers") from None
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: {labels.size} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{where}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    return data, labels


def _find_cifar10(root: Path, names: list[str], download: bool, progress: bool) -> Path:
    """The unpacked directory if it holds every needed file, else the archive (fetched if asked)."""
    folder, archive = root / CIFAR10_DIRNAME, root / CIFAR10_ARCHIVE
    if folder.is_dir() and all((folder / n).is_file() for n in names):
        return folder
    if archive.is_file():
        if download:  # asked to fetch: make sure what is already there is the real thing
            got = files.file_digest(archive, "md5", error=DataError)  # CIFAR-10 publishes only an MD5
            if got != CIFAR10_MD5:
                raise DataError(f"{archive} has MD5 {got}, expected {CIFAR10_MD5}: it is corrupt or not the "
                                f"official archive; delete it and run again to download a fresh copy")
        return archive
    if download:
        files.download(CIFAR10_URL, archive, md5=CIFAR10_MD5, progress=progress, error=DataError)
        return archive
    if folder.is_dir():
        missing = ", ".join(n for n in names if not (folder / n).is_file())
        raise DataError(f"{folder} lacks {missing}; download {CIFAR10_URL} and put it at {archive} "
                        f"(or unpack it in {root}), or pass download=True")
    raise DataError(f"CIFAR-10 not found in {root}: download {CIFAR10_URL} and put it at {archive} "
                    f"(or unpack it there so that {folder}/ exists), or pass download=True")


def _read_cifar_archive(archive: Path, names: list[str]) -> dict[str, bytes]:
    wanted = set(names)
    raw: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:gz") as tf:
            for m in tf:  # in order, so the gzip stream is read once and never rewound
                parts = posixpath.normpath(m.name).split("/")
                if m.isfile() and len(parts) == 2 and parts[0] == CIFAR10_DIRNAME and parts[1] in wanted:
                    f = tf.extractfile(m)
                    raw[parts[1]] = f.read()
                    if len(raw) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{archive}: truncated or corrupt archive ({_describe(e)}); delete it "
                        f"and download {CIFAR10_URL} again") from None
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"{archive}: lacks {', '.join(CIFAR10_DIRNAME + '/' + n for n in missing)}; "
                        f"it is not the official CIFAR-10 archive")
    return raw


def _load_cifar10(root: Path, split: str, image_size: int, channels: int, download: bool,
                  progress: bool) -> ImageData:
    names = _CIFAR10_FILES[split]
    where = _find_cifar10(root, names, download, progress)
    if where.is_dir():
        raw = {}
        for n in names:
            try:
                raw[n] = (where / n).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {where / n} ({e.strerror or e})") from None
        label = lambda n: str(where / n)  # noqa: E731
    else:
        raw = _read_cifar_archive(where, names)
        label = lambda n: f"{where}:{CIFAR10_DIRNAME}/{n}"  # noqa: E731
    datas, labels = [], []
    for n in names:
        d, y = _read_cifar_batch(raw.pop(n), label(n))
        datas.append(d)
        labels.append(y)
    data = np.concatenate(datas) if len(datas) > 1 else datas[0]
    n_img = data.shape[0]
    if n_img == 0:
        raise DataError(f"{where}: the {split} split holds no images")
    _check_fits(n_img * channels * image_size * image_size, f"CIFAR-10 {split} at {image_size}x{image_size}")
    x = torch.from_numpy(np.ascontiguousarray(data)).view(n_img, 3, 32, 32)  # rows are R plane, G, B; row-major
    if channels == 1:
        x = _rgb_to_gray(x)
    x = _resize_uint8(x, image_size)
    y = torch.from_numpy(np.concatenate(labels))
    return ImageData(x.contiguous(), y, f"cifar10-{split}", class_names=CIFAR10_CLASSES)


# --------------------------------------------------------------------------------------------------
# A folder of images


def _list_images(root: Path) -> tuple[list[tuple[str, int, int]], list[str]]:
    """Image files under ``root`` as (relative posix path, size, mtime_ns), sorted; and unstat-able files."""
    found, bad = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if not fn.lower().endswith(IMAGE_EXTENSIONS):
                continue
            full = os.path.join(dirpath, fn)
            rel = Path(os.path.relpath(full, root)).as_posix()
            try:
                st = os.stat(full)
            except OSError:
                bad.append(rel)
                continue
            found.append((rel, st.st_size, st.st_mtime_ns))
    found.sort()
    return found, sorted(bad)


def folder_classes(rel_paths) -> tuple[tuple[str, ...] | None, list[int] | None]:
    """The classes of a folder from its image files' relative posix paths: (class names, one label per path).

    The rules (torchvision's ``ImageFolder`` where it has one):

    * every image sits in a subfolder: the folder is labelled. The classes are the names of the top-level
      subfolders, sorted as Python sorts strings (as ImageFolder does), and label k means
      ``class_names[k]``. An image nested deeper (``cat/indoor/1.png``) belongs to its top-level
      subfolder (``cat``). One subfolder makes one class.
    * a top-level subfolder with no image files anywhere below it is not a class (ImageFolder refuses
      such a folder unless ``allow_empty``; here it is simply not counted, so the indices are those of
      ImageFolder without the empty classes).
    * any image directly at the top level: the folder is unlabelled, (None, None), and every image is
      used. When there are subfolders with images too, the caller warns that the labels were dropped.
    """
    rel_paths = list(rel_paths)
    if not rel_paths or any("/" not in r for r in rel_paths):
        return None, None
    tops = [r.split("/", 1)[0] for r in rel_paths]
    names = tuple(sorted(set(tops)))
    index = {c: k for k, c in enumerate(names)}
    return names, [index[t] for t in tops]


def _to_mode(im, mode: str):
    """Any PIL image -> mode 'RGB' or 'L'. Transparency is composited on white; 16-bit is scaled to 8."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)  # 16-bit gray (PNG/TIFF): 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.round(a / 257.0), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.round(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode in ("L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == mode else im.convert(mode)


def _decode_image(path: str, size: int, channels: int) -> np.ndarray:
    """One file -> uint8 [channels, size, size]: shorter side resized to ``size`` (bicubic, antialiased),
    center-cropped, EXIF orientation applied. Raises on an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        if im.format == "JPEG":  # let libjpeg decode at a reduced scale, still at least 2x the target
            im.draft(None, (2 * size, 2 * size))
        im = ImageOps.exif_transpose(im)
        im = _to_mode(im, "RGB" if channels == 3 else "L")
        w, h = im.size
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # the centered square
        im = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _cache_file(cache_dir, root: Path, key: str) -> Path:
    base = Path(cache_dir).expanduser() if cache_dir is not None else files.cache_dir()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.resolve().name)[:40] or "root"
    return base / "folders" / f"{stem}-{key[:32]}.safetensors"


def _cache_format() -> str:
    return f"ddpmkit-folder-cache-v{_FOLDER_CACHE_VERSION}"


def _read_cache(path: Path, key: str, channels: int, size: int, class_names: tuple[str, ...] | None):
    """(images, labels or None, skipped) from a cache file, or None (with a warning) if it cannot be used."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or meta.get("format") != _cache_format():
                raise ValueError("the key or format stored in the file does not match")
            n = int(meta["num_images"])
            _check_fits(n * channels * size * size, f"the cached folder {path}")
            x = f.get_tensor("images")
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
            skipped = tuple(json.loads(meta.get("skipped", "[]")))
            stored_names = json.loads(meta.get("class_names", "null"))
        if x.dtype != torch.uint8 or tuple(x.shape) != (n, channels, size, size):
            raise ValueError(f"a {x.dtype} tensor {tuple(x.shape)}")
        if (stored_names is None) != (class_names is None) or (
                class_names is not None and tuple(stored_names) != class_names):
            raise ValueError("its class names do not match the folder's subfolders")
        if class_names is not None:
            if labels is None or labels.dtype != torch.int64 or tuple(labels.shape) != (n,):
                raise ValueError("its labels are missing or malformed")
            if n and not (0 <= int(labels.min()) and int(labels.max()) < len(class_names)):
                raise ValueError("its labels are out of range")
        elif labels is not None:
            raise ValueError("it has labels for an unlabelled folder")
        return x.contiguous(), labels, skipped
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        warnings.warn(f"ignoring the unreadable cache file {path} ({_describe(e)}); rebuilding it",
                      DataWarning, stacklevel=4)
        return None


def _write_cache(path: Path, key: str, x: torch.Tensor, labels: torch.Tensor | None,
                 class_names: tuple[str, ...] | None, skipped: list[str], root: Path) -> None:
    """Store the decoded folder (images, labels, class names) as one safetensors file, atomically.

    A cache that cannot be written is a warning, not an error: the next run decodes again."""
    from safetensors.torch import save

    avail = available_memory_bytes()
    if avail is not None and x.numel() > 0.5 * avail:  # serializing takes a second copy in memory
        warnings.warn(f"not caching {root}: the serialized copy would need {x.numel() / 2**30:.2f} GiB more "
                      f"memory; the next run decodes again", DataWarning, stacklevel=4)
        return
    meta = {"key": key, "num_images": str(x.shape[0]), "skipped": json.dumps(skipped),
            "class_names": json.dumps(None if class_names is None else list(class_names)),
            "source": str(root.resolve()), "format": _cache_format()}
    tensors = {"images": x} if labels is None else {"images": x, "labels": labels}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_bytes(path, save(tensors, metadata=meta), error=DataError)
    except (OSError, DdpmkitError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        warnings.warn(f"could not write the cache file {path} ({text}); the next run decodes again",
                      DataWarning, stacklevel=4)


def _warn_skipped(skipped: list[str], total: int, root: Path) -> None:
    if not skipped:
        return
    shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
    warnings.warn(f"skipped {len(skipped)} of {total} image files under {root} that could not be read: {shown}",
                  DataWarning, stacklevel=4)


def _load_folder(root: Path, size: int, channels: int, *, strict: bool, cache_dir, progress: bool) -> ImageData:
    from tqdm.auto import tqdm

    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"no such directory: {root}")
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    name = f"folder:{root}"
    found, unstatable = _list_images(root)
    if unstatable and strict:
        raise DataError(f"{root / unstatable[0]}: cannot read this file")
    if not found:
        raise DataError(f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {root}")
    # Classes come from every listed image file, readable or not, so a failed decode never renumbers them.
    class_names, _ = folder_classes([r for r, _, _ in found] + unstatable)
    if class_names is None and any("/" in r for r, _, _ in found):
        warnings.warn(f"{root} has images at its top level as well as in subfolders: it is read without "
                      f"labels (to label it by class, put every image in a subfolder named for its class)",
                      DataWarning, stacklevel=3)
    labels_all = None
    if class_names is not None:
        index = {c: k for k, c in enumerate(class_names)}
        labels_all = np.array([index[r.split("/", 1)[0]] for r, _, _ in found], dtype=np.int64)
    total = len(found) + len(unstatable)
    key_src = json.dumps({"v": _FOLDER_CACHE_VERSION, "size": size, "channels": channels,
                          "files": found, "unstatable": unstatable}, separators=(",", ":"))
    key = hashlib.sha256(key_src.encode()).hexdigest()
    cache = _cache_file(cache_dir, root, key)
    hit = _read_cache(cache, key, channels, size, class_names)
    if hit is not None:
        x, labels, skipped = hit
        _warn_skipped(list(skipped), total, root)
        return ImageData(x, labels, name, skipped, class_names)

    n = len(found)
    _check_fits(n * channels * size * size, f"{n} images from {root} at {channels}x{size}x{size}")
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * n

    def work(i: int) -> None:
        try:
            out[i] = _decode_image(str(root / found[i][0]), size, channels)
        except MemoryError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
            errors[i] = _describe(e)

    workers = min(16, 2 * (os.cpu_count() or 1), n)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ddpmkit-decode")
    try:
        with tqdm(total=n, unit="img", desc=f"decoding {root.name or root}", disable=not progress) as bar:
            for start in range(0, n, 4096):  # bounded chunks: a million files never means a million futures
                for i, _ in enumerate(pool.map(work, range(start, min(n, start + 4096))), start):
                    if errors[i] is not None and strict:
                        raise DataError(f"{root / found[i][0]}: cannot read this image ({errors[i]})")
                    bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    skipped = [f"{root / r} (cannot stat)" for r in unstatable]
    skipped += [f"{root / found[i][0]} ({errors[i]})" for i in range(n) if errors[i] is not None]
    ok = np.array([e is None for e in errors], dtype=bool)
    if not ok.any():
        raise DataError(f"none of the {total} image files under {root} could be read; first: {skipped[0]}")
    if not ok.all():
        out = out[ok]
        if labels_all is not None:
            labels_all = labels_all[ok]
    x = torch.from_numpy(np.ascontiguousarray(out))
    labels = None if labels_all is None else torch.from_numpy(labels_all)
    _warn_skipped(skipped, total, root)
    _write_cache(cache, key, x, labels, class_names, skipped, root)
    return ImageData(x, labels, name, tuple(skipped), class_names)
