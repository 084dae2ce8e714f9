"""Issue 19: the Min-SNR-gamma loss weight, the cosine learning-rate decay, --eval-every, the memorisation check."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import tiny_cfg, tiny_run
from ddpmkit.diffusion import NoiseSchedule
from ddpmkit.diffusion.losses import loss_weights, training_losses
from ddpmkit.diffusion.process import predict_x0
from ddpmkit.errors import ConfigError


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weight_is_the_closed_form(schedule, objective):
    s = NoiseSchedule.from_name(schedule, 1000)
    t = torch.arange(1000)
    gamma = 5.0
    w = loss_weights(s, t, objective, "min-snr", gamma).double()
    ab = s.alpha_bar.double()
    snr = ab / (1 - ab)
    # Hang et al. 2023: min(SNR, gamma) on the x0 loss; / SNR on eps; / (SNR + 1) on v
    want = {"x0": torch.minimum(snr, torch.tensor(gamma)),
            "eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
            "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)}[objective]
    assert torch.allclose(w, want, rtol=1e-6, atol=0)
    assert torch.equal(loss_weights(s, t, objective, "none"), torch.ones(1000))


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weighted_loss_is_min_snr_times_the_x0_error(objective):
    """Whatever the objective, the weighted loss is min(SNR, gamma) ||x0 - x0_hat||^2 (Hang et al. 2023 eq. 9)."""
    s = NoiseSchedule.from_name("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 1, 4, 4, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    out = torch.randn(x0.shape, generator=g)
    net = lambda x_t, tt: out  # noqa: E731  a fixed wrong prediction
    losses, _ = training_losses(net, s, x0, objective=objective, t=t, noise=noise, loss_weight="min-snr",
                                min_snr_gamma=5.0)
    x_t = s.sqrt_alpha_bar[t].view(-1, 1, 1, 1) * x0 + s.sqrt_one_minus_alpha_bar[t].view(-1, 1, 1, 1) * noise
    x0_hat = predict_x0(s, x_t, t, out, objective)
    ab = s.alpha_bar.double()[t]
    want = (ab / (1 - ab)).clamp(max=5.0) * (x0_hat - x0).double().pow(2).flatten(1).mean(1)
    assert torch.allclose(losses.double(), want, rtol=1e-4)


def test_loss_weight_settings_are_checked():
    with pytest.raises(ConfigError, match="--loss-weight"):
        tiny_cfg(loss_weight="snr").validate()
    with pytest.raises(ConfigError, match="--min-snr-gamma"):
        tiny_cfg(loss_weight="min-snr", min_snr_gamma=0.0).validate()
    with pytest.raises(ConfigError, match="--lr-decay"):
        tiny_cfg(lr_decay="step").validate()
    with pytest.raises(ConfigError, match="--eval-sampler"):
        tiny_cfg(eval_sampler="nope").validate()


def test_cosine_lr_decay_follows_sgdr():
    from ddpmkit.train.schedule import lr_at as _lr_at

    cfg = tiny_cfg(lr=1e-3, warmup=0, lr_decay="cosine", steps=100)
    for step in (0, 25, 50, 99, 100):
        assert _lr_at(cfg, step) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / 100)))
    # a time limit reached first decays by the time spent
    assert _lr_at(cfg, 10, progress=0.5) == pytest.approx(0.5e-3)
    assert _lr_at(tiny_cfg(lr=1e-3, warmup=0, steps=100), 50) == 1e-3  # none: constant


def test_min_snr_run_with_cosine_decay_resumes_exactly(tmp_path):
    from ddpmkit.run import Run
    from ddpmkit.train import Trainer

    opts = dict(loss_weight="min-snr", objective="v", lr_decay="cosine", warmup=0)
    a = tiny_run(tmp_path, "a", **opts)
    tr = Trainer(tiny_cfg(**opts), tmp_path / "b", quiet=True)  # 4 of the 6 steps, a checkpoint, then resume
    for _ in range(4):
        tr.train_step()
    tr.save()
    tr._release_lock()
    Trainer(tiny_cfg(**opts), tmp_path / "b", resume=True, quiet=True).run()
    ma, mb = Run.open(a).load_model(), Run.open(tmp_path / "b").load_model()
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_eval_every_logs_the_frechet_distance(tmp_path):
    run = tiny_run(tmp_path, steps=4, eval_every=2, eval_n=20, eval_steps=3, log_every=3, class_cond=True)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fd = {int(r["step"]): float(r["fd"]) for r in rows if r["fd"]}
    assert sorted(fd) == [2, 4] and all(v > 0 and math.isfinite(v) for v in fd.values())
    from ddpmkit.viz.plots import plot_loss

    assert plot_loss(run / "metrics.csv", tmp_path / "loss.png").is_file()


def test_nearest_distances_and_the_copy_statistics():
    from ddpmkit.metrics.memorization import compare_distances, loo_nearest_distances, nearest_distances

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (50, 1, 4, 4), generator=g, dtype=torch.uint8)
    d, j = nearest_distances(train[:5], train)
    assert (d == 0).all() and list(j) == [0, 1, 2, 3, 4]  # copies: distance 0 to themselves
    loo = loo_nearest_distances(train)
    brute = [min(float(((train[i].double() - train[k].double()) / 255).pow(2).mean().sqrt())
                 for k in range(50) if k != i) for i in range(50)]
    assert loo == pytest.approx(brute)
    copies = compare_distances(d, loo)
    assert copies["closer_than_real"] == 1.0 and copies["near_copies"] == 1.0
    alike = compare_distances(loo, loo)
    assert alike["closer_than_real"] == pytest.approx(0.5)
    assert alike["near_copies"] == alike["real_near_copies"]


def test_eval_memorization_command(tmp_path, capsys):
    from ddpmkit.cli import main

    run = tiny_run(tmp_path, class_cond=True)
    assert main(["eval", "memorization", str(run), "--n", "20", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "samples closer than real images" in out and "digits classifier" in out
    assert (run / "eval" / "memorization.json").is_file() and (run / "eval" / "memorization.png").is_file()
    assert main(["eval", "memorization", str(run), "--n", "1"]) != 0
    assert "--n must be" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_writes_the_quality_curve_and_the_memorisation_check(tmp_path):
    from ddpmkit.demo import run_demo

    res = run_demo(out=tmp_path / "demo", train_seconds=3, quiet=True, n=10, log=lambda *a: None)
    out = res["out"]
    assert res["train"]["quality"]["fd"] > 0  # measured at the end of training, logged in metrics.csv
    with open(out / "metrics.csv", newline="") as f:
        assert any(r["fd"] for r in csv.DictReader(f))
    for name in ("loss.png", "report.html", "eval/memorization.png", "eval/memorization.json",
                 "samples_ddim/grid.png", "samples_dpmpp-2m-sde/grid.png", "ddim.gif", "dpmpp-2m-sde.gif"):
        assert (out / name).is_file(), name
    assert "memorization" in (out / "report.html").read_text()


@pytest.mark.slow
def test_the_latent_demo_trains_an_autoencoder_then_the_unet_on_its_latents(tmp_path):
    """`ddpmkit demo --latent`: the autoencoder run beside the demo's, the latent run holding its copy, every file of
    the pixel demo (but the pixels' forward figure) with 32x32 decoded digits, and a report naming the latent space."""
    from PIL import Image

    from ddpmkit.demo import run_demo
    from ddpmkit.run import Run

    lines = []
    res = run_demo(out=tmp_path / "demo", train_seconds=6, quiet=True, n=10, log=lines.append, latent=True)
    out = res["out"]
    ae = tmp_path / "demo-autoencoder"
    assert Run.open(ae).kind == "autoencoder" and (ae / "metrics.csv").is_file()
    run = Run.open(out)
    assert run.is_latent and run.pixel_shape == (1, 32, 32) and run.image_shape == (4, 8, 8)
    assert (out / "autoencoder" / "config.json").is_file()
    for name in ("loss.png", "report.html", "eval/memorization.png", "samples_ddim/grid.png",
                 "samples_dpmpp-2m-sde/grid.png", "ddim.gif", "dpmpp-2m-sde.gif"):
        assert (out / name).is_file(), name
    assert not (out / "forward.png").exists()
    with Image.open(next((out / "samples_ddim").glob("sample_*.png"))) as im:
        assert im.size == (32, 32)
    assert any("held-out PSNR" in line for line in lines)
    assert "latent" in (out / "report.html").read_text()
