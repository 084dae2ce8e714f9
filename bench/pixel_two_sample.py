"""A classifier two-sample test on pixels: a small CNN, trained on part of two image sets, tells the rest apart.

The test on the digits classifier's 64 features (``digits_tools.two_sample_accuracy``) sees what a digit classifier
sees: shapes, classes, their spread. It is blind to what that classifier learnt to ignore: the texture of strokes,
a faint grain in the background, edges a little too sharp or too soft. A network trained on the pixels themselves to
tell the two sets apart (Lopez-Paz & Oquab 2017, with a CNN as the classifier) sees whatever differs, so it stays
sharp where the features' test sits at its floor.

``pixel_two_sample_accuracy(a, b)``: uint8 images [n, C, H, W] of the same shape (samples as they would be saved, and
real images at the same size); ``folds``-fold cross-validation, each set split into near-equal folds at random
(``seed``); in each fold a fresh critic is trained on the other folds for ``epochs`` epochs (Adam, lr 1e-3, batches
of 64, the logistic loss with each set weighing one half) and predicts the held-out fold. Every image is predicted
once. The critic: three 3x3 convolutions (32, 64, 64 channels, the second with stride 2) with SiLU, a global mean,
one linear output; pixels scaled to [-1, 1]; no augmentation. Returns the balanced held-out accuracy (0.5: the
critic cannot tell the sets apart, 1: it always can), its binomial standard error, n_a and n_b, as
``two_sample_accuracy`` does. Deterministic for a seed, on one thread.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["PIXEL_TEST", "pixel_two_sample_accuracy"]

PIXEL_TEST = dict(folds=5, epochs=30, lr=1e-3, batch_size=64)  # the settings, recorded with each result


def _critic(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 1))


def _fit(x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch_size: int, gen: torch.Generator):
    net = _critic(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    w = torch.where(y > 0, 0.5 / y.sum(), 0.5 / (1 - y).sum()) * len(y)  # each set weighs one half
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            j = order[i:i + batch_size]
            loss = (w[j] * nn.functional.binary_cross_entropy_with_logits(net(x[j]).squeeze(1), y[j],
                                                                           reduction="none")).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


def pixel_two_sample_accuracy(a, b, *, folds: int = 5, epochs: int = 30, lr: float = 1e-3, batch_size: int = 64,
                              seed: int = 0) -> dict:
    """The held-out accuracy of a CNN telling uint8 images ``a`` from ``b`` (module docstring)."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.dim() != 4 or a.shape[1:] != b.shape[1:]:
        raise ValueError(f"two uint8 image sets [n, C, H, W] of one shape, got {tuple(a.shape)} {a.dtype} and "
                         f"{tuple(b.shape)} {b.dtype}")
    if min(len(a), len(b)) < folds:
        raise ValueError(f"each set needs at least {folds} images (one per fold), got {len(a)} and {len(b)}")
    x = torch.cat([a, b]).float() / 127.5 - 1.0
    y = torch.cat([torch.ones(len(a)), torch.zeros(len(b))])
    rng = np.random.RandomState(seed)
    fold = torch.from_numpy(np.concatenate([rng.permutation(m) % folds for m in (len(a), len(b))]))
    pred = torch.empty_like(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the result depends on the seed only
    try:
        with torch.random.fork_rng(devices=[]):
            for k in range(folds):
                torch.manual_seed(seed * 1000 + k)
                gen = torch.Generator().manual_seed(seed * 1000 + k)
                tr, te = fold != k, fold == k
                net = _fit(x[tr], y[tr], epochs=epochs, lr=lr, batch_size=batch_size, gen=gen)
                with torch.no_grad():
                    pred[te] = (net(x[te]).squeeze(1) > 0).float()
    finally:
        torch.set_num_threads(threads)
    na, nb = len(a), len(b)
    pa = float((pred[:na] == 1).float().mean())
    pb = float((pred[na:] == 0).float().mean())
    return {"accuracy": 0.5 * (pa + pb), "stderr": 0.5 * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb),
            "n_a": int(na), "n_b": int(nb)}
