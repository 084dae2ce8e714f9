"""The digits classifier: a small CNN trained on the real 16x16 digits (never on samples), whose penultimate
features stand in for Inception in a Frechet distance on the digits (``ddpmkit eval fid --features digits``),
and whose predictions measure confidence and class coverage. (Earlier versions called it "the digits judge";
its cache files keep that name.)

The classifier is trained on the 1,797 scikit-learn digits at 16x16 (``load_dataset("digits")``, scaled to
[-1, 1] as ddpmkit scales them), with random shifts of up to 2 pixels as augmentation. A stratified 20% of the
digits (359) is held out to measure its accuracy (about 99%). Its weights are cached as safetensors under
``$DDPMKIT_CACHE`` (or ``~/.cache/ddpmkit``) in ``judge-<key>.safetensors``, where the key hashes the
classifier's version, its training code, its settings (seed, epochs) and the digits themselves, so that a
second run loads it instantly and a change to any of these trains a new one.

For a set of images (uint8 [N, 1, 16, 16]) it gives its class predictions and ``fd``, the Frechet distance
between Gaussians fitted to the penultimate features (64 after a ReLU) of the set and of the reference, the
classifier's *training split* (1,438 real digits), so that the held-out split (359 real digits) measured against
it gives an honest floor. A Frechet distance estimated from N samples is biased upwards by roughly 1/N; compare
sets of equal size.

``DigitsFeatures`` wraps a classifier as a feature extractor with the interface of
``metrics.inception.InceptionFeatures`` (uint8 NCHW in, float64 [N, D] out, and a ``key`` naming its
identity). The benchmarks' table (confidence, class coverage, noise rows) lives in ``bench/digits_tools.py`` and
``bench/digits_judge.py``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DdpmkitError
from ..files import cache_dir as _cache_dir
from .frechet import FidError, frechet_distance, mean_cov

__all__ = [
    "CLASSIFIER_VERSION",
    "DigitsClassifier",
    "DigitsError",
    "DigitsFeatures",
    "DigitsNet",
    "real_digits",
    "stratified_split",
]

# Bump when the classifier's meaning changes in a way the hashed source below would not show.
CLASSIFIER_VERSION = 2
IMAGE_SIZE = 16
NUM_CLASSES = 10
FEATURE_DIM = 64
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 20
TEST_FRACTION = 0.2
MAX_SHIFT = 2
BATCH_SIZE = 64
LR = 3e-3


class DigitsError(FidError):
    """A problem a user can cause (a bad folder, a bad image); the CLI prints it as one line."""


# --------------------------------------------------------------------------------------------------
# The network


class DigitsNet(nn.Module):
    """16x16x1 -> two conv stages (16 then 32 channels, 2x2 max-pool after each) -> 64 features -> 10."""

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                  # 8x8
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                  # 4x4
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, feature_dim), nn.ReLU(),    # the penultimate features
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] -> float32 in [-1, 1] (ddpmkit's data scaling, x / 127.5 - 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by its own random (dy, dx) in [-max_shift, max_shift], filling with black (-1)."""
    if max_shift <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]          # [B, 1, H, 1]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]          # [B, 1, 1, W]
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def stratified_split(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                     seed: int = DEFAULT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices with ``round(test_fraction * n_c)`` of each class c in the test split."""
    labels = np.asarray(labels)
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread, then restore the setting. The classifier is tiny, and on a machine busy with
    other jobs two threads waiting on each other were ten times slower than one (600 vs 55 ms a training
    step); with one thread the float sums, hence the trained weights, do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(net: DigitsNet, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
           batch_size: int = BATCH_SIZE, lr: float = LR, log=None) -> None:
    """AdamW, one-cycle learning rate (warm-up, then cosine decay), random shifts; randomness from ``seed``;
    on one thread (see ``one_thread``)."""
    with one_thread():
        _train_loop(net, x, y, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, log=log)


def _train_loop(net, x, y, *, epochs, seed, batch_size, lr, log) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1), pct_start=0.15)
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        tot_loss = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = random_shift(x[idx], MAX_SHIFT, gen)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % 10 == 0):
            log(f"digits classifier: epoch {epoch + 1}/{epochs}, loss {tot_loss / n:.4f}")
    net.eval()


# --------------------------------------------------------------------------------------------------
# Inputs


NATIVE_SIZE = 8  # the scikit-learn digits' own side: such images are brought to 16x16 first


def to_classifier_size(x: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, S, S] of another side than 16 (8: a model trained on the native digits; 32: a latent run's
    digits) -> [N, 1, 16, 16], resized as the data source resizes the digits (bicubic on uint8: for 8x8 exactly how
    the classifier's 16x16 training digits were made); other shapes unchanged."""
    if (x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 1 and x.shape[2] == x.shape[3]
            and x.shape[2] != IMAGE_SIZE and x.shape[2] >= NATIVE_SIZE):
        from ..data.common import _resize_uint8

        return _resize_uint8(x, IMAGE_SIZE)
    return x


def _check_images(images) -> torch.Tensor:
    x = to_classifier_size(torch.as_tensor(images))
    if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise DigitsError(f"the digits classifier reads uint8 [N, 1, S, S] images (S >= 8, resized to 16), "
                          f"got {x.dtype} {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------
# The classifier


@functools.lru_cache(maxsize=1)
def real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 real digits as ddpmkit loads them: uint8 [N, 1, 16, 16] and int64 labels [N] (read once)."""
    from ..data import load_dataset

    ds = load_dataset("digits", image_size=IMAGE_SIZE, progress=False)
    return ds.images.contiguous(), ds.labels.to(torch.int64)


def _classifier_key(seed: int, epochs: int, images: torch.Tensor, labels: torch.Tensor) -> str:
    """Hash of everything that decides the trained weights: version, training code, settings, data."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CLASSIFIER_VERSION, "seed": seed, "epochs": epochs, "test": TEST_FRACTION,
                         "shift": MAX_SHIFT, "features": FEATURE_DIM,
                         "batch_size": BATCH_SIZE, "lr": LR}, sort_keys=True).encode())
    for obj in (DigitsNet, random_shift, stratified_split, _train, _train_loop, to_float):
        h.update(inspect.getsource(obj).encode())
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


class DigitsClassifier:
    """A trained digits classifier with its data split and the reference feature statistics (its training
    split)."""

    def __init__(self, net: DigitsNet, images: torch.Tensor, labels: torch.Tensor, train_idx, test_idx,
                 *, seed: int, epochs: int, key: str, from_cache: bool, train_seconds: float):
        self.net = net.eval()
        self.images, self.labels = images, labels
        self.train_idx, self.test_idx = np.asarray(train_idx), np.asarray(test_idx)
        self.seed, self.epochs, self.key = seed, epochs, key
        self.from_cache, self.train_seconds = from_cache, train_seconds
        self.train_images = images[torch.from_numpy(self.train_idx)]
        self.test_images = images[torch.from_numpy(self.test_idx)]
        self.test_labels = labels[torch.from_numpy(self.test_idx)]
        self.ref_feats = self.features(self.train_images)
        self.ref_mu, self.ref_sigma = mean_cov(self.ref_feats)
        self.test_feats, probs = self._run(self.test_images)
        self.test_accuracy = float((probs.argmax(axis=1) == self.test_labels.numpy()).mean())

    # -- construction
    @classmethod
    def load_or_train(cls, *, seed: int = DEFAULT_SEED, epochs: int = DEFAULT_EPOCHS, cache_dir=None,
                      use_cache: bool = True, log=None) -> "DigitsClassifier":
        """The classifier for (seed, epochs): from the cache when it is there, else trained (and cached)."""
        images, labels = real_digits()
        train_idx, test_idx = stratified_split(labels.numpy(), TEST_FRACTION, seed)
        key = _classifier_key(seed, epochs, images, labels)
        base = Path(cache_dir).expanduser() if cache_dir is not None else _cache_dir()
        path = base / f"judge-{key}.safetensors"
        net = DigitsNet()
        if use_cache and path.is_file():
            try:
                _load_weights(net, path, key)
                return cls(net, images, labels, train_idx, test_idx, seed=seed, epochs=epochs, key=key,
                           from_cache=True, train_seconds=0.0)
            except Exception as e:
                if log is not None:
                    log(f"digits classifier: ignoring the unreadable cache file {path} "
                        f"({type(e).__name__}: {e})")
                net = DigitsNet()
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the global RNG (init, dropout) is seeded, then restored
            torch.manual_seed(seed)
            net = DigitsNet()
            tr = torch.from_numpy(train_idx)
            _train(net, to_float(images[tr]), labels[tr], epochs=epochs, seed=seed, batch_size=BATCH_SIZE,
                   lr=LR, log=log)
        secs = time.perf_counter() - t0
        clf = cls(net, images, labels, train_idx, test_idx, seed=seed, epochs=epochs, key=key,
                  from_cache=False, train_seconds=secs)
        if use_cache:
            _save_weights(net, path, key, {"seed": str(seed), "epochs": str(epochs),
                                           "test_accuracy": f"{clf.test_accuracy:.6f}"}, log)
        return clf

    # -- inference
    @torch.no_grad()
    def _run(self, images, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        x = _check_images(images)
        feats, probs = [], []
        with one_thread():
            for i in range(0, x.shape[0], batch_size):
                f = self.net.features(to_float(x[i:i + batch_size]))
                feats.append(f)
                probs.append(torch.softmax(self.net.head(f), dim=1))
        if not feats:
            return np.zeros((0, FEATURE_DIM)), np.zeros((0, NUM_CLASSES))
        return torch.cat(feats).double().numpy(), torch.cat(probs).double().numpy()

    def features(self, images) -> np.ndarray:
        """Penultimate features, float64 [N, 64]."""
        return self._run(images)[0]

    def predict_proba(self, images) -> np.ndarray:
        return self._run(images)[1]

    def predict(self, images) -> np.ndarray:
        return self.predict_proba(images).argmax(axis=1)

    def fd(self, images=None, *, feats=None) -> float:
        """Frechet distance of a set's features to the reference (the real training split)."""
        f = self.features(images) if feats is None else feats
        mu, sigma = mean_cov(f)
        return frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)

    def real_subset(self, n: int, seed: int = 0) -> torch.Tensor:
        """``n`` held-out real digits (a seeded random subset of the test split, all of it if n >= 360)."""
        if n >= len(self.test_idx):
            return self.test_images
        g = torch.Generator().manual_seed(seed)
        return self.test_images[torch.randperm(len(self.test_idx), generator=g)[:n]]


def _save_weights(net: nn.Module, path: Path, key: str, meta: dict, log=None) -> None:
    from ..store import atomic_save_safetensors

    state = {k: v.detach() for k, v in net.state_dict().items()}
    metadata = {"key": key, "format": f"ddpmkit-digits-judge-v{CLASSIFIER_VERSION}", **meta}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(state, path, metadata=metadata)
    except (OSError, DdpmkitError) as e:  # a cache that cannot be written costs time next run, not a result
        if log is not None:
            log(f"digits classifier: could not cache the weights in {path} "
                f"({getattr(e, 'strerror', None) or e})")


def _load_weights(net: nn.Module, path: Path, key: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            raise ValueError("the key stored in the file does not match")
        state = {k: f.get_tensor(k) for k in f.keys()}
    net.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------
# The classifier as a feature extractor for metrics.fid


class DigitsFeatures:
    """The classifier's penultimate features as a feature extractor: uint8 [N, 1, 16, 16] in, float64
    [N, 64] out, the interface of ``metrics.inception.InceptionFeatures``. ``key`` names the trained weights
    (the classifier's cache key), so cached reference statistics are tied to this very classifier."""

    kind = "digits"

    def __init__(self, classifier: DigitsClassifier):
        self.classifier = classifier
        self.dim = FEATURE_DIM
        self.key = f"digits-judge-{classifier.key}"

    def __call__(self, images) -> np.ndarray:
        return self.classifier.features(images)
