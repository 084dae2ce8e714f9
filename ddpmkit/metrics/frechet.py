"""The Frechet distance between Gaussians fitted to feature vectors, and the statistics it reads.

Both FID (Inception features, ``metrics.fid``) and the digits Frechet distance (the digits classifier's
features, ``metrics.digits``) are this distance; only the features differ. Statistics are float64: either of
a whole array of features (:func:`mean_cov`) or accumulated batch by batch without keeping the features
(:class:`RunningStats`, :func:`feature_stats`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..errors import DdpmkitError

__all__ = ["FidError", "RunningStats", "feature_stats", "frechet_distance", "mean_cov"]


class FidError(DdpmkitError):
    """A problem a user can cause in a Frechet-distance evaluation (FID or the digits distance): a missing
    network file, a bad reference, too few images."""


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))  (Dowson & Landau 1982; FID, Heusel et al.)

    The matrix square root is scipy's; when it is not finite or inaccurate (a singular product) both
    covariances are offset by ``eps * I`` first, and a complex result whose imaginary part is numerical
    noise is made real.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(s1 @ s2)
    if covmean is None:  # singular: features that never fire (dead ReLUs) have zero variance
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset), check=False)
        if covmean is None:
            raise ValueError("the matrix square root is not finite, even with an offset of eps * I")
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        scale = max(1.0, np.abs(covmean.real).max())
        if imag > 1e-3 * scale:
            raise ValueError(f"the matrix square root has a large imaginary part ({imag:.3g})")
        covmean = covmean.real
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
    return float(max(fd, 0.0))  # a tiny negative value is rounding, not a distance


def _sqrtm(a: np.ndarray, check: bool = True):
    """scipy's square root of ``a``; None when it is not finite or (``check``) does not square back to ``a``."""
    import warnings

    from scipy import linalg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # judged by the residual below instead
        warnings.simplefilter("ignore", RuntimeWarning)
        r = linalg.sqrtm(a)
    if not np.isfinite(r).all():
        return None
    scale = max(np.abs(a).max(), 1e-300)
    if check and np.abs(r @ r - a).max() > 1e-4 * scale:
        return None
    return r


def mean_cov(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise FidError(f"need at least 2 feature vectors [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStats:
    """Mean and (unbiased) covariance of feature vectors seen batch by batch, in float64.

    Sums of x - c and of the outer products (x - c)(x - c)^T, with c the first batch's mean (a shift that
    keeps the sums small, so that subtracting n * mean mean^T loses no precision). Memory is O(D^2)."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.s = None
        self.ss = None

    def update(self, feats) -> None:
        f = np.asarray(feats, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be [N, D], got shape {f.shape}")
        if f.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = f.mean(axis=0)
            d = f.shape[1]
            self.s = np.zeros(d)
            self.ss = np.zeros((d, d))
        elif f.shape[1] != self.shift.shape[0]:
            raise ValueError(f"feature size changed from {self.shift.shape[0]} to {f.shape[1]}")
        c = f - self.shift
        self.s += c.sum(axis=0)
        self.ss += c.T @ c
        self.n += f.shape[0]

    def mean(self) -> np.ndarray:
        return self.shift + self.s / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise FidError(f"need at least 2 images for a covariance, got {self.n}")
        m = self.s / self.n
        # shifted sums: Cov = (sum (x-c)(x-c)^T - n m m^T) / (n - 1), m = mean(x - c)
        cov = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
        return (cov + cov.T) / 2.0


def feature_stats(extractor: Callable, images_iter: Iterable, *, total: int | None = None,
                  progress: bool = True, desc: str = "features") -> tuple[np.ndarray, np.ndarray, int]:
    """(mean [D], covariance [D, D], N) of ``extractor``'s features over the uint8 batches of ``images_iter``,
    accumulated in float64 without keeping the features; with a progress bar over images."""
    from tqdm import tqdm

    stats = RunningStats()
    with tqdm(total=total, disable=not progress, unit="img", desc=desc) as bar:
        for batch in images_iter:
            stats.update(extractor(batch))
            bar.update(int(batch.shape[0]))
    return stats.mean(), stats.cov(), stats.n
