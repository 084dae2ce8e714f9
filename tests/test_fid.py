"""Tests of FID (ddpmkit/metrics/fid.py, inception.py): the Inception plumbing with a TorchScript stand-in, the
reference-statistics cache, the errors, and evaluate_fid end to end. The Frechet distance and its statistics are
tested in test_frechet.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddpmkit.errors import DdpmkitError
from ddpmkit.files import sha256_file
from ddpmkit.metrics import fid, inception
from ddpmkit.metrics.frechet import FidError
from ddpmkit.generate import SampleOptions
from conftest import tiny_run

# -- the TorchScript stand-in for Inception


class _StandIn(torch.nn.Module):
    """The Inception interface: uint8 [N, 3, H, W] of any size in, [N, D] features out."""

    def __init__(self, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(48, dim, generator=g) / 7.0, requires_grad=False)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3:
            raise RuntimeError("expected uint8 images with 3 channels")
        y = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 127.5 - 1.0, (4, 4)).flatten(1)
        return 1.0 + torch.tanh(y @ self.proj)  # non-negative, as the real pool features (after a ReLU)


@pytest.fixture(autouse=True)
def _standin_interface(monkeypatch, tmp_path):
    """The stand-in's 16 features pass the known-input check of 2048; the Inception hash record of each test goes
    to its own folder, not the user's cache."""
    monkeypatch.setattr(inception, "INCEPTION_DIM", 16)
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / inception.INCEPTION_FILENAME
    torch.jit.save(torch.jit.script(_StandIn()), str(path))
    return path


def test_inception_features_plumbing(standin):
    ext = inception.InceptionFeatures(standin)
    assert ext.key.startswith("inception-") and len(ext.sha256) == 64
    gray = torch.randint(0, 256, (5, 1, 9, 9), dtype=torch.uint8)
    f = ext(gray)
    assert f.dtype == np.float64 and f.shape == (5, 16)
    np.testing.assert_allclose(f, ext(gray.repeat(1, 3, 1, 1)))  # grayscale is repeated to 3 channels
    with pytest.raises(FidError, match="uint8"):
        ext(gray.float())


def test_missing_inception_is_one_line_with_the_url(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / inception.INCEPTION_FILENAME
    with pytest.raises(inception.InceptionMissingError) as ei:
        inception.load_inception(missing)
    msg = str(ei.value)
    assert isinstance(ei.value, DdpmkitError) and "\n" not in msg
    assert inception.INCEPTION_URL in msg and inception.INCEPTION_URL.endswith(".pt") and str(missing) in msg
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    assert inception.default_inception_path() == tmp_path / "cache" / inception.INCEPTION_FILENAME
    with pytest.raises(inception.InceptionMissingError):
        inception.load_inception()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a network")
    with pytest.raises(FidError, match="not a TorchScript network") as ei:
        inception.load_inception(bad)
    assert "\n" not in str(ei.value)


def test_download_offline_fails_cleanly(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / inception.INCEPTION_FILENAME
    with pytest.raises(FidError, match="could not download") as ei:
        inception.load_inception(dest, download=True)
    assert "\n" not in str(ei.value) and inception.INCEPTION_URL in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# -- reference statistics: cache hit, invalidation, corruption


class _Counting:
    key = "counting-v1"

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return x.reshape(x.shape[0], -1)[:, :4].double().numpy()


def test_reference_stats_cache(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8, generator=g)
    ext = _Counting()
    first = fid.reference_stats(ext, imgs, cache_dir=tmp_path, batch_size=8, progress=False)
    assert not first["from_cache"] and ext.calls == 4 and first["path"].is_file()

    def no_recompute(*a, **k):
        raise AssertionError("reference features recomputed despite a valid cache")

    with monkeypatch.context() as m:
        m.setattr(fid, "feature_stats", no_recompute)
        hit = fid.reference_stats(ext, imgs.clone(), cache_dir=tmp_path, progress=False)
    assert hit["from_cache"] and hit["n"] == 30
    np.testing.assert_array_equal(hit["mu"], first["mu"])
    np.testing.assert_array_equal(hit["sigma"], first["sigma"])

    changed = imgs.clone()
    changed[3, 0, 1, 2] ^= 1  # one pixel of one image: different content, different statistics
    miss = fid.reference_stats(ext, changed, cache_dir=tmp_path, progress=False)
    assert not miss["from_cache"] and miss["key"] != first["key"]

    class Other(_Counting):
        key = "counting-v2"  # another feature extractor: never the same statistics

    assert not fid.reference_stats(Other(), imgs, cache_dir=tmp_path, progress=False)["from_cache"]

    first["path"].write_bytes(b"garbage")  # a corrupt cache file is ignored and rebuilt
    rebuilt = fid.reference_stats(ext, imgs, cache_dir=tmp_path, progress=False)
    assert not rebuilt["from_cache"]
    np.testing.assert_allclose(rebuilt["mu"], first["mu"])
    assert fid.reference_stats(ext, imgs, cache_dir=tmp_path, progress=False)["from_cache"]


# -- evaluate_fid end to end


def _tiny_run(root, image_size):
    # conftest's tiny configuration as this file trained it before (no dropout, the digits preset's lr and warm-up)
    return tiny_run(root, f"run{image_size}", image_size=image_size, steps=2, log_every=1, dropout=0.0, lr=2e-3,
                    warmup=50)


def test_evaluate_fid_with_the_stand_in(tmp_path, standin):
    run = _tiny_run(tmp_path, 8)
    opts = SampleOptions(sampler="ddim", steps=5)
    kw = dict(n=12, reference="digits", inception_path=standin, sample_options=opts, batch_size=5,
              cache_dir=tmp_path / "cache", progress=False)
    r = fid.evaluate_fid(run, **kw)
    assert r["fid"] > 0 and np.isfinite(r["fid"]) and r["n"] == 12 and r["n_reference"] == 1797
    assert r["features"] == "inception" and r["sampler"] == "ddim" and r["steps"] == 5 and r["eta"] == 0.0
    assert not r["reference_from_cache"] and r["sample_seconds"] > 0 and r["score_seconds"] > 0
    assert r["inception_sha256"] == sha256_file(standin)
    again = fid.evaluate_fid(run, **kw)
    assert again["reference_from_cache"] and again["fid"] == pytest.approx(r["fid"], rel=1e-12)  # seeded
    other_seed = fid.evaluate_fid(run, **{**kw, "seed": 1})
    assert other_seed["fid"] != r["fid"]
    # sample i comes from the noise stream (seed, i): the batch size does not change the samples
    other_batch = fid.evaluate_fid(run, **{**kw, "batch_size": 12})
    assert other_batch["fid"] == pytest.approx(r["fid"], rel=1e-6)
    with pytest.raises(inception.InceptionMissingError):
        fid.evaluate_fid(run, **{**kw, "inception_path": tmp_path / "missing.pt"})
    with pytest.raises(DdpmkitError, match="features"):
        fid.evaluate_fid(run, **{**kw, "features": "vgg"})
    rgb = tiny_run(tmp_path, "rgb", channels=3, steps=1, num_groups=4)
    with pytest.raises(DdpmkitError, match="1xSxS"):  # the judge reads grey square digits (resized to 16x16)
        fid.evaluate_fid(rgb, **{**kw, "features": "digits", "judge_epochs": 1})


def test_evaluate_fid_digits_with_noise_floor(tmp_path):
    run = _tiny_run(tmp_path, 16)
    r = fid.evaluate_fid(run, n=20, features="digits", judge_epochs=2, sample_options=SampleOptions(steps=4),
                         batch_size=10, cache_dir=tmp_path / "cache", progress=False)
    assert r["features"] == "digits" and r["n"] == 20 and r["n_reference"] == 1438
    assert r["noise_floor_n"] == 359 and 0 < r["noise_floor"] < r["noise_floor_at_n"]
    assert r["fid"] > r["noise_floor_at_n"]  # two training steps make noise, far from real digits
    assert list((tmp_path / "cache").glob("judge-*.safetensors"))


def test_cli_eval_fid(tmp_path, standin, capsys, monkeypatch):
    from ddpmkit.cli import main

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    run = _tiny_run(tmp_path, 8)
    argv = ["eval", "fid", str(run), "--n", "6", "--batch-size", "3", "--inception", str(standin),
            "--reference", "digits", "--steps", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FID (inception features, protocol custom, not ddpm-paper: ddim sampler; 4 steps of T = 40; 6 samples;" \
        in out and "6 samples (ddim, 4 steps, eta 0, uniform spacing)" in out
    assert main(argv[:-2] + ["--sampler", "ddpm", "--variance", "large"]) == 0
    assert "ddpm, large variance" in capsys.readouterr().out
    assert main(argv[:3] + ["--inception", str(tmp_path / "nope.pt")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "inception-2015-12-05.pt" in err
