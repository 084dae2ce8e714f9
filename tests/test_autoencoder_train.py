"""Training the autoencoder of latent diffusion (`ddpmkit autoencoder train` / `eval`) on a tiny configuration:
exact resume with the discriminator, the held-out images, the eval command, the refusals, the perceptual slot, and
that training improves the reconstructions."""

from __future__ import annotations

import csv
import json
import re
import textwrap

import pytest
import torch

from ddpmkit.cli import main
from ddpmkit.data import load_dataset
from ddpmkit.data.holdout import holdout_indices, split_for_training
from ddpmkit.metrics.reconstruction import evaluate_reconstruction
from ddpmkit.models.autoencoder import AutoencoderKL
from ddpmkit.models.discriminator import PatchDiscriminator
from ddpmkit.run import Run
from ddpmkit.store.checkpoint import list_checkpoints, load_checkpoint
from ddpmkit.train.autoencoder_config import AutoencoderConfig
from ddpmkit.train.distributed import current
from ddpmkit.train.task import TaskContext
from ddpmkit.train.tasks.autoencoder import AutoencoderTask

# A tiny f = 4 autoencoder of the digits at 16x16 (latents 2x4x4); the learning rate changes at every step (a
# warm-up longer than the runs, no decay, so that --steps may change on a resume); a row of metrics.csv per step.
TINY_AE = ["--image-size", "16", "--factor", "4", "--base-channels", "8", "--num-groups", "4",
           "--latent-channels", "2", "--batch-size", "8", "--lr-decay", "none", "--warmup", "100", "--log-every", "1",
           "--checkpoint-every", "100", "--sample-every", "100", "--num-samples", "0", "--quiet"]
# A discriminator (one stride-2 layer: its patch fits 16x16) that joins at step 2 (0-based: the third step).
GAN = ["--disc-weight", "0.5", "--disc-start", "2", "--disc-layers", "1", "--disc-channels", "8"]
# metrics.csv's columns that measure time and so differ between two identical runs
TIMED = {"img_per_s", "wall_s"}


def ae_train(out, *flags) -> int:
    return main(["autoencoder", "train", *TINY_AE, *flags, "--out", str(out)])


def rows(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMED} for r in csv.DictReader(f)]


def assert_same(a, b, where="state"):
    """a and b identical: tensors bit for bit (torch.equal, same dtype), containers element by element."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def one_error_line(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddpmkit: error: ") and "\n" not in err, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def trained_ae(tmp_path_factory):
    """A tiny autoencoder run of 8 steps (with its held-out set, the default 10% of the digits)."""
    run = tmp_path_factory.mktemp("ae") / "run"
    assert ae_train(run, "--steps", "8") == 0
    return run


@pytest.fixture
def fast_judge(monkeypatch, tmp_path_factory):
    """The digits classifier that `autoencoder eval` measures with, trained for 2 epochs into a folder of the tests'
    own (its accuracy is not what these tests look at)."""
    from ddpmkit.metrics.digits import DigitsClassifier

    folder = tmp_path_factory.getbasetemp() / "judge"
    original = DigitsClassifier.load_or_train.__func__
    monkeypatch.setattr(DigitsClassifier, "load_or_train", classmethod(
        lambda cls, **kw: original(cls, **{**kw, "epochs": 2, "cache_dir": folder})))


# ---------------------------------------------------------------------------------------------------- exact resume
def test_resume_with_the_discriminator_is_bit_exact(tmp_path):
    # 6 steps straight against 3 steps, a stop and a resume to 6; the discriminator joins at step 2, so both
    # optimizers and the adaptive weight are at work before the break and after it.
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert ae_train(straight, *GAN, "--steps", "6") == 0
    assert ae_train(split, *GAN, "--steps", "3") == 0
    assert main(["autoencoder", "train", "--resume", "--steps", "6", "--quiet", "--out", str(split)]) == 0

    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a.step == b.step == 6
    assert_same(a.model_state, b.model_state, "autoencoder")
    assert_same(a.ema_state, b.ema_state, "ema")
    assert_same(a.optimizer_state, b.optimizer_state, "autoencoder optimizer")
    sa, sb = a.train_state, b.train_state
    assert set(sa["models"]) == {"discriminator"} and set(sa["optimizers"]) == {"discriminator"}
    assert_same(sa["models"], sb["models"], "discriminator")
    assert_same(sa["optimizers"], sb["optimizers"], "discriminator optimizer")
    assert_same(sa["gen"], sb["gen"], "posterior noise generator")
    assert_same(sa["batcher"], sb["batcher"], "batcher")
    assert sa["optimizers"]["discriminator"]["state"], "the discriminator's optimizer never stepped"

    ra, rb = rows(straight), rows(split)
    assert [r["step"] for r in ra] == [str(s) for s in range(1, 7)]
    assert ra == rb
    # the adversarial part is in the rows from the discriminator's start (step index 2, row 3) on, and only there
    assert [bool(r["d_loss"]) for r in ra] == [False, False, True, True, True, True]
    assert all(float(r["d_weight"]) > 0 for r in ra[2:])
    # the loss column is the per-image part of the autoencoder's loss: reconstruction + kl_weight * KL
    kl_weight = json.loads((straight / "config.json").read_text())["train"]["kl_weight"]
    for r in ra:
        assert float(r["loss"]) == pytest.approx(float(r["rec"]) + kl_weight * float(r["kl"]), rel=1e-5)


def test_disc_start_delays_the_discriminator(tmp_path):
    # checkpoints at steps 1, 2 and 3 of a run whose discriminator starts at step 2 (0-based)
    run, plain = tmp_path / "gan", tmp_path / "plain"
    assert ae_train(run, *GAN, "--steps", "3", "--checkpoint-every", "1") == 0
    assert ae_train(plain, "--steps", "3", "--checkpoint-every", "1") == 0  # no discriminator at all
    cks = {c.step: c for c in (load_checkpoint(p) for p in list_checkpoints(run))}
    plain_cks = {c.step: c for c in (load_checkpoint(p) for p in list_checkpoints(plain))}
    assert sorted(cks) == [1, 2, 3]

    # the discriminator's weights as the run built them: the run's seed, the autoencoder first, then it
    cfg = AutoencoderConfig.from_json(json.loads((run / "config.json").read_text()))
    torch.manual_seed(cfg.seed)
    AutoencoderKL.from_config(cfg.model_config())
    initial = PatchDiscriminator(**cfg.discriminator_config()).state_dict()
    for step in (1, 2):
        assert_same(cks[step].train_state["models"]["discriminator"], initial, f"discriminator at step {step}")
        assert not cks[step].train_state["optimizers"]["discriminator"]["state"]
        # and the autoencoder trained as if there were no discriminator: no adversarial loss before the start
        assert_same(cks[step].model_state, plain_cks[step].model_state, f"autoencoder at step {step}")
    d3 = cks[3].train_state["models"]["discriminator"]
    assert any(not torch.equal(d3[k], initial[k]) for k in initial), "the discriminator never trained"
    assert any(not torch.equal(cks[3].model_state[k], plain_cks[3].model_state[k]) for k in cks[3].model_state)


# ---------------------------------------------------------------------------------------------------- held out
@pytest.mark.parametrize("n, fraction", [(1797, 0.1), (100, 0.25), (10, 0.01), (2, 0.9), (7, 0.0)])
def test_holdout_indices_are_disjoint_complete_and_fixed(n, fraction):
    train, held = holdout_indices(n, fraction)
    expected = 0 if fraction == 0 else min(max(1, round(n * fraction)), n - 1)
    assert len(held) == expected and len(train) == n - expected
    assert torch.equal(torch.cat([train, held]).sort().values, torch.arange(n))  # complete and disjoint
    assert torch.equal(train, train.sort().values) and torch.equal(held, held.sort().values)
    torch.manual_seed(12345)  # the global random state has no say in the choice
    again = holdout_indices(n, fraction)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    if 0 < fraction and n > 20:  # a random choice, not the first or last images
        assert held.min() < n // 2 < held.max()


def test_the_task_trains_on_the_training_part_alone(tmp_path):
    cfg = AutoencoderConfig(image_size=16, base_channels=8, num_groups=4, batch_size=8, holdout=0.2)
    cfg.validate()
    task = AutoencoderTask(cfg, TaskContext(torch.device("cpu"), current(), lambda msg: None, quiet=True))
    data = load_dataset("digits", image_size=16, channels=1, progress=False)
    train, held = holdout_indices(data.num_images, 0.2)
    assert task.num_images == len(train) == task.batcher.num_images
    assert torch.equal(task.batcher.images, data.images[train])
    assert torch.equal(task.held, data.images[held])
    # the same split as `autoencoder eval` reads: split_for_training
    kept, held2 = split_for_training(data, cfg)
    assert torch.equal(kept.images, data.images[train]) and torch.equal(held2, data.images[held])
    # a whole epoch of batches comes from the training images only, each once
    seen = torch.cat([task.batcher.next_batch() for _ in range(task.num_images // 8)])
    from ddpmkit.images import to_uint8

    served = {bytes(x.numpy()) for x in to_uint8(seen)}
    assert served <= {bytes(x.numpy()) for x in data.images[train]}


# ---------------------------------------------------------------------------------------------------- eval
def test_eval_prints_the_psnr_and_writes_its_files(trained_ae, tmp_path, capsys, fast_judge):
    capsys.readouterr()
    assert main(["autoencoder", "eval", str(trained_ae), "--n", "50"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"^PSNR: (-?\d+(?:\.\d+)?) dB", out, re.M)
    assert m, out
    printed = float(m.group(1))
    assert (trained_ae / "eval" / "reconstructions.png").is_file()
    facts = json.loads((trained_ae / "eval" / "reconstruction.json").read_text())
    assert facts["n"] == 50 and facts["psnr_db"] == pytest.approx(printed, abs=0.006)

    # the number by hand: the first 50 held-out images, reconstructed from the posterior's mean by the EMA weights
    cfg = AutoencoderConfig.from_json(json.loads((trained_ae / "config.json").read_text()))
    data = load_dataset("digits", image_size=16, channels=1, progress=False)
    held = data.images[holdout_indices(data.num_images, cfg.holdout)[1][:50]]
    model = AutoencoderKL.from_config(cfg.model_config()).eval()
    model.load_state_dict(load_checkpoint(trained_ae).ema_state)
    with torch.no_grad():
        x = held.float() / 127.5 - 1
        r = model.decode(model.encode(x).mean).clamp(-1, 1)
    mse = (r.double() - x.double()).pow(2).flatten(1).mean(1)
    by_hand = float((10 * torch.log10(4 / mse)).mean())
    assert printed == pytest.approx(by_hand, abs=0.006)


def test_eval_refuses_a_diffusion_run_in_one_line(tmp_path, capsys):
    from conftest import tiny_run

    run = tiny_run(tmp_path, steps=2)
    assert main(["autoencoder", "eval", str(run), "--n", "50"]) == 2
    one_error_line(capsys, "diffusion run", "not an autoencoder")
    assert not (run / "eval").exists()


def test_eval_of_an_imported_autoencoder_needs_data(tmp_path, capsys, fast_judge):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 8), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=2, norm_num_groups=4,
                                  sample_size=16, scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    run = tmp_path / "imported"
    assert main(["import-diffusers", str(tmp_path / "vae"), "--out", str(run)]) == 0
    assert "train" not in json.loads((run / "config.json").read_text())
    capsys.readouterr()
    assert main(["autoencoder", "eval", str(run), "--n", "50"]) == 2
    one_error_line(capsys, "--data")
    assert not (run / "eval").exists()
    assert main(["autoencoder", "eval", str(run), "--n", "20", "--data", "digits"]) == 0
    assert re.search(r"^PSNR: -?\d+\.\d+ dB", capsys.readouterr().out, re.M)
    assert json.loads((run / "eval" / "reconstruction.json").read_text())["n"] == 20


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("flags, words", [
    (["--factor", "3"], ["--factor", "power of two"]),
    (["--image-size", "30", "--factor", "4"], ["--image-size 30", "--factor 4"]),
    (["--disc-weight", "0.5", "--disc-layers", "3", "--image-size", "16"], ["--disc-layers 3", "16"]),
    (["--perceptual", "nocolon"], ["--perceptual", "module:factory"]),
])
def test_bad_settings_are_one_line_and_write_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    assert main(["autoencoder", "train", "--steps", "2", "--quiet", *flags, "--out", str(out)]) == 2
    one_error_line(capsys, *words)
    assert not out.exists()


def test_resume_with_the_wrong_command_names_the_right_one(tmp_path, trained_ae, capsys):
    from conftest import tiny_run

    diffusion = tiny_run(tmp_path, steps=2)
    before = sorted(p.name for p in (diffusion / "checkpoints").iterdir())
    assert main(["train", "--resume", "--out", str(trained_ae), "--steps", "20", "--quiet"]) == 2
    one_error_line(capsys, "autoencoder run", f"ddpmkit autoencoder train --out {trained_ae} --resume")
    assert main(["autoencoder", "train", "--resume", "--out", str(diffusion), "--steps", "20", "--quiet"]) == 2
    one_error_line(capsys, "diffusion run", f"ddpmkit train --out {diffusion} --resume")
    assert sorted(p.name for p in (diffusion / "checkpoints").iterdir()) == before
    assert load_checkpoint(trained_ae).step == 8


# ---------------------------------------------------------------------------------------------------- perceptual
PERCEPTUAL = textwrap.dedent('''
    import torch
    from torch import nn

    class SquaredError(nn.Module):
        """The mean squared error per image: a stand-in for an LPIPS network."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x, y):
            return self.scale * (x - y).pow(2).flatten(1).mean(1)

    def factory():
        return SquaredError()
''')


def test_a_perceptual_loss_of_ones_own_joins_the_loss(tmp_path, monkeypatch, capsys):
    (tmp_path / "ae_perceptual_probe.py").write_text(PERCEPTUAL)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {}
    for name, flags in [("plain", []), ("w1", ["--perceptual", "ae_perceptual_probe:factory"]),
                        ("w2", ["--perceptual", "ae_perceptual_probe:factory", "--perceptual-weight", "2"])]:
        assert ae_train(tmp_path / name, "--steps", "2", *flags) == 0
        runs[name] = rows(tmp_path / name)
    first = {k: runs[k][0] for k in runs}  # step 1: the same weights, batch and posterior noise in all three runs
    l1 = float(first["plain"]["rec"])
    d1 = float(first["w1"]["rec"]) - l1
    d2 = float(first["w2"]["rec"]) - l1
    # the added term is the mean squared error, and per image MSE >= L1^2 (mean of squares >= square of mean)
    assert d1 >= l1 ** 2 * (1 - 1e-4)
    assert d2 == pytest.approx(2 * d1, rel=1e-3)  # linear in --perceptual-weight
    assert first["w1"]["loss"] != first["plain"]["loss"]
    assert runs["w1"][1]["loss"] != runs["plain"][1]["loss"]
    assert json.loads((tmp_path / "w1" / "config.json").read_text())["train"]["perceptual"] == \
        "ae_perceptual_probe:factory"

    capsys.readouterr()
    for spec, words in [("no_such_module_anywhere:factory", ["no_such_module_anywhere"]),
                        ("ae_perceptual_probe:nope", ["nope"])]:
        out = tmp_path / spec.replace(":", "_")
        assert ae_train(out, "--steps", "2", "--perceptual", spec) == 2
        one_error_line(capsys, *words)
        assert not out.exists()


# ---------------------------------------------------------------------------------------------------- it learns
def test_training_raises_the_held_out_psnr(tmp_path, capsys):
    run = tmp_path / "run"
    assert ae_train(run, "--steps", "40", "--lr", "3e-3", "--warmup", "5", "--ema-decay", "0.9") == 0
    cfg = AutoencoderConfig.from_json(json.loads((run / "config.json").read_text()))
    data = load_dataset("digits", image_size=16, channels=1, progress=False)
    _, held = split_for_training(data, cfg)
    held = held[:100]
    torch.manual_seed(cfg.seed)  # the weights at step 0, as the run built them
    initial = AutoencoderKL.from_config(cfg.model_config()).eval()
    before = evaluate_reconstruction(initial, held).psnr
    after = evaluate_reconstruction(Run.open(run).load_model(ema=True), held).psnr
    print(f"held-out PSNR: {before:.2f} dB at step 0, {after:.2f} dB at step 40")
    assert after > before + 3
