"""What every data source shares: the dataset in memory (``ImageData``), the memory check, uint8 resizing and grey."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import DataError

__all__ = ["DataWarning", "ImageData", "available_memory_bytes"]

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


def _describe(e: BaseException) -> str:
    """An exception as one short line, for messages that must stay on one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


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
