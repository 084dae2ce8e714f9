"""`ddpmkit report`: a self-contained page, checked in a real headless Chromium."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.train import Trainer, config_from_preset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = config_from_preset("digits", image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                             num_groups=4, T=40, batch_size=8, steps=4, log_every=1, num_samples=4,
                             sample_steps=4, checkpoint_every=4, sample_every=100)
    Trainer(cfg, run, quiet=True).run()
    assert main(["sample", str(run), "--steps", "4", "--n", "4", "--gif", str(run / "ddim.gif"), "--quiet"]) == 0
    assert main(["report", str(run)]) == 0
    return run


def test_report_is_self_contained(reported_run):
    page = (reported_run / "report.html").read_text()
    # every picture is embedded: no reference to a file or the network
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page
    for needle in ["Configuration", "Training", "Samples", "Sampling chains", "Noise schedules"]:
        assert needle in page


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no Chromium on this machine")
def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    assert CHROMIUM, "CI installs Debian's chromium in .ci/run"
    url = (reported_run / "report.html").resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    n_images = int(re.search(r'data-images="(\d+)"', body).group(1))
    n_broken = int(re.search(r'data-broken="(\d+)"', body).group(1))
    assert n_images >= 4 and n_broken == 0, body  # every image decoded: naturalWidth > 0
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1000,1600", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.shape == (1600, 1000)
    assert px.std() > 10  # not blank: text, curves and samples


def _nonblank_png(path):
    with Image.open(path) as im:
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.std() > 5, path
    return px.shape


def test_plot_commands_write_pictures(reported_run, tmp_path, capsys):
    assert main(["plot", "schedule", "--T", "100", "--out", str(tmp_path / "s.png")]) == 0
    assert main(["plot", "forward", "--t", "0,10,50,99", "--T", "100", "--out", str(tmp_path / "f.png")]) == 0
    assert main(["plot", "loss", str(reported_run), "--out", str(tmp_path / "l.png")]) == 0
    for name in ["s.png", "f.png", "l.png"]:
        h, w = _nonblank_png(tmp_path / name)
        assert h > 200 and w > 200
    img = tmp_path / "one.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["plot", "forward", "--image", str(img), "--out", str(tmp_path / "g.png")]) == 0
    _nonblank_png(tmp_path / "g.png")
    # the sampling GIF of the fixture: 4 DDIM steps, each recorded, plus the initial noise
    with Image.open(reported_run / "ddim.gif") as im:
        assert im.n_frames == 5
    capsys.readouterr()
    assert main(["plot", "loss", str(tmp_path)]) != 0  # not a run: one clear line
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
