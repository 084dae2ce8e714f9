"""What the benchmarks ask of the digits classifier beyond its features: a table row per set of images.

The classifier itself (network, training, cache, features) is ``ddpmkit.metrics.digits``. Here: the class
coverage and entropy of its predictions, the noise and real reference rows, the folders of PNG samples that
``bench/digits_judge.py`` reads, and a classifier two-sample test on its features (``two_sample_accuracy``, with the
class-balanced real digits it compares against, ``balanced_real_indices``).
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

__all__ = ["COVERAGE_SHARE", "DigitsRow", "balanced_real_indices", "class_coverage", "class_entropy", "evaluate",
           "load_png_dir", "noise_images", "reference_rows", "two_sample_accuracy"]

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


# ------------------------------------------------------------------------------------------ two-sample accuracy
def balanced_real_indices(labels, n: int, *, seed: int = 0, exclude=(), num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Sorted indices of ``n`` real digits with the class counts of ``n`` samples of class i mod K (sample i of digit
    i mod 10, as the benchmarks draw them), each class's drawn at random (``seed``) from the digits of that class not
    in ``exclude``. ValueError when a class has too few."""
    labels = np.asarray(labels)
    banned = np.zeros(len(labels), dtype=bool)
    banned[np.asarray(list(exclude), dtype=np.int64)] = True
    rng = np.random.RandomState(seed)
    want = np.bincount(np.arange(n) % num_classes, minlength=num_classes)
    out = []
    for c in range(num_classes):
        pool = np.flatnonzero((labels == c) & ~banned)
        if len(pool) < want[c]:
            raise ValueError(f"class {c}: {want[c]} real digits wanted, {len(pool)} available")
        out.append(pool[rng.permutation(len(pool))[:want[c]]])
    return np.sort(np.concatenate(out))


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, l2: float, iters: int) -> torch.Tensor:
    """L2-penalised logistic regression by L-BFGS: the coefficients [D + 1] (the bias last, not penalised) that
    minimise sum_i w_i log(1 + exp(-s_i z_i)) + l2 / 2 |beta|^2, s_i = 2 y_i - 1, z = x beta + b."""
    beta = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    s = 2.0 * y - 1.0
    opt = torch.optim.LBFGS([beta], lr=1.0, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ beta[:-1] + beta[-1]
        loss = (w * torch.nn.functional.softplus(-s * z)).sum() + 0.5 * l2 * beta[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return beta.detach()


def two_sample_accuracy(a, b, *, folds: int = 5, l2: float = 1e-3, iters: int = 100, seed: int = 0) -> dict:
    """A classifier two-sample test (Lopez-Paz & Oquab 2017) of feature sets ``a`` [n_a, D] and ``b`` [n_b, D]:
    how well a linear classifier, trained on part of the two sets, tells held-out members of one from the other.

    ``folds``-fold cross-validation, each set split into ``folds`` near-equal parts at random (``seed``); in each fold
    an L2-penalised logistic regression (``l2`` on the coefficients of the standardised features, the two sets
    weighted equally whatever their sizes, ``iters`` L-BFGS iterations) is fitted on the other folds (the features
    standardised by those folds' mean and spread) and predicts the held-out fold. Every point is predicted once.

    Returns ``accuracy``, the balanced held-out accuracy (the mean of the two sets' accuracies: the plain accuracy
    when n_a = n_b), 0.5 when the classifier cannot tell the sets apart and 1 when it always can; ``stderr``, its
    binomial standard error sqrt(p_a (1 - p_a) / n_a + p_b (1 - p_b) / n_b) / 2 over the n_a + n_b held-out
    predictions (it ignores the dependence between folds, which share training points); ``n_a``, ``n_b``.
    """
    fa = torch.as_tensor(np.asarray(a, np.float64))
    fb = torch.as_tensor(np.asarray(b, np.float64))
    if fa.dim() != 2 or fb.dim() != 2 or fa.shape[1] != fb.shape[1]:
        raise ValueError(f"two feature sets [n, D] of the same D, got {tuple(fa.shape)} and {tuple(fb.shape)}")
    if min(fa.shape[0], fb.shape[0]) < folds:
        raise ValueError(f"each set needs at least {folds} points (one per fold), got {fa.shape[0]} and {fb.shape[0]}")
    x = torch.cat([fa, fb])
    y = torch.cat([torch.ones(fa.shape[0], dtype=x.dtype), torch.zeros(fb.shape[0], dtype=x.dtype)])
    rng = np.random.RandomState(seed)
    fold = np.concatenate([rng.permutation(m) % folds for m in (fa.shape[0], fb.shape[0])])
    fold = torch.from_numpy(fold)
    pred = torch.empty_like(y)
    with torch.random.fork_rng(devices=[]):
        for k in range(folds):
            tr, te = fold != k, fold == k
            mu, sd = x[tr].mean(0), x[tr].std(0)
            sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))  # a feature constant on these folds: left as it is
            xs = (x - mu) / sd
            ytr = y[tr]
            w = torch.where(ytr > 0, 0.5 / ytr.sum(), 0.5 / (1 - ytr).sum())  # each set weighs one half
            beta = _fit_logistic(xs[tr], ytr, w, l2, iters)
            pred[te] = ((xs[te] @ beta[:-1] + beta[-1]) > 0).to(x.dtype)
    na, nb = fa.shape[0], fb.shape[0]
    pa = float((pred[:na] == 1).to(x.dtype).mean())
    pb = float((pred[na:] == 0).to(x.dtype).mean())
    return {"accuracy": 0.5 * (pa + pb), "stderr": 0.5 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb),
            "n_a": int(na), "n_b": int(nb)}
