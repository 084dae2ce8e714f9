"""The CIFAR-10 source: the official python-pickle batches, read through an unpickler that builds numpy arrays only.

The batches are read from ``DATA_DIR/cifar-10-batches-py/`` or straight out of ``DATA_DIR/cifar-10-python.tar.gz``
(downloaded on request, its MD5 checked). Labels 0..9, class names ``CIFAR10_CLASSES`` (airplane .. truck).
"""

from __future__ import annotations

import io
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..errors import DataError
from .common import ImageData, _check_fits, _describe, _resize_uint8, _rgb_to_gray

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MD5", "CIFAR10_URL", "load_cifar10"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIRNAME = "cifar-10-batches-py"
_CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR10_ROW = 3 * 32 * 32
# The label names of the official archive's batches.meta, in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


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


def load_cifar10(root: Path, split: str, image_size: int, channels: int, download: bool,
                 progress: bool) -> ImageData:
    """The train (50,000) or test (10,000) split from ``root``, fetched first when ``download`` asks."""
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
