"""What training draws with: the sample grids and the --eval-every probe use the run's own Denoiser settings, and
the probe's Frechet distance is repeatable and comes with a standard error (issue #31)."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import tiny_cfg, tiny_run

from ddpmkit.metrics.frechet import frechet_distance, mean_cov
from ddpmkit.metrics.quality import _frechet_of_rows, frechet_stderr, psd_sqrt
from ddpmkit.train import Trainer


@pytest.mark.parametrize("opts, drawn", [(dict(variance="large"), "large"), (dict(learn_sigma=True), "learned"),
                                         (dict(variance="analytic"), "small")], ids=["large", "learned", "analytic"])
def test_grids_and_probe_draw_with_the_runs_variance(tmp_path, monkeypatch, opts, drawn):
    import ddpmkit.samplers as samplers
    from ddpmkit.metrics.quality import QualityProbe
    from ddpmkit.run import Run

    seen = {}
    real_sample = samplers.sample

    def spy_sample(denoiser, shape, **kw):
        seen["grid"] = denoiser
        seen["x"] = real_sample(denoiser, shape, **kw)
        return seen["x"]

    def spy_measure(self, denoiser, n, shape, **kw):
        seen["probe"] = denoiser
        return {"fd": 1.0, "fd_stderr": 0.1, "n": n, "seconds": 0.0}

    monkeypatch.setattr(samplers, "sample", spy_sample)
    monkeypatch.setattr(QualityProbe, "measure", spy_measure)
    cfg = tiny_cfg(steps=1, num_samples=4, sample_sampler="ddpm", sample_steps=5, **opts)
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    try:
        tr.train_step()
        tr.sample_grid()
        tr.evaluate_quality()
        tr.save()
    finally:
        tr._release_lock()
    assert seen["grid"].variance == seen["probe"].variance == drawn
    assert seen["grid"].objective == cfg.objective and seen["grid"].clip_x0
    if drawn == "small":  # analytic: no Gamma_t during training (DiffusionTask.denoiser)
        return
    # the grid is what `ddpmkit sample`'s Denoiser draws with the same sampler and noise
    run = Run.open(tmp_path / "run")
    assert run.variance == drawn
    g = torch.Generator().manual_seed(cfg.seed + 2)
    x = real_sample(run.denoiser(), seen["x"].shape, sampler="ddpm", steps=5, noise=g)
    assert torch.allclose(seen["x"], x, atol=1e-4)


def test_probe_repeats_exactly_and_has_a_standard_error(tmp_path):
    # a stochastic sampler: the noise of x_T and of every step is fixed, and so are the labels (class_cond)
    cfg = tiny_cfg(eval_n=40, eval_sampler="dpmpp-2m-sde", eval_steps=3, class_cond=True)
    tr = Trainer(cfg, tmp_path / "run", quiet=True)
    try:
        a, b = tr.evaluate_quality(), tr.evaluate_quality()
    finally:
        tr._release_lock()
    assert (a["fd"], a["fd_stderr"]) == (b["fd"], b["fd_stderr"])
    assert 0 < a["fd_stderr"] < a["fd"] and a["n"] == 40


def test_frechet_stderr_is_the_jackknife_of_frechet_distance():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 6)) * 1.2 + 0.4
    a = rng.normal(size=(6, 6))
    mu, sigma = rng.normal(size=6), a @ a.T / 6 + 0.5 * np.eye(6)
    loo = [frechet_distance(*mean_cov(np.delete(f, i, 0)), mu, sigma) for i in range(30)]
    assert frechet_stderr(f, mu, sigma) == pytest.approx(math.sqrt(29 / 30 * np.sum((loo - np.mean(loo)) ** 2)),
                                                         rel=1e-8)
    # more features than samples: the same numbers through the n x n Gram matrix and the projection onto the span
    f, mu, sigma = rng.normal(size=(12, 40)), rng.normal(size=40), np.diag(rng.uniform(0.5, 2.0, 40))
    y, tr = f @ psd_sqrt(sigma), float(np.trace(sigma))
    assert _frechet_of_rows(f, y, mu, tr) == pytest.approx(frechet_distance(*mean_cov(f), mu, sigma), rel=1e-4)
    loo = [_frechet_of_rows(np.delete(f, i, 0), np.delete(y, i, 0), mu, tr) for i in range(12)]
    assert frechet_stderr(f, mu, sigma) == pytest.approx(math.sqrt(11 / 12 * np.sum((loo - np.mean(loo)) ** 2)),
                                                         rel=1e-8)


@pytest.mark.parametrize("shift, scale", [(0.5, 1.0), (0.0, 1.5)], ids=["mean", "covariance"])
def test_frechet_stderr_matches_the_spread_of_independent_draws(shift, scale):
    # Gaussian features N(shift, scale^2 C) against the known N(0, C): the spread of the distance over 100
    # independent draws of n = 200, against the standard error that one draw gives (the mean over 5 draws)
    rng = np.random.default_rng(1)
    D, n = 8, 200
    a = rng.normal(size=(D, D))
    sigma = a @ a.T / D + 0.5 * np.eye(D)
    root = psd_sqrt(sigma)

    def draw():
        return shift + scale * rng.normal(size=(n, D)) @ root

    spread = np.std([frechet_distance(*mean_cov(draw()), np.zeros(D), sigma) for _ in range(100)], ddof=1)
    stderr = np.mean([frechet_stderr(draw(), np.zeros(D), sigma) for _ in range(5)])
    assert 0.5 < stderr / spread < 2.0


def test_metrics_csv_has_the_standard_error_and_old_files_still_plot(tmp_path):
    from ddpmkit.viz.plots import plot_loss

    run = tiny_run(tmp_path, steps=4, eval_every=2, eval_n=20, eval_steps=3, log_every=3, class_cond=True)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    se = {int(r["step"]): float(r["fd_stderr"]) for r in rows if r["fd"]}
    assert sorted(se) == [2, 4] and all(0 < v < math.inf for v in se.values())
    assert all(r["fd_stderr"] == "" for r in rows if not r["fd"])
    assert plot_loss(run / "metrics.csv", tmp_path / "loss.png").is_file()
    # a run from before the column: the same file without it
    old = tmp_path / "old.csv"
    with open(run / "metrics.csv", newline="") as f, open(old, "w", newline="") as g:
        for r in csv.reader(f):
            g.write(",".join(r[:-1]) + "\n")
    assert plot_loss(old, tmp_path / "old.png").is_file()
