"""`ddpmkit report`: a self-contained page, checked in a real headless Chromium."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from ddpmkit.cli import build_parser, main
from ddpmkit.store import read_config
from ddpmkit.train import Trainer, TrainConfig, config_from_preset
from ddpmkit.train.config import changed_settings
from ddpmkit.viz.report import SECTIONS
from ddpmkit.viz.summary import figure, summarize

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    cfg = config_from_preset("digits", image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                             num_groups=4, T=40, batch_size=8, steps=4, log_every=1,
                             sample_steps=4, checkpoint_every=4, sample_every=100, class_cond=True, num_samples=30,
                             eval_every=2, eval_n=20, eval_steps=3, lr=1e-3)
    Trainer(cfg, run, quiet=True).run()
    assert main(["sample", str(run), "--steps", "4", "--n", "1", "--gif", str(run / "ddim.gif"), "--quiet"]) == 0
    assert main(["eval", "nll", str(run), "--n", "2"]) == 0
    assert main(["eval", "memorization", str(run), "--n", "20", "--steps", "3"]) == 0
    assert main(["report", str(run)]) == 0
    return run


def test_report_is_self_contained(reported_run):
    page = (reported_run / "report.html").read_text()
    # every picture is embedded: no reference to a file or the network
    srcs = re.findall(r'src="([^"]+)"', page)
    assert len(srcs) >= 4 and all(s.startswith("data:image/") for s in srcs)
    assert "http://" not in page and "https://" not in page
    for needle in ["Configuration", "Training", "Samples", "Evaluation", "Sampling chains", "Noise schedules"]:
        assert needle in page


def _section_ids(page):
    return re.findall(r'<section id="([a-z]+)"', page)


def test_report_leads_with_the_summary_and_ends_with_the_folded_configuration(reported_run):
    page = (reported_run / "report.html").read_text()
    ids = _section_ids(page)
    # summary first, then samples and classes, curves, evaluation, chains; every run's figures; configuration last
    assert ids == ["summary", "samples", "training", "evaluation", "chains", "schedules", "configuration"], ids
    assert ids == [s for s in SECTIONS if s in ids]
    summary = page.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert 'data-measure="grid"' in summary and "one row per class" in summary  # the grid, a row per class
    # the headline numbers, each from its file: the last --eval-every Frechet distance, the bound, the verdict
    with open(reported_run / "metrics.csv", newline="") as f:
        fd, se = [(float(r["fd"]), float(r["fd_stderr"])) for r in csv.DictReader(f) if r["fd"]][-1]
    with open(reported_run / "eval" / "nll_terms.csv", newline="") as f:
        bpd = sum(float(r["bits"]) for r in csv.DictReader(f))
    nll = json.loads((reported_run / "eval" / "nll_terms.json").read_text())
    assert nll["bpd"] == pytest.approx(bpd, rel=1e-6)  # the notes hold the sum of the terms
    assert f"<div class=v>{figure(fd)} \u00b1 {figure(se)}</div>" in summary and "20 samples (--eval-n)" in summary
    assert f"<div class=v>{bpd:.3f} \u00b1 {nll['bpd_stderr']:.3f}</div>" in summary
    assert "conditioned on true labels" in summary and "memorisation check" in summary
    assert "<div class=v>cpu</div>" in summary and "config.json machine" in summary  # the device it trained on
    assert re.search(r"<div class=v>(passed|failed)</div>", summary)
    text = re.sub(r"<[^>]+>", "", summary)
    assert "ddpmkit train --preset digits" in text and f"ddpmkit sample {reported_run}" in text

    # the configuration: last, folded, the settings that differ from the preset first and marked
    config = page.split('<section id="configuration">', 1)[1]
    assert config.startswith("<details>") and "<details open" not in config
    rows = re.findall(r'<tr( class="changed")?><td>([a-z_0-9A-Z]+)</td>', config)
    marked = [name for mark, name in rows if mark]
    changed = changed_settings(TrainConfig.from_json(read_config(reported_run)))
    assert marked == changed and {"class_cond", "eval_every", "base_channels", "lr"} <= set(marked)
    assert [name for _, name in rows[:len(marked)]] == marked  # first
    assert len(rows) == len(read_config(reported_run)["train"])


def test_report_train_command_reproduces_the_settings(reported_run):
    config = read_config(reported_run)
    cmd = next(f.value for f in summarize(reported_run, config).commands if f.label == "train it again")
    argv = shlex.split(cmd)
    assert argv[:2] == ["ddpmkit", "train"] and argv[argv.index("--out") + 1] == str(reported_run)
    args = build_parser().parse_args(argv[1:])
    fields = {f for f in TrainConfig.__dataclass_fields__} - {"preset"}
    cfg = config_from_preset(args.preset, **{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    assert cfg.to_json()["train"] == config["train"]


def test_report_of_a_run_that_records_little(reported_run, tmp_path, capsys):
    run = tmp_path / "bare"
    run.mkdir()
    config = read_config(reported_run)
    config["train"]["device"] = "cuda"
    assert config.pop("machine")["device"] == "cpu"  # what the trainer picked; without it, the --device asked for
    (run / "config.json").write_text(json.dumps(config))
    (run / "eval").mkdir()
    (run / "eval" / "memorization.json").write_text("{not json")
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    summary = page.split('<section id="summary">', 1)[1].split("</section>", 1)[0]
    assert summary.count("not recorded") >= 3  # steps, wall-clock, Frechet distance: no metrics.csv
    assert "<div class=v>unreadable</div>" in summary and "<div class=v>cuda</div>" in summary
    assert "no samples yet" in summary and _section_ids(page)[0] == "summary"
    (run / "config.json").write_text("{")
    capsys.readouterr()
    assert main(["report", str(run)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no Chromium on this machine")
def test_report_renders_in_headless_chromium(reported_run, tmp_path):
    assert CHROMIUM, "CI installs Debian's chromium in .ci/run"
    url = (reported_run / "report.html").resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    screen = ["--window-size=1200,900"]  # the first screen of a laptop
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, *screen, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    n_images = int(re.search(r'data-images="(\d+)"', body).group(1))
    n_broken = int(re.search(r'data-broken="(\d+)"', body).group(1))
    assert n_images >= 4 and n_broken == 0, body  # every image decoded: naturalWidth > 0
    # the first screen holds the sample grid and the headline numbers (getBoundingClientRect, read in the page)
    width, height = json.loads(re.search(r"data-viewport=\"([^\"]+)\"", body).group(1).replace("&quot;", '"'))
    assert width == 1200 and 600 < height <= 900, body  # --dump-dom's window keeps some of the 900 px for itself
    layout = json.loads(re.search(r"data-layout=\"([^\"]+)\"", body).group(1).replace("&quot;", '"'))
    for name in ("grid", "headline", "duration"):
        top, bottom, w = layout[name]
        assert 0 <= top and bottom <= height and w > 100, (name, layout)
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, *screen, f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=np.float64)
    assert px.shape == (900, 1200)
    assert px.std() > 10  # not blank: text, numbers and samples


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
