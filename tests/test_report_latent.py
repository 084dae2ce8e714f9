"""`ddpmkit report` of an autoencoder run and of a latent diffusion run: what each page leads with, the facts and
their files, the commands that reproduce them, the sections each has, and the rendering in headless Chromium."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest
from test_report import CHROMIUM, FLAGS

from ddpmkit.cli import build_parser, main
from ddpmkit.limits import check_autoencoder_config, check_model_config
from ddpmkit.store import read_config
from ddpmkit.train import config_from_preset
from ddpmkit.train.autoencoder_config import AutoencoderConfig
from ddpmkit.train.config import TrainConfig
from ddpmkit.viz.report import SECTIONS
from ddpmkit.viz.summary import LATENT_BPD, bpd_fact, figure, summarize

# An f = 2 autoencoder of the 8x8 digits (latents 2x4x4), its PSNR and Frechet distance measured every 2 steps
TINY_AE = ["--image-size", "8", "--factor", "2", "--latent-channels", "2", "--base-channels", "8", "--num-groups", "4",
           "--no-mid-attention", "--batch-size", "8", "--steps", "4", "--log-every", "1", "--eval-every", "2",
           "--eval-n", "20", "--sample-every", "2", "--num-samples", "4", "--checkpoint-every", "100", "--quiet"]
# the tests' tiny U-Net on those latents
TINY_LATENT = ["--image-size", "8", "--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1",
               "--num-groups", "4", "--T", "40", "--batch-size", "8", "--steps", "3", "--log-every", "1",
               "--sample-every", "3", "--num-samples", "4", "--sample-steps", "3", "--checkpoint-every", "100",
               "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An autoencoder run (measured by `autoencoder eval`) and a latent run on it (measured by `eval nll`), each
    reported. The digits classifier of the Frechet distance comes from the usual cache, as in test_report.py."""
    root = tmp_path_factory.mktemp("report-latent")
    ae, lat = root / "ae", root / "lat"
    assert main(["autoencoder", "train", *TINY_AE, "--out", str(ae)]) == 0
    assert main(["autoencoder", "eval", str(ae), "--n", "20"]) == 0
    assert main(["report", str(ae)]) == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPMKIT_CACHE", str(root / "cache"))  # the encoded latents stay in the test's folder
        assert main(["train", "--autoencoder", str(ae), *TINY_LATENT, "--out", str(lat)]) == 0
        assert main(["eval", "nll", str(lat), "--n", "2"]) == 0
    assert main(["report", str(lat)]) == 0
    return ae, lat


def section_ids(page):
    return re.findall(r'<section id="([a-z]+)"', page)


def summary_of(page):
    return page.split('<section id="summary">', 1)[1].split("</section>", 1)[0]


def text(html):
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'")


def embedded(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def last(run, column):
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r[column]][-1]


# ---------------------------------------------------------------------------------------------- autoencoder
def test_autoencoder_page_leads_with_its_reconstructions_and_their_quality(runs):
    ae, _ = runs
    page = (ae / "report.html").read_text()
    ids = section_ids(page)
    # no noise schedule or forward process: nothing diffuses in an autoencoder run
    assert ids == ["summary", "samples", "training", "evaluation", "configuration"], ids
    assert ids == [s for s in SECTIONS if s in ids]
    assert "Noise schedules" not in page and "Forward process" not in page and "bits/dim" not in page
    assert "autoencoder run ae</h1>" in page and "f = 2, 2x4x4 latents" in page
    summary = summary_of(page)
    # the newest reconstruction figure: autoencoder eval's, written after the trainer's last grid
    assert f'src="{embedded(ae / "eval" / "reconstructions.png")}"' in summary
    assert 'data-measure="grid"' in summary and "eval/reconstructions.png" in summary
    # how good: the held-out PSNR and Frechet distance of eval/reconstruction.json
    r = json.loads((ae / "eval" / "reconstruction.json").read_text())
    assert f"<div class=v>{r['psnr_db']:.2f} dB</div>" in summary
    assert f"<div class=v>{figure(r['fd'])} \u00b1 {figure(r['fd_stderr'])}</div>" in summary
    assert "mean over 20 images of digits" in summary and "eval/reconstruction.json" in summary
    # how long
    step, wall = last(ae, "wall_s")
    assert step == 4 and "<div class=v>4</div>" in summary and "<div class=v>cpu</div>" in summary
    # what: the autoencoder's parameters (built on the meta device), f, latents, KL weight, discriminator
    config = read_config(ae)
    words = text(summary)
    params = check_autoencoder_config(config["model"], "test")
    for fact in (f"parameters {params:,}", "factor f = 2", "latents 2x4x4", "KL weight 1e-06", "discriminator off",
                 "image 8x8, 1 channel"):
        assert fact in words, fact
    # the training curves: the loss's parts and the PSNR
    training = page.split('<section id="training">', 1)[1].split("</section>", 1)[0]
    assert f'src="{embedded(ae / "loss.png")}"' in training and "PSNR" in training and "KL" in training
    # the trainer's last grid, which the summary does not show, is among the reconstructions below it
    samples = page.split('<section id="samples">', 1)[1].split("</section>", 1)[0]
    assert "Reconstructions" in samples and "samples/grid_step_000000004.png" in samples


def test_autoencoder_commands_reproduce_it_and_train_on_its_latents(runs):
    ae, _ = runs
    config = read_config(ae)
    commands = {f.label: f.value for f in summarize(ae, config).commands}
    argv = shlex.split(commands["train it again"])
    assert argv[:3] == ["ddpmkit", "autoencoder", "train"] and argv[argv.index("--out") + 1] == str(ae)
    args = build_parser().parse_args(argv[1:])
    fields = [f.name for f in AutoencoderConfig.__dataclass_fields__.values()]
    given = {k: getattr(args, k) for k in fields if getattr(args, k) is not None}
    assert AutoencoderConfig(**given).to_json()["train"] == config["train"]
    # only the settings that differ from AutoencoderConfig's defaults are written
    assert "--holdout" not in argv and "--kl-weight" not in argv and "--factor" in argv
    # the next step: a diffusion model on its latents, at its image size
    nxt = shlex.split(commands["train a diffusion model on its latents"])
    assert nxt[:4] == ["ddpmkit", "train", "--autoencoder", str(ae)]
    args = build_parser().parse_args(nxt[1:])
    assert args.autoencoder == str(ae) and args.image_size == config["model"]["image_size"]
    page = text((ae / "report.html").read_text())
    assert commands["train it again"] in page and commands["train a diffusion model on its latents"] in page


def test_autoencoder_configuration_is_against_the_defaults(runs):
    ae, _ = runs
    config = read_config(ae)
    page = (ae / "report.html").read_text()
    table = page.split('<section id="configuration">', 1)[1]
    assert table.startswith("<details>") and "defaults of ddpmkit autoencoder train" in table
    rows = re.findall(r'<tr( class="changed")?><td>([a-z_0-9A-Z]+)</td>', table)
    marked = [name for mark, name in rows if mark]
    defaults = AutoencoderConfig()
    assert marked == [k for k in marked if config["train"][k] != getattr(defaults, k)]
    assert {"factor", "latent_channels", "eval_every", "steps"} <= set(marked) and "holdout" not in marked
    assert [name for _, name in rows[:len(marked)]] == marked and len(rows) == len(config["train"])
    assert f'<td class=note>default: {json.dumps(defaults.steps)}</td>' in table


def test_autoencoder_psnr_from_metrics_without_an_eval(runs, tmp_path):
    ae, _ = runs
    run = tmp_path / "ae"
    shutil.copytree(ae, run, ignore=shutil.ignore_patterns("eval", "report.html", "loss.png"))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    summary = summary_of(page)
    step, psnr = last(run, "psnr")
    _, fd = last(run, "fd")
    assert f"<div class=v>{psnr:.2f} dB</div>" in summary and f"metrics.csv psnr at step {step}" in summary
    assert f"<div class=v>{figure(fd)} \u00b1" in summary and f"metrics.csv fd at step {step}" in summary
    assert f"ddpmkit autoencoder eval {run}" in summary  # how to measure it on more images
    # the newest figure is now the trainer's
    assert f'src="{embedded(run / "samples" / "grid_step_000000004.png")}"' in summary
    assert "EMA weights at step 4" in summary
    assert section_ids(page) == ["summary", "training", "evaluation", "configuration"]  # no second figure
    assert "<img" not in page.split('<section id="evaluation">', 1)[1].split("</section>", 1)[0]


def test_report_of_an_imported_autoencoder(runs, tmp_path):
    ae, _ = runs
    run = tmp_path / "vae"
    shutil.copytree(ae / "checkpoints", run / "checkpoints")
    config = read_config(ae)  # as `import-diffusers` of a VAE writes it: no training, no image size
    del config["train"], config["machine"]
    config["model"]["image_size"] = None
    config["latent"]["scaling_factor"] = 0.5
    config["imported_from"] = {"source": "hub/vae", "format": "diffusers", "vae_config": {}}
    (run / "config.json").write_text(json.dumps(config))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    words = text(summary_of(page))
    for fact in ("data not recorded imported from hub/vae", "latents 2 x H/2 x W/2", "latent scale 0.5",
                 "KL weight not recorded", f"ddpmkit autoencoder eval {run} --data SOURCE",
                 f"ddpmkit import-diffusers hub/vae --out {run}", f"ddpmkit train --autoencoder {run} --out"):
        assert fact in words, fact
    assert "no reconstructions yet" in words and section_ids(page) == ["summary"]


# ---------------------------------------------------------------------------------------------- latent
def test_latent_page_names_its_space_autoencoder_and_scale(runs):
    ae, lat = runs
    page = (lat / "report.html").read_text()
    ids = section_ids(page)
    assert ids == ["summary", "training", "evaluation", "schedules", "configuration"], ids
    config = read_config(lat)
    latent = config["latent"]
    assert f"in the latent space of the autoencoder {ae}, 2x4x4 latents" in page
    summary = summary_of(page)
    assert f'src="{embedded(sorted((lat / "samples").glob("grid_step_*.png"))[-1])}"' in summary
    assert "decoded by the autoencoder" in summary
    words = text(summary)
    params = check_model_config(config["model"], "test")
    for fact in ("space latent", f"autoencoder {ae}", "latents 2x4x4, f = 2", f"scale {latent['scale']:.4g}",
                 "measured", "image 8x8, 1 channel", f"parameters {params:,}"):
        assert fact in words, fact
    assert latent["shape"] == [2, 4, 4] and latent["image_shape"] == [1, 8, 8]


def test_latent_bound_is_in_bits_per_latent_dimension(runs, tmp_path):
    _, lat = runs
    summary = summary_of((lat / "report.html").read_text())
    nll = json.loads((lat / "eval" / "nll_terms.json").read_text())
    assert nll["space"] == "latent"
    assert f"<div class=l>{LATENT_BPD}</div><div class=v>{nll['bpd']:.3f} \u00b1 {nll['bpd_stderr']:.3f}</div>" \
        in summary
    assert "not comparable to pixel bits/dim" in summary and "encoded into 2x4x4 latents" in summary
    assert "<div class=l>bits/dim</div>" not in summary
    # without the notes, the sum of the latent CSV's column, labelled the same
    (tmp_path / "eval").mkdir()
    shutil.copy(lat / "eval" / "nll_terms.csv", tmp_path / "eval")
    fact = bpd_fact(tmp_path)
    with open(tmp_path / "eval" / "nll_terms.csv", newline="") as f:
        total = sum(float(r["bits_per_latent_dim"]) for r in csv.DictReader(f))
    assert fact.label == LATENT_BPD and fact.value == f"{total:.3f}" and "not comparable" in fact.source
    assert total == pytest.approx(nll["bpd"], rel=1e-5)
    # not measured yet: still named in the latent unit
    assert bpd_fact(tmp_path / "none", latent=True).label == LATENT_BPD


def test_latent_train_command_reproduces_the_settings(runs):
    ae, lat = runs
    config = read_config(lat)
    train = next(f for f in summarize(lat, config).commands if f.label == "train it again")
    argv = shlex.split(train.value)
    assert argv[argv.index("--autoencoder") + 1] == str(ae) and "own copy" in train.source
    args = build_parser().parse_args(argv[1:])
    fields = {f for f in TrainConfig.__dataclass_fields__} - {"preset"}
    cfg = config_from_preset(args.preset, **{k: getattr(args, k) for k in fields if getattr(args, k) is not None})
    assert cfg.to_json()["train"] == config["train"]


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="no Chromium on this machine")
@pytest.mark.parametrize("which", [0, 1], ids=["autoencoder", "latent"])
def test_pages_render_in_headless_chromium(runs, which, tmp_path):
    assert CHROMIUM, "CI installs Debian's chromium in .ci/run"
    url = (runs[which] / "report.html").resolve().as_uri()
    dom = subprocess.run([CHROMIUM, *FLAGS, "--user-data-dir=" + str(tmp_path / "profile"), "--window-size=1200,900",
                          "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert int(re.search(r'data-images="(\d+)"', body).group(1)) >= 3, body
    assert int(re.search(r'data-broken="(\d+)"', body).group(1)) == 0, body
    _, height = json.loads(re.search(r"data-viewport=\"([^\"]+)\"", body).group(1).replace("&quot;", '"'))
    layout = json.loads(re.search(r"data-layout=\"([^\"]+)\"", body).group(1).replace("&quot;", '"'))
    for name in ("grid", "headline", "duration"):  # the first screen holds the figure and the numbers
        top, bottom, w = layout[name]
        assert 0 <= top and bottom <= height and w > 100, (name, layout)
