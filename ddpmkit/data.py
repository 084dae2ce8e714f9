"""Data sources turned into one uint8 tensor [N, C, H, W], and batches served from it on the device.

Sources, chosen by a string (``load_dataset``):

* ``digits``  - the 1,797 8x8 handwritten digits shipped with scikit-learn (offline), upsampled to
  ``image_size`` (default 16) with an antialiased bicubic filter; 1 channel (3 = the gray replicated).
* ``cifar10`` - the official python-pickle distribution, read from ``DATA_DIR/cifar-10-batches-py/``
  or straight out of ``DATA_DIR/cifar-10-python.tar.gz``, through an unpickler that can build numpy
  arrays and nothing else. ``image_size`` other than 32 resizes (antialiased bicubic).
* ``folder:PATH`` or the path of a directory - every png/jpg/jpeg/webp/bmp file below it, resized on
  the shorter side and center-cropped to a square, decoded in parallel and cached on disk as
  safetensors (never a pickle).

``Batcher`` keeps the uint8 tensor on the device and serves float batches in [-1, 1]: sampling without
replacement within an epoch, random horizontal flips, all from one seeded ``torch.Generator``, with a
``state_dict`` that resumes bit-exactly.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import io
import json
import os
import pickle
import posixpath
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CheckpointError, ConfigError, DataError
from .images import from_uint8

__all__ = [
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "IMAGE_EXTENSIONS",
    "Batcher",
    "DataWarning",
    "ImageData",
    "available_memory_bytes",
    "default_cache_dir",
    "load_dataset",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR10_ROW = 3 * 32 * 32

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SOURCES = "digits, cifar10, folder:PATH (or the path of an existing directory of images)"
_DEFAULTS = {"digits": (16, 1), "cifar10": (32, 3), "folder": (64, 3)}  # (image_size, channels)

# Bump when the decoding of folder images changes, so that old caches are not reused.
_FOLDER_CACHE_VERSION = 1
# Refuse a dataset whose tensor would take more than this share of the memory now available.
_MEMORY_SHARE = 0.9


class DataWarning(UserWarning):
    """Something in the data was skipped or ignored (an unreadable image, a corrupt cache file)."""


@dataclass
class ImageData:
    """A whole dataset in memory: ``images`` uint8 [N, C, H, W] on the CPU, ``labels`` int64 [N] or None.

    ``skipped`` names the files of a folder that could not be read (and were left out).
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    name: str
    skipped: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"{self.name}: images must be uint8 [N, C, H, W], got "
                            f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.name}: {self.labels.shape[0]} labels for {self.images.shape[0]} images")

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
        lab = "no labels" if self.labels is None else "labels"
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
    folders are cached (default ``$DDPMKIT_CACHE`` or ``~/.cache/ddpmkit``). ``strict`` makes an
    unreadable image in a folder an error instead of a skipped file.
    """
    kind, path = _parse_source(source)
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
        root = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir() / "data"
        return _load_cifar10(root, split, image_size, channels, download, progress)
    if split != "train":
        raise DataError(f"a folder has one split, 'train'; got split={split!r} for {path}")
    return _load_folder(path, image_size, channels, strict=strict, cache_dir=cache_dir, progress=progress)


def _parse_source(source) -> tuple[str, Path | None]:
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


def default_cache_dir() -> Path:
    """``$DDPMKIT_CACHE`` if set, else ``~/.cache/ddpmkit``."""
    env = os.environ.get("DDPMKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpmkit"


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
    return ImageData(x.contiguous(), torch.from_numpy(target).clone(), "digits")


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


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str, progress: bool) -> None:
    """Fetch ``url`` to ``dest`` through a temporary file; only a file with the right MD5 is renamed into place."""
    from tqdm.auto import tqdm

    by_hand = f"download it by hand from {url} and put it at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as e:
        raise DataError(f"cannot write to {dest.parent} ({e.strerror or e})") from None
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=60)
            except (OSError, http.client.HTTPException, ValueError) as e:
                reason = " ".join(str(getattr(e, "reason", None) or e).split())
                raise DataError(f"could not download {url} ({reason}); {by_hand}") from None
            with resp:
                length = resp.headers.get("Content-Length") if resp.headers else None
                total = int(length) if length and length.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                          desc=f"downloading {dest.name}", disable=not progress) as bar:
                    while True:
                        try:
                            chunk = resp.read(1 << 20)
                        except (OSError, http.client.HTTPException) as e:
                            raise DataError(f"could not download {url} ({_describe(e)}); {by_hand}") from None
                        if not chunk:
                            break
                        try:
                            out.write(chunk)
                        except OSError as e:
                            raise DataError(f"cannot write {tmp} ({e.strerror or e})") from None
                        h.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if got != md5:
            raise DataError(f"the download of {url} has MD5 {got}, expected {md5}; the file was discarded "
                            f"(a corrupt or altered download); try again, or {by_hand}")
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _find_cifar10(root: Path, names: list[str], download: bool, progress: bool) -> Path:
    """The unpacked directory if it holds every needed file, else the archive (fetched if asked)."""
    folder, archive = root / CIFAR10_DIRNAME, root / CIFAR10_ARCHIVE
    if folder.is_dir() and all((folder / n).is_file() for n in names):
        return folder
    if archive.is_file():
        if download:  # asked to fetch: make sure what is already there is the real thing
            got = _md5(archive)
            if got != CIFAR10_MD5:
                raise DataError(f"{archive} has MD5 {got}, expected {CIFAR10_MD5}: it is corrupt or not the "
                                f"official archive; delete it and run again to download a fresh copy")
        return archive
    if download:
        _download(CIFAR10_URL, archive, CIFAR10_MD5, progress)
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
    return ImageData(x.contiguous(), y, f"cifar10-{split}")


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
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.resolve().name)[:40] or "root"
    return base / "folders" / f"{stem}-{key[:32]}.safetensors"


def _read_cache(path: Path, key: str, channels: int, size: int):
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError("the key stored in the file does not match")
            n = int(meta["num_images"])
            _check_fits(n * channels * size * size, f"the cached folder {path}")
            x = f.get_tensor("images")
            skipped = tuple(json.loads(meta.get("skipped", "[]")))
        if x.dtype != torch.uint8 or tuple(x.shape) != (n, channels, size, size):
            raise ValueError(f"a {x.dtype} tensor {tuple(x.shape)}")
        return x.contiguous(), skipped
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as e:
        warnings.warn(f"ignoring the unreadable cache file {path} ({_describe(e)}); rebuilding it",
                      DataWarning, stacklevel=4)
        return None


def _write_cache(path: Path, key: str, x: torch.Tensor, skipped: list[str], root: Path) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
        os.close(fd)
        meta = {"key": key, "num_images": str(x.shape[0]), "skipped": json.dumps(skipped),
                "source": str(root.resolve()), "format": f"ddpmkit-folder-cache-v{_FOLDER_CACHE_VERSION}"}
        save_file({"images": x}, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write the cache file {path} ({e.strerror or e}); the next run decodes again",
                      DataWarning, stacklevel=4)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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
    files, unstatable = _list_images(root)
    if unstatable and strict:
        raise DataError(f"{root / unstatable[0]}: cannot read this file")
    if not files:
        raise DataError(f"no image files ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) under {root}")
    total = len(files) + len(unstatable)
    key_src = json.dumps({"v": _FOLDER_CACHE_VERSION, "size": size, "channels": channels,
                          "files": files, "unstatable": unstatable}, separators=(",", ":"))
    key = hashlib.sha256(key_src.encode()).hexdigest()
    cache = _cache_file(cache_dir, root, key)
    hit = _read_cache(cache, key, channels, size)
    if hit is not None:
        x, skipped = hit
        _warn_skipped(list(skipped), total, root)
        return ImageData(x, None, name, skipped)

    n = len(files)
    _check_fits(n * channels * size * size, f"{n} images from {root} at {channels}x{size}x{size}")
    out = np.empty((n, channels, size, size), dtype=np.uint8)
    errors: list[str | None] = [None] * n

    def work(i: int) -> None:
        try:
            out[i] = _decode_image(str(root / files[i][0]), size, channels)
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
                        raise DataError(f"{root / files[i][0]}: cannot read this image ({errors[i]})")
                    bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

    skipped = [f"{root / r} (cannot stat)" for r in unstatable]
    skipped += [f"{root / files[i][0]} ({errors[i]})" for i in range(n) if errors[i] is not None]
    ok = np.array([e is None for e in errors], dtype=bool)
    if not ok.any():
        raise DataError(f"none of the {total} image files under {root} could be read; first: {skipped[0]}")
    if not ok.all():
        out = out[ok]
    x = torch.from_numpy(np.ascontiguousarray(out))
    _warn_skipped(skipped, total, root)
    _write_cache(cache, key, x, skipped, root)
    return ImageData(x, None, name, tuple(skipped))


# --------------------------------------------------------------------------------------------------
# Serving batches


class Batcher:
    """Random batches from a uint8 image tensor kept on ``device``, as float [-1, 1] tensors.

    Each epoch is a fresh permutation of all N images (sampling without replacement), drawn together with
    N flip bits from one CPU ``torch.Generator`` seeded with ``seed``, so the order is the same on every
    device. A batch may run across the end of an epoch (and ``batch_size`` may exceed N). The per-batch
    work is an index_select, a ``torch.where`` with the mirrored batch, and the scaling: no Python loop
    over images, no worker processes.

    ``next_batch(rank=r, world_size=w)`` returns rank r's contiguous slice of the global batch, whose
    order does not depend on w. Iterating a Batcher yields ``next_batch()`` forever.
    """

    def __init__(self, images_uint8, batch_size: int, *, device="cpu", flip: bool = True, seed: int = 0,
                 labels: torch.Tensor | None = None):
        if isinstance(images_uint8, ImageData):
            labels = images_uint8.labels if labels is None else labels
            images_uint8 = images_uint8.images
        if not torch.is_tensor(images_uint8) or images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            desc = (f"{images_uint8.dtype} {tuple(images_uint8.shape)}" if torch.is_tensor(images_uint8)
                    else type(images_uint8).__name__)
            raise DataError(f"Batcher needs a uint8 tensor [N, C, H, W], got {desc}")
        n = int(images_uint8.shape[0])
        if n == 0:
            raise DataError("Batcher got no images")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if labels is not None:
            labels = torch.as_tensor(labels)
            if labels.shape != (n,):
                raise DataError(f"Batcher got {tuple(labels.shape)} labels for {n} images")
        self.device = torch.device(device)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            nbytes = images_uint8.numel()
            if nbytes > _MEMORY_SHARE * free:
                raise DataError(f"the dataset needs {nbytes / 2**30:.2f} GiB on {self.device} but only "
                                f"{free / 2**30:.2f} GiB is free there; use a smaller image_size or fewer images")
        self.images = images_uint8.to(self.device).contiguous()
        self.labels = None if labels is None else labels.to(device=self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.flip = bool(flip)
        self.seed = seed
        self.num_images = n
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(seed)
        self._epoch = 0
        self._pos = 0
        self._set_tables(*self._draw_tables())

    # -- the epoch tables
    def _draw_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        perm = torch.randperm(self.num_images, generator=self._gen)
        flips = torch.randint(0, 2, (self.num_images,), generator=self._gen, dtype=torch.uint8)
        return perm, flips  # flips are drawn even when flip=False, so the order never depends on it

    def _set_tables(self, perm: torch.Tensor, flips: torch.Tensor) -> None:
        self._perm, self._flips = perm, flips
        self._perm_dev = perm.to(self.device)
        self._flips_dev = flips.to(self.device, dtype=torch.bool)

    @property
    def epoch(self) -> int:
        """Number of whole epochs served before the current one."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many images of the current epoch have been served."""
        return self._pos

    # -- batches
    def next_indices(self, *, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one global batch; return this rank's (indices, flip mask) on the device."""
        b = self.batch_size
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world_size must be a positive integer, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank!r}")
        if b % world_size:
            raise ConfigError(f"batch_size {b} is not divisible by world_size {world_size}")
        idx, flips = [], []
        need = b
        while need:
            if self._pos == self.num_images:
                self._epoch += 1
                self._pos = 0
                self._set_tables(*self._draw_tables())
            take = min(need, self.num_images - self._pos)
            idx.append(self._perm_dev[self._pos:self._pos + take])
            flips.append(self._flips_dev[self._pos:self._pos + take])
            self._pos += take
            need -= take
        idx_t = idx[0] if len(idx) == 1 else torch.cat(idx)
        flip_t = flips[0] if len(flips) == 1 else torch.cat(flips)
        per = b // world_size
        return idx_t[rank * per:(rank + 1) * per], flip_t[rank * per:(rank + 1) * per]

    def next_batch(self, return_labels: bool = False, *, rank: int = 0, world_size: int = 1):
        """The next batch: float32 [B / world_size, C, H, W] in [-1, 1] (and int64 labels if asked)."""
        if return_labels and self.labels is None:
            raise ConfigError("this Batcher has no labels")
        idx, flip = self.next_indices(rank=rank, world_size=world_size)
        x = self.images.index_select(0, idx)
        if self.flip:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        x = from_uint8(x)
        if return_labels:
            return x, self.labels.index_select(0, idx)
        return x

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.next_batch()

    # -- exact resume
    def state_dict(self) -> dict:
        """Tensors and ints only (store the tensors as safetensors, the ints as JSON)."""
        return {
            "generator_state": self._gen.get_state().clone(),
            "permutation": self._perm.clone(),
            "flips": self._flips.clone(),
            "position": int(self._pos),
            "epoch": int(self._epoch),
            "num_images": int(self.num_images),
            "seed": int(self.seed),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict``: the batches that follow are bit-identical to an uninterrupted run."""
        need = ("generator_state", "permutation", "flips", "position", "epoch", "num_images")
        missing = [k for k in need if k not in state]
        if missing:
            raise CheckpointError(f"batcher state lacks {', '.join(missing)}")
        n = int(state["num_images"])
        if n != self.num_images:
            raise CheckpointError(f"batcher state is for {n} images, this dataset has {self.num_images}")
        perm = torch.as_tensor(state["permutation"]).cpu()
        flips = torch.as_tensor(state["flips"]).cpu()
        pos = int(state["position"])
        if perm.shape != (n,) or perm.dtype != torch.int64 or flips.shape != (n,) or not 0 <= pos <= n:
            raise CheckpointError("batcher state is inconsistent (permutation, flips or position)")
        if not torch.equal(torch.sort(perm).values, torch.arange(n)):
            raise CheckpointError("batcher state's permutation is not a permutation of the dataset")
        gen = torch.Generator(device="cpu")
        try:
            gen.set_state(torch.as_tensor(state["generator_state"]).cpu().to(torch.uint8).contiguous())
        except (RuntimeError, TypeError) as e:
            raise CheckpointError(f"batcher state has an invalid generator state ({e})") from None
        self._gen = gen
        self._pos = pos
        self._epoch = int(state["epoch"])
        self._set_tables(perm.contiguous(), flips.to(torch.uint8).contiguous())
