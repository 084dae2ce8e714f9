"""What the benchmarks ask of the digits classifier beyond its features: a table row per set of images.

The classifier itself (network, training, cache, features) is ``ddpmkit.metrics.digits``. Here: the class
coverage and entropy of its predictions, the noise and real reference rows, and the folders of PNG samples that
``bench/digits_judge.py`` reads.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    import ddpmkit  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmkit.metrics.digits import (  # noqa: E402
    IMAGE_SIZE, NATIVE_SIZE, NUM_CLASSES, DigitsClassifier, DigitsError, to_classifier_size,
)

__all__ = ["COVERAGE_SHARE", "DigitsRow", "class_coverage", "class_entropy", "evaluate", "load_png_dir",
           "noise_images", "reference_rows"]

COVERAGE_SHARE = 1.0 / 3.0


@dataclass
class DigitsRow:
    """One row of the quality table: a set of images and what the classifier says of it."""

    source: str
    n: int
    confidence: float
    coverage: int
    entropy: float
    fd: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def class_coverage(pred, num_classes: int = NUM_CLASSES, share: float = COVERAGE_SHARE) -> int:
    """Classes that receive at least ``share`` of their fair share (N / num_classes) of the predictions."""
    pred = np.asarray(pred, dtype=np.int64)
    counts = np.bincount(pred, minlength=num_classes)
    return int((counts >= share * len(pred) / num_classes).sum()) if len(pred) else 0


def class_entropy(pred, num_classes: int = NUM_CLASSES) -> float:
    """Entropy of the predicted-class histogram divided by log(num_classes): 1 = balanced, 0 = one class."""
    pred = np.asarray(pred, dtype=np.int64)
    if len(pred) == 0:
        return 0.0
    p = np.bincount(pred, minlength=num_classes) / len(pred)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(num_classes))  # Shannon entropy over its maximum, log K


def load_png_dir(path, image_size: int = IMAGE_SIZE, pattern: str | None = None) -> torch.Tensor:
    """The PNG files directly in ``path`` that match ``pattern`` (sorted by name) as uint8 [N, 1, size, size]
    (gray, PIL's 'L'). By default ``sample_*.png`` (what ``ddpmkit sample`` writes, leaving out its
    ``grid.png``) when there are such files, else every ``*.png``."""
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise DigitsError(f"no such directory: {root}" if not root.exists() else f"not a directory: {root}")
    if pattern is None:
        files = sorted(p for p in root.glob("sample_*.png") if p.is_file())
        if not files:
            files = sorted(p for p in root.glob("*.png") if p.is_file())
    else:
        files = sorted(p for p in root.glob(pattern) if p.is_file())
    if not files:
        raise DigitsError(f"no {pattern or '.png'} files in {root}")
    out = np.empty((len(files), 1, image_size, image_size), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("L")
                if im.size == (NATIVE_SIZE, NATIVE_SIZE) and image_size == IMAGE_SIZE:  # native 8x8 samples
                    out[i, 0] = to_classifier_size(torch.from_numpy(np.asarray(im, dtype=np.uint8))[None, None])[0, 0]
                    continue
                if im.size != (image_size, image_size):
                    raise DigitsError(f"{f}: the image is {im.size[0]}x{im.size[1]}, the digits classifier reads "
                                      f"{image_size}x{image_size}")
                out[i, 0] = np.asarray(im, dtype=np.uint8)
        except DigitsError:
            raise
        except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
            raise DigitsError(f"{f}: cannot read this image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(out)


def noise_images(n: int, kind: str = "gaussian", seed: int = 1234, image_size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [n, 1, size, size] noise: ``gaussian`` = N(0, 1) clipped to [-1, 1] and quantized as samples
    are (round((x + 1) * 127.5)); ``uniform`` = every level 0..255 equally likely."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, image_size, image_size)
    if kind == "gaussian":
        x = torch.randn(shape, generator=gen)
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    if kind == "uniform":
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    raise ValueError(f"unknown noise kind {kind!r}")


def evaluate(clf: DigitsClassifier, images, source: str = "images") -> DigitsRow:
    """The row of one set: the mean top probability, the class coverage and entropy, the Frechet distance."""
    feats, probs = clf._run(images)  # features and probabilities in one pass of the network
    if feats.shape[0] < 2:
        raise DigitsError(f"{source}: need at least 2 images, got {feats.shape[0]}")
    pred = probs.argmax(axis=1)
    return DigitsRow(source=source, n=int(feats.shape[0]), confidence=float(probs.max(axis=1).mean()),
                     coverage=class_coverage(pred), entropy=class_entropy(pred), fd=clf.fd(feats=feats))


def reference_rows(clf: DigitsClassifier, ns=()) -> list[DigitsRow]:
    """Real held-out digits, real digits at each size in ``ns``, Gaussian and uniform noise."""
    n_test = len(clf.test_idx)
    rows = [evaluate(clf, clf.test_images, "real (held out)")]
    for n in sorted(set(int(k) for k in ns)):
        if 2 <= n < n_test:
            rows.append(evaluate(clf, clf.real_subset(n), f"real, n={n}"))
    rows.append(evaluate(clf, noise_images(n_test, "gaussian"), "gaussian noise"))
    rows.append(evaluate(clf, noise_images(n_test, "uniform"), "uniform noise"))
    return rows
