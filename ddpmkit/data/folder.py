"""The folder source: every image file below a directory, squared and resized, cached on disk as safetensors.

Files are decoded in parallel (shorter side resized, center-cropped); the folder is labelled by class subfolder
(``folder_classes``) or unlabelled. The cache is keyed by every file's path, size and mtime, never a pickle.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import files
from ..errors import DataError, DdpmkitError
from .common import DataWarning, ImageData, _check_fits, _describe, available_memory_bytes

__all__ = ["IMAGE_EXTENSIONS", "folder_classes", "load_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Bump when the decoding of folder images or the cache's contents change, so that old caches are not reused
# (the version is part of the cache key, hence of the file name). v2: labels and class names are stored.
_FOLDER_CACHE_VERSION = 2


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


def load_folder(root: Path, size: int, channels: int, *, strict: bool, cache_dir, progress: bool) -> ImageData:
    """Every readable image below ``root`` as uint8 [N, channels, size, size], from the cache when it is valid."""
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
