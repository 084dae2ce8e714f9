"""Sample quality of a model while it trains (``--eval-every``) and in benchmarks: n samples with a fast sampler,
their Frechet distance to the real data in a feature space.

Features: the digits classifier (:mod:`.digits`) for the digits, at any training resolution (the samples are
brought to its 16x16 the way the data source makes 16x16 digits from the 8x8 originals: bicubic on uint8);
for any other data the Inception network of FID where its file is present (never downloaded here), against
the training images. Without either, there is nothing to measure and :meth:`QualityProbe.for_data` says so.

The noise of the samples is the same at every measurement (sample i from the stream (seed, i), as in
``ddpmkit sample``, for x_T and every stochastic step; sample i of class i mod K), so the curve over the steps moves
with the weights, not with the draw. Each point has a jackknife standard error (:func:`frechet_stderr`): how far
another draw of n samples could put it. The draw being shared, the differences between points are more precise than
that. A Frechet distance from n samples is biased upwards by about 1/n (see :mod:`.digits`): compare curves at
equal n.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .frechet import frechet_distance, mean_cov

__all__ = ["QualityProbe", "classifier_view", "draw_samples", "frechet_stderr", "psd_sqrt"]


def classifier_view(x: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Float images in [-1, 1] [N, C, H, W] -> uint8 [N, 1, size, size]: grey, resized as the data source
    resizes the digits (bicubic on uint8, ``data.sources._resize_uint8``)."""
    from ..data.sources import _resize_uint8, _rgb_to_gray
    from ..images import to_uint8

    u8 = to_uint8(x.detach().cpu())
    if u8.shape[1] == 3:  # ITU-R 601-2 luma, as PIL's "L"
        u8 = _rgb_to_gray(u8)
    return _resize_uint8(u8, size)


def psd_sqrt(sigma) -> np.ndarray:
    """The symmetric square root of a covariance matrix, by its eigendecomposition (negative rounding set to 0)."""
    s = np.asarray(sigma, np.float64)
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _frechet_of_rows(f: np.ndarray, y: np.ndarray, ref_mu: np.ndarray, ref_trace: float) -> float:
    """``frechet_distance(*mean_cov(f), ref_mu, ref_sigma)`` from features f [n, D], y = f R (R = ref_sigma^(1/2))
    and tr ref_sigma: the eigenvalues of a min(n, D)-square symmetric matrix instead of a D x D matrix square root."""
    n = f.shape[0]
    fc, yc = f - f.mean(axis=0), y - y.mean(axis=0)
    d = f.mean(axis=0) - ref_mu
    # tr (S ref_sigma)^(1/2) = tr (R S R)^(1/2) (similar matrices), and R S R = yc^T yc / (n - 1) has the nonzero
    # eigenvalues of yc yc^T / (n - 1): sum their square roots, from the smaller of the two
    gram = yc.T @ yc if yc.shape[1] <= n else yc @ yc.T
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None)).sum() / math.sqrt(n - 1)
    return max(float(d @ d + (fc * fc).sum() / (n - 1) + ref_trace - 2.0 * tr_sqrt), 0.0)  # Dowson & Landau 1982


def frechet_stderr(feats, ref_mu, ref_sigma, *, ref_root: np.ndarray | None = None) -> float:
    """The standard error of the Frechet distance of features ``feats`` [n, D] to N(ref_mu, ref_sigma), from the
    samples alone (the reference's statistics come from a whole data set): the jackknife over the n samples, each
    left out in turn. ``ref_root``: ``psd_sqrt(ref_sigma)``, when already at hand.

    Chosen over the bootstrap, whose resamples repeat rows and so inflate the covariance's error: against the spread
    over independent draws of n = 200 Gaussian features (D = 64) it gave 1.2-3x that spread, the jackknife 1.0-1.4x.
    Both are conservative near the floor, where the distance is mostly its 1/n bias (real digits against their
    reference, n = 200: the jackknife 1.9x the spread)."""
    f = np.asarray(feats, np.float64)
    y = f @ (psd_sqrt(ref_sigma) if ref_root is None else ref_root)
    if y.shape[1] > y.shape[0]:  # only y's centred rows count: their coordinates in their span, at most n of them
        yc = y - y.mean(axis=0)
        y = yc @ np.linalg.svd(yc, full_matrices=False)[2].T
    mu, tr = np.asarray(ref_mu, np.float64), float(np.trace(np.asarray(ref_sigma, np.float64)))
    n = f.shape[0]
    loo = np.array([_frechet_of_rows(np.delete(f, i, 0), np.delete(y, i, 0), mu, tr) for i in range(n)])
    return float(np.sqrt((n - 1) / n * ((loo - loo.mean()) ** 2).sum()))  # Tukey 1958; Efron & Tibshirani 1993 ch. 11


@torch.no_grad()
def draw_samples(denoiser, n: int, shape, *, sampler: str, steps: int | None, seed: int = 0,
                 batch_size: int = 250, num_classes: int | None = None, guidance: float | None = None,
                 null_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` samples (float [n, C, H, W] in [-1, 1]) and their labels: for a class-conditional denoiser
    (``num_classes`` given) sample i is of class i mod K, guided with weight ``guidance``."""
    from ..samplers.batches import sample_batches

    labels = None
    den = denoiser
    if num_classes:
        labels = torch.arange(n) % num_classes
        if guidance:
            den = denoiser.guided(guidance, null_class)
    out = [x for _, x in sample_batches(den, n=n, shape=shape, sampler=sampler, steps=steps, seed=seed,
                                        batch_size=batch_size, labels=labels, log=lambda *a: None)]
    return torch.cat(out), labels


class QualityProbe:
    """Frechet distance, its standard error (and, for the digits, the classifier's mean confidence) of samples
    against real data."""

    def __init__(self, kind: str, features, ref_mu, ref_sigma, *, classifier=None):
        self.kind, self.features, self.classifier = kind, features, classifier
        self.ref_mu, self.ref_sigma = ref_mu, ref_sigma
        self._ref_root = None  # psd_sqrt(ref_sigma), computed at the first score

    @classmethod
    def digits(cls, log=None) -> "QualityProbe":
        from .digits import DigitsClassifier

        clf = DigitsClassifier.load_or_train(log=log)
        return cls("digits", clf.features, clf.ref_mu, clf.ref_sigma, classifier=clf)

    @classmethod
    def for_data(cls, data: str, images: torch.Tensor | None = None, log=None) -> "QualityProbe | None":
        """The probe for a data source: the digits classifier for ``digits``; else Inception when its file is in
        the cache (reference: ``images``, uint8, the training set); else None (with a line through ``log``)."""
        if str(data).strip().lower() == "digits":
            return cls.digits(log=log)
        from .inception import InceptionFeatures, default_inception_path

        path = default_inception_path()
        if not path.is_file() or images is None:
            if log is not None:
                log(f"--eval-every: no feature network for {data}: the Inception file is not at {path} "
                    "(fetch it with `ddpmkit eval fid --download`); quality is not measured")
            return None
        from .fid import reference_stats

        ext = InceptionFeatures(path, progress=False)
        ref = reference_stats(ext, images, progress=False, name=str(data))
        return cls("inception", ext, ref["mu"], ref["sigma"])

    def _view(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "digits":
            return classifier_view(x, 16)
        from ..images import to_uint8

        u8 = to_uint8(x.detach().cpu())
        return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8

    def score(self, x: torch.Tensor) -> dict:
        """``fd``, ``fd_stderr`` (and ``confidence`` for the digits) of float samples in [-1, 1]."""
        imgs = self._view(x)
        if self.classifier is not None:
            feats, probs = self.classifier._run(imgs)
            conf = float(probs.max(axis=1).mean())
        else:
            feats, conf = np.asarray(self.features(imgs)), None
        mu, sigma = mean_cov(feats)
        if self._ref_root is None:
            self._ref_root = psd_sqrt(self.ref_sigma)
        out = {"fd": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma),
               "fd_stderr": frechet_stderr(feats, self.ref_mu, self.ref_sigma, ref_root=self._ref_root),
               "n": int(feats.shape[0])}
        if conf is not None:
            out["confidence"] = conf
        return out

    def measure(self, denoiser, n: int, shape, *, sampler: str, steps: int | None, seed: int = 0,
                num_classes: int | None = None, guidance: float | None = None, null_class: int | None = None,
                batch_size: int = 250) -> dict:
        """Draw ``n`` samples and score them; adds ``seconds``."""
        t0 = time.perf_counter()
        x, _ = draw_samples(denoiser, n, shape, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size,
                            num_classes=num_classes, guidance=guidance, null_class=null_class)
        res = self.score(x)
        res["seconds"] = time.perf_counter() - t0
        return res
