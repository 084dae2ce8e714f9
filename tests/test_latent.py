"""Latent diffusion (`ddpmkit train --autoencoder RUN`) on tiny runs: an identity autoencoder makes a latent run the
pixel run bit for bit; the scale, the cache of the latents, sampling, decoding, exact resume with the run's own copy
of the autoencoder, the checks of that copy, the refusals, and the evaluations of a latent run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import one_error_line, tiny_flags
from PIL import Image
from safetensors.torch import load_file, save_file

import ddpmkit.latent as latent_mod
import ddpmkit.run as run_mod
import ddpmkit.train.latent_data as latent_data
from ddpmkit.cli import main
from ddpmkit.data import load_dataset
from ddpmkit.images import from_uint8, to_uint8
from ddpmkit.models.autoencoder import DiagonalGaussian
from ddpmkit.run import Run
from ddpmkit.samplers import sample
from ddpmkit.store.checkpoint import load_checkpoint

# A tiny f = 4 autoencoder of the digits at 32x32: latents 2x8x8.
TINY_AE = ["--image-size", "32", "--factor", "4", "--base-channels", "8", "--num-groups", "4", "--latent-channels", "2",
           "--no-mid-attention", "--batch-size", "8", "--sample-every", "1000", "--num-samples", "0", "--quiet"]


def diffusion_flags(**overrides) -> list[str]:
    """The tests' tiny U-Net (conftest's TINY_NET), for the digits at 32x32 pixels unless overridden; a latent run's
    U-Net then works on the 8x8 latents. Dropout on and the learning rate changing at every step, so that a resume
    must restore everything to be exact."""
    settings = dict(image_size=32, steps=4, dropout=0.1, warmup=100, checkpoint_every=100, sample_every=100,
                    num_samples=0)
    return tiny_flags(**{**settings, **overrides})


def train(out, *flags, quiet=True) -> int:
    args = ["train", *flags, "--out", str(out)]
    if not quiet:
        args.remove("--quiet")
    return main(args)


def assert_same_weights(a, b) -> None:
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    assert ca.step == cb.step
    assert set(ca.model_state) == set(cb.model_state)
    for k in ca.model_state:
        assert torch.equal(ca.model_state[k], cb.model_state[k]), k
        assert torch.equal(ca.ema_state[k], cb.ema_state[k]), k


def latent_section(run) -> dict:
    return json.loads((run / "config.json").read_text())["latent"]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(autouse=True)
def own_cache(monkeypatch, tmp_path):
    """Each test's latents are cached in a folder of its own."""
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    """A tiny autoencoder run of 6 steps (tests that change it work on a copy)."""
    run = tmp_path_factory.mktemp("ae") / "ae"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "ae-cache"))
        assert main(["autoencoder", "train", *TINY_AE, "--steps", "6", "--out", str(run)]) == 0
    return run


@pytest.fixture
def ae_copy(ae_run, tmp_path):
    dest = tmp_path / "ae"
    shutil.copytree(ae_run, dest)
    return dest


def posterior_means(ae_dir, size=32) -> torch.Tensor:
    """The posterior means of every digit at ``size``, encoded here, by the autoencoder's EMA weights."""
    model = Run.open(ae_dir).load_model(ema=True).eval()
    images = load_dataset("digits", image_size=size, channels=1, progress=False).images
    with torch.no_grad():
        return torch.cat([model.encode(from_uint8(images[i:i + 256])).mean for i in range(0, len(images), 256)])


# ---------------------------------------------------------------------------------------------------- identity
class IdentityAutoencoder(torch.nn.Module):
    """An autoencoder with f = 1 whose posterior is a point mass at the image (log-variance -30) and whose decoder
    is the identity: with the scale 1, its latent space is pixel space."""

    factor = 1

    def __init__(self, channels: int = 1):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # so that .to() and device lookups have a parameter
        self.latent_channels = channels
        self.config = {"in_channels": channels, "latent_channels": channels, "identity": True}

    def latent_shape(self, image_size: int):
        return (self.latent_channels, image_size, image_size)

    def encode(self, x):
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, -30.0)], 1))

    def decode(self, z):
        return z


@pytest.fixture
def identity_autoencoder(monkeypatch):
    """Both places that open an autoencoder give the identity; the calls are counted."""
    calls = []

    def opener(path):
        calls.append(str(path))
        return (IdentityAutoencoder(), {"model": {"in_channels": 1}, "latent": {"scaling_factor": 1.0}},
                "identity-autoencoder")

    monkeypatch.setattr(latent_data, "open_autoencoder", opener)
    monkeypatch.setattr(run_mod, "open_autoencoder", opener)
    return calls


@pytest.mark.parametrize("flip", [False, True])
def test_an_identity_autoencoder_makes_the_latent_run_the_pixel_run(tmp_path, identity_autoencoder, flip):
    flags = [*diffusion_flags(image_size=8, flip=flip), "--channels", "1"]
    pixel, latent = tmp_path / "pixel", tmp_path / "latent"
    assert train(pixel, *flags) == 0
    # nothing reads the --autoencoder path before open_autoencoder: it need not even exist
    assert train(latent, *flags, "--autoencoder", str(tmp_path / "no-such-run")) == 0
    assert identity_autoencoder == [str(tmp_path / "no-such-run")]

    section = latent_section(latent)
    assert section["scale"] == 1.0 and section["shift"] == 0.0 and section["scale_source"] == "autoencoder"
    assert section["shape"] == [1, 8, 8] and section["image_shape"] == [1, 8, 8]
    assert (latent / "autoencoder" / "config.json").is_file()
    assert Run.open(latent).is_latent and not Run.open(pixel).is_latent
    assert_same_weights(pixel, latent)

    # sampling: the pixel run without clipping (a latent run never clips) draws the same images, as PNGs ...
    common = ["--n", "6", "--steps", "4", "--quiet"]
    assert main(["sample", str(pixel), "--no-clip", *common, "--out", str(tmp_path / "sp")]) == 0
    assert main(["sample", str(latent), *common, "--out", str(tmp_path / "sl")]) == 0
    assert main(["sample", str(pixel), *common, "--out", str(tmp_path / "clipped")]) == 0
    names = [f"sample_{i:05d}.png" for i in range(6)]
    for name in names:
        assert png(tmp_path / "sp" / name).shape == (8, 8)
        assert np.array_equal(png(tmp_path / "sp" / name), png(tmp_path / "sl" / name)), name
    # ... which clipping would have changed (so the comparison above sees the difference a clip makes)
    assert any(not np.array_equal(png(tmp_path / "sp" / n), png(tmp_path / "clipped" / n)) for n in names)

    # ... and as float tensors, through the library
    den_p, den_l = Run.open(pixel).denoiser(clip_x0=False), Run.open(latent).denoiser()
    xp = den_p.to_pixels(sample(den_p, (5, 1, 8, 8), sampler="ddpm", steps=6, noise=3))
    xl = den_l.to_pixels(sample(den_l, (5, 1, 8, 8), sampler="ddpm", steps=6, noise=3))
    assert xp.abs().max() > 1  # unclipped values beyond the pixels' range, carried through unchanged
    assert torch.equal(xp, xl)


# ---------------------------------------------------------------------------------------------------- the scale
def test_the_measured_scale_makes_the_latents_std_one(tmp_path, ae_run):
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_run)) == 0
    section = latent_section(run)
    assert section["scale_source"] == "measured" and section["shift"] == 0.0
    assert section["shape"] == [2, 8, 8] and section["image_shape"] == [1, 32, 32]
    means = posterior_means(ae_run)
    assert means.shape == (1797, 2, 8, 8)
    std = float((means * section["scale"]).double().std())
    print(f"scaled latents' std: {std:.5f} (scale {section['scale']:.5g})")
    assert std == pytest.approx(1.0, rel=0.02)
    assert section["latent_std"] == pytest.approx(1.0, rel=0.02)
    assert abs(float(means.double().std()) - 1) > 0.05  # the scale had something to do
    # the U-Net is the latents': 2 channels of 8x8
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["in_channels"] == 2 and model["image_size"] == 8


def test_the_autoencoders_own_scaling_factor_is_kept(tmp_path, ae_copy):
    config = json.loads((ae_copy / "config.json").read_text())
    config["latent"]["scaling_factor"] = 0.5
    (ae_copy / "config.json").write_text(json.dumps(config))
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_copy)) == 0
    section = latent_section(run)
    assert section["scale"] == 0.5 and section["shift"] == 0.0 and section["scale_source"] == "autoencoder"
    expected_std = 0.5 * float(posterior_means(ae_copy).double().std())
    assert section["latent_std"] == pytest.approx(expected_std, rel=1e-4)
    # the run's copy of the autoencoder keeps its scaling factor, and the run samples in that space
    assert json.loads((run / "autoencoder" / "config.json").read_text())["latent"]["scaling_factor"] == 0.5
    space = Run.open(run).latent_space()
    assert space.scale.tolist() == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------------- the cache
def test_latents_are_cached_and_a_damaged_cache_is_encoded_again(tmp_path, ae_run, own_cache, capsys):
    flags = [*diffusion_flags(steps=2), "--autoencoder", str(ae_run)]
    assert train(tmp_path / "first", *flags, quiet=False) == 0
    err = capsys.readouterr().err
    assert "encoding the 1,797 images into latents once" in err and "read from the cache" not in err
    files = list((own_cache / "latents").glob("*.safetensors"))
    assert len(files) == 1
    cached = load_file(files[0])["means"].clone()  # a copy: load_file maps the file, which is damaged below
    assert torch.equal(cached, posterior_means(ae_run))  # the cache holds the posterior means, unscaled

    assert train(tmp_path / "second", *flags, quiet=False) == 0
    err = capsys.readouterr().err
    assert "read from the cache" in err and "encoding" not in err
    assert_same_weights(tmp_path / "first", tmp_path / "second")

    for damage in (lambda b: b"not a safetensors file", lambda b: b[:len(b) // 2]):
        files[0].write_bytes(damage(files[0].read_bytes()))
        out = tmp_path / f"damaged{len(files[0].read_bytes())}"
        assert train(out, *flags, quiet=False) == 0
        err = capsys.readouterr().err
        assert "warning: ignoring the latent cache" in err and "encoding the 1,797 images" in err
        assert torch.equal(load_file(files[0])["means"], cached)  # encoded again, the same
        assert_same_weights(tmp_path / "first", out)
        assert latent_section(out) == {**latent_section(tmp_path / "first"), "autoencoder": str(ae_run)}


def test_flip_serves_the_mirror_images_latents(tmp_path, ae_run, own_cache):
    # a latent's mirror image is not the latent of the mirror image: --flip needs the mirror images encoded
    assert train(tmp_path / "run", *diffusion_flags(steps=2, flip=True), "--autoencoder", str(ae_run)) == 0
    (path,) = (own_cache / "latents").glob("*-flip.safetensors")
    cached = load_file(path)
    images = load_dataset("digits", image_size=32, channels=1, progress=False).images
    model = Run.open(ae_run).load_model(ema=True).eval()
    with torch.no_grad():
        means = model.encode(from_uint8(images)).mean
        mirrored = model.encode(from_uint8(images).flip(3)).mean
    assert torch.allclose(cached["means"], means, atol=1e-6)
    assert torch.allclose(cached["mirrored"], mirrored, atol=1e-6)
    assert not torch.allclose(mirrored, means.flip(3), atol=1e-2)

    # the training batches: each image's latents, or its mirror image's where the batcher flips, scaled
    from ddpmkit.train import config_from_preset
    from ddpmkit.train.distributed import current
    from ddpmkit.train.task import TaskContext
    from ddpmkit.train.tasks.diffusion import DiffusionTask

    cfg = config_from_preset("digits", image_size=32, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                             num_groups=4, T=40, sample_steps=5, batch_size=64, flip=True, autoencoder=str(ae_run))
    cfg.validate()
    task = DiffusionTask(cfg, TaskContext(torch.device("cpu"), current(), lambda msg: None, quiet=True))
    scale = latent_section(tmp_path / "run")["scale"]
    batcher = task.batcher
    state = batcher.state_dict()
    idx, flips = batcher.next_indices()
    batcher.load_state_dict(state)
    x = batcher.next_batch()
    expected = torch.where(flips.view(-1, 1, 1, 1), mirrored[idx], means[idx]) * scale
    assert flips.any() and not flips.all()
    assert torch.allclose(x, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- sample, resume
def test_a_latent_run_samples_images_of_the_pixel_shape(tmp_path, ae_run):
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_run)) == 0
    out = tmp_path / "samples"
    assert main(["sample", str(run), "--sampler", "ddim", "--n", "3", "--steps", "3", "--seed", "5", "--quiet",
                 "--out", str(out)]) == 0
    r = Run.open(run)
    assert tuple(r.pixel_shape) == (1, 32, 32) and tuple(r.image_shape) == (2, 8, 8)
    # the same latents drawn through the library, decoded by hand: the autoencoder's decoder at z / scale
    den = r.denoiser()
    z = sample(den, (3, 2, 8, 8), sampler="ddim", steps=3, noise=5)
    ae = Run.open(ae_run).load_model(ema=True).eval()
    with torch.no_grad():
        x = ae.decode(z / latent_section(run)["scale"])
    assert x.shape == (3, 1, 32, 32)
    pixels = to_uint8(x)
    for i in range(3):
        image = png(out / f"sample_{i:05d}.png")
        assert image.shape == (32, 32)
        # the PNG is the decoded sample (up to a level where the float rounding of two decodes straddles a half)
        assert np.abs(image.astype(int) - pixels[i, 0].numpy().astype(int)).max() <= 1


def test_a_latent_run_resumes_bit_for_bit_with_its_own_autoencoder(tmp_path, ae_copy):
    flags = [*diffusion_flags(steps=6, checkpoint_every=2), "--autoencoder", str(ae_copy)]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, *flags) == 0
    assert train(split, *diffusion_flags(steps=2, checkpoint_every=2), "--autoencoder", str(ae_copy)) == 0
    hash_then = latent_section(split)["autoencoder_hash"]

    # the autoencoder run trains on: its hash changes, and a new latent run would see other latents
    assert main(["autoencoder", "train", "--resume", "--steps", "8", "--quiet", "--out", str(ae_copy)]) == 0
    assert run_mod.open_autoencoder(ae_copy)[2] != hash_then
    assert train(split, "--resume", "--steps", "4", "--quiet") == 0
    assert latent_section(split)["autoencoder_hash"] == hash_then

    shutil.rmtree(ae_copy)  # and then it is gone
    assert train(split, "--resume", "--steps", "6", "--quiet") == 0
    assert_same_weights(straight, split)
    assert latent_section(split) == latent_section(straight)
    ca, cb = load_checkpoint(straight), load_checkpoint(split)
    for i, st in ca.optimizer_state["state"].items():
        for name, v in st.items():
            assert torch.equal(v, cb.optimizer_state["state"][i][name]), (i, name)
    # the run still samples without the original autoencoder
    assert main(["sample", str(split), "--n", "2", "--steps", "2", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert png(tmp_path / "s" / "sample_00001.png").shape == (32, 32)


def test_a_resume_without_the_copy_takes_the_same_autoencoder_or_refuses(tmp_path, ae_copy, capsys):
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_copy)) == 0
    section = latent_section(run)
    shutil.rmtree(run / "autoencoder")
    # the run at --autoencoder is still the one the run trained with: it is used, with the run's scale, and copied
    assert train(run, "--resume", "--steps", "4", "--quiet") == 0
    assert latent_section(run) == section and (run / "autoencoder" / "config.json").is_file()

    # it trained on since: a resume without the copy would train on other latents, so it is refused
    assert main(["autoencoder", "train", "--resume", "--steps", "8", "--quiet", "--out", str(ae_copy)]) == 0
    shutil.rmtree(run / "autoencoder")
    capsys.readouterr()
    assert train(run, "--resume", "--steps", "6", "--quiet") == 2
    one_error_line(capsys, "hash changed", "missing")
    assert load_checkpoint(run).step == 4 and latent_section(run) == section


# ---------------------------------------------------------------------------------------------------- the copy
def _rewrite_one_tensor(run) -> tuple:
    (ckpt,) = (run / "autoencoder" / "checkpoints").iterdir()
    weights = ckpt / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    return ckpt, weights


def test_an_altered_copy_of_the_autoencoder_is_refused(tmp_path, ae_run, capsys):
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_run)) == 0
    out = tmp_path / "samples"
    ckpt, weights = _rewrite_one_tensor(run)
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--quiet", "--out", str(out)]) == 2
    one_error_line(capsys, str(weights.name))
    assert not out.exists()

    # the manifest brought up to date with the altered file: the hash of the weights still tells
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = weights.read_bytes()
    manifest["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--quiet", "--out", str(out)]) == 2
    one_error_line(capsys, "hash")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- refusals
def test_wrong_autoencoder_settings_are_one_line_and_write_nothing(tmp_path, ae_run, capsys):
    from conftest import tiny_run

    diffusion = tiny_run(tmp_path, "diffusion", steps=2)
    out = tmp_path / "out"
    cases = [
        (["--autoencoder", str(diffusion)], ["diffusion run", "not an autoencoder"]),
        (["--autoencoder", str(ae_run), "--channels", "3"], ["1-channel", "--channels is 3"]),
        (["--autoencoder", str(ae_run), "--image-size", "30"], ["30", "4"]),
        (["--autoencoder", str(tmp_path / "nowhere")], ["does not exist"]),
    ]
    capsys.readouterr()
    for extra, words in cases:
        assert train(out, *diffusion_flags(steps=2), *extra) == 2, extra
        one_error_line(capsys, *words)
        assert not out.exists(), extra


# ---------------------------------------------------------------------------------------------------- evaluation
@pytest.fixture
def fast_judge(monkeypatch, tmp_path_factory):
    """The digits classifier of the evaluations, trained for 2 epochs into a folder of the tests' own."""
    from ddpmkit.metrics.digits import DigitsClassifier

    folder = tmp_path_factory.getbasetemp() / "judge"
    original = DigitsClassifier.load_or_train.__func__
    monkeypatch.setattr(DigitsClassifier, "load_or_train", classmethod(
        lambda cls, **kw: original(cls, **{**kw, "epochs": 2, "cache_dir": folder})))


def test_fid_and_memorization_of_a_latent_run_judge_decoded_images(tmp_path, ae_run, fast_judge, monkeypatch,
                                                                   capsys):
    run = tmp_path / "latent"
    assert train(run, *diffusion_flags(steps=2), "--autoencoder", str(ae_run)) == 0
    decoded = []
    original = latent_mod.LatentSpace.decode

    def spy(self, z):
        x = original(self, z)
        decoded.append((tuple(z.shape[1:]), tuple(x.shape[1:]), x.shape[0]))
        return x

    monkeypatch.setattr(latent_mod.LatentSpace, "decode", spy)
    capsys.readouterr()
    assert main(["eval", "fid", str(run), "--features", "digits", "--n", "50", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert "FID (digits features" in out
    assert {d[:2] for d in decoded} == {((2, 8, 8), (1, 32, 32))} and sum(d[2] for d in decoded) == 50

    decoded.clear()
    assert main(["eval", "memorization", str(run), "--n", "20", "--steps", "5"]) == 0
    assert {d[:2] for d in decoded} == {((2, 8, 8), (1, 32, 32))} and sum(d[2] for d in decoded) == 20
    facts = json.loads((run / "eval" / "memorization.json").read_text())
    assert facts  # written
    assert (run / "eval" / "memorization.png").is_file()
