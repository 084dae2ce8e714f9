"""Tests of the digits classifier (ddpmkit/metrics/digits.py), its table's rows (bench/digits_tools.py) and the table
(bench/digits_judge.py): coverage, the classifier, its cache, its CLI. The Frechet distance is test_frechet.py's."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmkit.metrics import digits as dj  # the classifier itself
from ddpmkit.metrics.frechet import frechet_distance, mean_cov

_PATH = Path(__file__).resolve().parents[1] / "bench" / "digits_judge.py"  # its table and command line
_spec = importlib.util.spec_from_file_location("digits_judge", _PATH)
cli = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("digits_judge", cli)
_spec.loader.exec_module(cli)  # which puts bench/ on sys.path, for the helpers it imports
import digits_tools as tools  # noqa: E402  (the rows of the table: coverage, entropy, noise, folders of PNGs)

FAST_EPOCHS = 5  # enough for > 95% held-out accuracy; the CLI's default trains longer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("judge-cache")


@pytest.fixture(scope="module")
def judge(cache_dir):
    threads = torch.get_num_threads()
    j = dj.DigitsClassifier.load_or_train(epochs=FAST_EPOCHS, cache_dir=cache_dir)  # trains on one thread ...
    assert torch.get_num_threads() == threads  # ... and gives the caller's setting back
    return j


# -- coverage and entropy


def test_coverage_and_entropy():
    balanced = np.repeat(np.arange(10), 7)
    assert tools.class_coverage(balanced) == 10
    assert tools.class_entropy(balanced) == pytest.approx(1.0)
    one = np.full(70, 4)
    assert tools.class_coverage(one) == 1
    assert tools.class_entropy(one) == pytest.approx(0.0)
    # 100 predictions: a class needs at least 100 / 10 / 3 = 3.33, i.e. 4 of them
    pred = np.concatenate([np.full(88, 0), np.full(4, 1), np.full(3, 2), np.full(5, 3)])
    assert tools.class_coverage(pred) == 3
    assert tools.class_entropy(np.array([0, 1])) == pytest.approx(math.log(2) / math.log(10))


def test_noise_images_are_quantized_like_samples():
    from ddpmkit.images import to_uint8

    x = tools.noise_images(8, "gaussian", seed=5)
    ref = to_uint8(torch.randn((8, 1, 16, 16), generator=torch.Generator().manual_seed(5)))
    assert x.dtype == torch.uint8 and torch.equal(x, ref)
    u = tools.noise_images(8, "uniform", seed=5)
    assert u.shape == (8, 1, 16, 16) and u.dtype == torch.uint8


def test_stratified_split_is_stratified_and_deterministic():
    labels = np.repeat(np.arange(10), 50)
    tr, te = dj.stratified_split(labels, 0.2, seed=3)
    assert len(te) == 100 and len(set(tr) | set(te)) == 500 and not set(tr) & set(te)
    assert np.all(np.bincount(labels[te]) == 10)
    tr2, te2 = dj.stratified_split(labels, 0.2, seed=3)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)


def test_random_shift_moves_whole_images():
    x = torch.full((4, 1, 16, 16), -1.0)
    x[:, :, 8, 8] = 1.0
    y = dj.random_shift(x, 2, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for img in y:
        r, c = (img[0] == 1.0).nonzero()[0].tolist()
        assert abs(r - 8) <= 2 and abs(c - 8) <= 2 and int((img == 1.0).sum()) == 1
    assert torch.equal(dj.random_shift(x, 0, torch.Generator()), x)


# -- the trained judge


def test_judge_accuracy(judge):
    assert judge.test_accuracy > 0.9
    assert len(judge.test_idx) + len(judge.train_idx) == 1797


def test_fd_self_is_zero_and_real_is_far_from_noise(judge):
    f = judge.test_feats
    mu, sigma = mean_cov(f)
    assert frechet_distance(mu, sigma, mu, sigma) < 1e-6 * max(1.0, np.trace(sigma))
    fd_real = judge.fd(judge.test_images)
    fd_noise = judge.fd(tools.noise_images(len(judge.test_idx), "gaussian"))
    fd_uniform = judge.fd(tools.noise_images(len(judge.test_idx), "uniform"))
    assert fd_real * 10 < fd_noise and fd_real * 10 < fd_uniform


def test_coverage_of_real_digits_and_of_one_repeated_digit(judge):
    real = tools.evaluate(judge, judge.test_images, "real")
    assert real.coverage == 10 and real.entropy > 0.95 and real.confidence > 0.8
    one = tools.evaluate(judge, judge.test_images[:1].repeat(100, 1, 1, 1), "one digit")
    assert one.coverage == 1 and one.entropy == pytest.approx(0.0)


def test_judge_is_cached_and_reloads_identically(judge, cache_dir):
    files = list(Path(cache_dir).glob("judge-*.safetensors"))
    assert [f.name for f in files] == [f"judge-{judge.key}.safetensors"]
    again = dj.DigitsClassifier.load_or_train(epochs=FAST_EPOCHS, cache_dir=cache_dir)
    assert again.from_cache and again.key == judge.key
    assert np.array_equal(again.test_feats, judge.test_feats)
    assert again.test_accuracy == judge.test_accuracy


def _no_training(net, x, y, *, epochs, seed, log=None, **kwargs):
    net.eval()  # the seeded initial weights stand in for a trained judge: this test is about the cache


def test_corrupt_cache_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setattr(dj, "_train", _no_training)
    j = dj.DigitsClassifier.load_or_train(epochs=1, cache_dir=tmp_path)
    assert not j.from_cache
    path = tmp_path / f"judge-{j.key}.safetensors"
    assert path.is_file()
    path.write_bytes(b"garbage")
    logs = []
    j2 = dj.DigitsClassifier.load_or_train(epochs=1, cache_dir=tmp_path, log=logs.append)
    assert not j2.from_cache and any("unreadable cache" in m for m in logs)
    assert np.array_equal(j2.test_feats, j.test_feats)  # seeded
    assert dj.DigitsClassifier.load_or_train(epochs=1, cache_dir=tmp_path).from_cache  # and was cached again


def test_folder_of_pngs_and_cli(judge, cache_dir, tmp_path, capsys):
    from PIL import Image

    d = tmp_path / "samples"
    d.mkdir()
    imgs = judge.real_subset(40).numpy()
    for i, a in enumerate(imgs):
        Image.fromarray(a[0], mode="L").save(d / f"sample_{i:05d}.png")
    (d / "notes.txt").write_text("not an image")
    Image.new("L", (530, 530)).save(d / "grid.png")  # ddpmkit sample writes a grid beside the samples
    loaded = tools.load_png_dir(d)
    assert torch.equal(loaded, torch.from_numpy(imgs))
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(imgs[0, 0], mode="L").save(plain / "x.png")
    assert torch.equal(tools.load_png_dir(plain), torch.from_numpy(imgs[:1]))
    with pytest.raises(dj.DigitsError, match="530x530"):
        tools.load_png_dir(d, pattern="*.png")

    rc = cli.main([str(d), "--epochs", str(FAST_EPOCHS), "--cache-dir", str(cache_dir),
                  "--json", str(tmp_path / "out.json")])
    captured = capsys.readouterr()
    assert rc == 0
    assert "held-out accuracy" in captured.err
    lines = captured.out.splitlines()
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines]
    assert rows[0] == ["source", "N", "confidence", "coverage", "entropy", "FD"]
    assert [r[0] for r in rows[1:]] == ["real (held out)", "real, n=40", "gaussian noise", "uniform noise", str(d)]
    assert rows[-1][1] == "40" and rows[-1][3] == "10/10"
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["rows"][-1]["n"] == 40 and data["judge"]["test_accuracy"] == judge.test_accuracy


def test_cli_bad_folder_is_one_line(cache_dir, tmp_path, capsys):
    rc = cli.main([str(tmp_path / "missing"), "--epochs", str(FAST_EPOCHS), "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: no such directory")
    big = tmp_path / "big"
    big.mkdir()
    from PIL import Image

    Image.new("L", (32, 32)).save(big / "a.png")
    rc = cli.main([str(big), "--epochs", str(FAST_EPOCHS), "--cache-dir", str(cache_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "32x32" in err[0]


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_digits_quality.py"
    spec = importlib.util.spec_from_file_location("bench_digits_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_demo(root: Path, ddpm: torch.Tensor, ddim: torch.Tensor) -> None:
    from PIL import Image

    for sub, imgs in (("samples_ddpm", ddpm), ("samples_ddim", ddim)):
        (root / sub).mkdir(parents=True)
        for i, a in enumerate(imgs.numpy()):
            Image.fromarray(a[0], mode="L").save(root / sub / f"sample_{i:05d}.png")


def test_quality_bench_judges_a_demo_folder(judge, cache_dir, tmp_path, capsys, monkeypatch):
    bench = _load_bench()
    _fake_demo(tmp_path / "demo", judge.real_subset(30), tools.noise_images(30))
    args = ["--epochs", str(FAST_EPOCHS), "--cache-dir", str(cache_dir)]
    assert bench.main(["--dir", str(tmp_path / "demo"), *args]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    last = out[-1].split()
    assert last[0] == "FD" and last[1] == "DDIM" and last[3] == "DDPM"
    assert float(last[2]) > 5 * float(last[4])  # noise (as "DDIM") is far worse than real digits (as "DDPM")

    calls = []

    def failing_demo(out, train_seconds, n):  # samples written, then a later step of the demo fails
        calls.append((train_seconds, n))
        _fake_demo(out, judge.real_subset(20), judge.real_subset(20, seed=1))
        return 2

    monkeypatch.setattr(bench, "run_demo", failing_demo)
    assert bench.main(["--out", str(tmp_path / "new"), "--train-seconds", "7", "--n", "20", *args]) == 1
    assert calls == [(7.0, 20)]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FD  DDIM ")
