"""The digits source: the 1,797 8x8 handwritten digits shipped with scikit-learn, upsampled, labelled 0..9."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import DataError
from .common import ImageData, _resize_uint8

__all__ = ["DIGITS_CLASSES", "load_digits"]

DIGITS_CLASSES = tuple(str(d) for d in range(10))


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
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        raise DataError("the digits source needs scikit-learn: pip install scikit-learn") from None
    d = sklearn_load_digits()
    return np.asarray(d.images, dtype=np.float64), np.asarray(d.target, dtype=np.int64)


def load_digits(image_size: int, channels: int) -> ImageData:
    """The digits as uint8 [1797, channels, image_size, image_size] (antialiased bicubic), labels 0..9."""
    images, target = _digits_arrays()
    x = torch.from_numpy(images * (255.0 / 16.0)).round().clamp(0, 255)  # 0..16 -> 0..255
    x = x.to(torch.uint8).unsqueeze(1)  # [1797, 1, 8, 8]
    x = _resize_uint8(x, image_size)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return ImageData(x.contiguous(), torch.from_numpy(target).clone(), "digits", class_names=DIGITS_CLASSES)
