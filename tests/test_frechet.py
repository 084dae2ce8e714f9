"""Tests of the Frechet distance and its statistics (ddpmkit/metrics/frechet.py), shared by FID and the digits
classifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmkit.metrics.frechet import FidError, RunningStats, feature_stats, frechet_distance, mean_cov

# -- the distance


def _closed_form_diag(mu1, s1, mu2, s2):
    return float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum())


def _psd_sqrt(a):
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 3, 4, 16, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
        got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
        assert got == pytest.approx(_closed_form_diag(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)


def test_frechet_distance_rotated_and_non_commuting():
    rng = np.random.default_rng(1)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    # invariant to a common rotation
    got = frechet_distance(q @ mu1, q @ np.diag(s1) @ q.T, q @ mu2, q @ np.diag(s2) @ q.T)
    assert got == pytest.approx(_closed_form_diag(mu1, s1, mu2, s2), rel=1e-8)
    # covariances that do not commute: tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    S1, S2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    r1 = _psd_sqrt(S1)
    expect = ((mu1 - mu2) ** 2).sum() + np.trace(S1 + S2 - 2 * _psd_sqrt(r1 @ S2 @ r1))
    assert frechet_distance(mu1, S1, mu2, S2) == pytest.approx(expect, rel=1e-8)


def test_frechet_distance_singular_and_bad_inputs():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(40, 6))
    f[:, 2] = 0.0  # a feature that never fires
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # a set against itself is zero even when singular, and a shift of every mean by 1 costs D
    f = rng.normal(size=(50, 10))
    f[:, 3] = 0.0
    mu, sigma = mean_cov(f)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(mu, sigma, mu + 1.0, sigma) == pytest.approx(10.0, rel=1e-6)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


# -- statistics


def test_streaming_stats_equal_numpy():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(1003, 12)) * rng.uniform(0.5, 2, size=12) + 1e3  # a large offset
    rs = RunningStats()
    for i in range(0, len(f), 97):
        rs.update(f[i:i + 97])
    assert rs.n == 1003
    np.testing.assert_allclose(rs.mean(), f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rs.cov(), np.cov(f, rowvar=False), rtol=1e-9, atol=1e-10)
    mu, sigma = mean_cov(f)
    np.testing.assert_allclose(mu, rs.mean(), rtol=1e-12)
    np.testing.assert_allclose(sigma, rs.cov(), rtol=1e-9, atol=1e-10)

    x = torch.from_numpy(rng.integers(0, 256, size=(50, 1, 2, 2), dtype=np.uint8))
    mu, sigma, n = feature_stats(lambda b: b.reshape(b.shape[0], -1).double().numpy(),
                                 (x[i:i + 7] for i in range(0, 50, 7)), total=50, progress=False)
    ref = x.reshape(50, -1).double().numpy()
    assert n == 50
    np.testing.assert_allclose(mu, ref.mean(0))
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10)
    with pytest.raises(FidError):
        RunningStats().cov()
    with pytest.raises(FidError):
        mean_cov(f[:1])
