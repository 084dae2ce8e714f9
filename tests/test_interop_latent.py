"""Interop with diffusers for latent diffusion runs: an unconditional latent run exports as an ``LDMPipeline`` folder
(its autoencoder copy as an AutoencoderKL in ``vqvae/``), a latent map LDMPipeline cannot apply and a class-conditional
latent run as the folder's own pipeline with a ``vae``; diffusers decodes the same images as ddpmkit from the same
initial latents, and an import of the folder is a latent run that samples the same images again."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DiffusionPipeline, LDMPipeline  # noqa: E402
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import perturb_run, quiet_main, tiny_flags  # noqa: E402
from ddpmkit.cli import main  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import sample  # noqa: E402
from ddpmkit.store import read_config, write_config  # noqa: E402

# Measured on these runs: max |diffusers - ddpmkit| = 5e-7 (unconditional) to 4.4e-6 (class-conditional) on the
# decoded images in [0, 1]. The sampled latents agree to 3e-7 to 9e-7 (float32 rounding: diffusers multiplies its
# alphas in float32, ddpmkit in float64); the rest is the two autoencoders' decoders, which differ by up to 5e-6 on
# the same latents (about 2e-6 of the images' range: another float32 summation order). A wrong scale, shift, label
# or guidance weight moves the images by 1e-2 or more (checked below): 5e-5 keeps a 10x margin both ways.
TOL = 5e-5
S = 10  # DDIM steps: they divide T = 40, where diffusers' leading spacing is ddpmkit's uniform one




@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny autoencoder (f = 4, 2 latent channels) and two latent runs on it (32x32 digits -> 2x8x8 latents,
    T = 40): unconditional, and class-conditional (v objective, weights perturbed)."""
    root = tmp_path_factory.mktemp("latent_interop")
    ae, lat, cond = root / "ae", root / "lat", root / "cond"
    quiet_main(["autoencoder", "train", "--steps", "2", "--base-channels", "8", "--num-groups", "4",
                "--latent-channels", "2", "--batch-size", "8", "--num-samples", "0", "--out", str(ae), "--quiet"])
    common = ["train", "--autoencoder", str(ae), *tiny_flags(image_size=32), "--steps", "2", "--sample-every", "100",
              "--num-samples", "0"]
    quiet_main([*common, "--out", str(lat)])
    quiet_main([*common, "--class-cond", "--objective", "v", "--out", str(cond)])
    perturb_run(cond, 4)
    return root


def _pipe(path: Path, **kw):
    pipe = DiffusionPipeline.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddpmkit_images(run: Path, x_T, labels=None, w=0.0) -> torch.Tensor:
    """ddpmkit's DDIM (S uniform steps, eta 0) from the latents x_T, decoded, in [0, 1]: [B, C, H, W]."""
    den = Run.open(run).denoiser(guidance=w or None)
    assert den.clip_x0 is False  # a latent run never clips its latents
    if labels is not None:
        den = den.with_cond(torch.tensor(labels))
    return (den.to_pixels(sample(den, x_T, sampler="ddim", steps=S, spacing="uniform")) / 2 + 0.5).clamp(0, 1)


def _not_clamped(images) -> float:
    images = torch.as_tensor(images)
    return ((images > 0.02) & (images < 0.98)).float().mean().item()


def test_an_unconditional_latent_run_loads_as_an_ldm_pipeline(runs, tmp_path):
    lat, out = runs / "lat", tmp_path / "out"
    printed = quiet_main(["export-diffusers", str(lat), "--out", str(out)])
    index = json.loads((out / "model_index.json").read_text())
    assert index == {"_class_name": "LDMPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                     "unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "AutoencoderKL"]}
    assert not (out / "pipeline.py").exists()  # diffusers' own pipeline: no code of ours in the folder
    scale = read_config(lat)["latent"]["scale"]
    pipe = LDMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.vqvae, DiffusersVAE) and pipe.vqvae.config.scaling_factor == scale
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.set_alpha_to_one is True
    assert type(_pipe(out)).__name__ == "LDMPipeline"  # DiffusionPipeline reads the same folder
    # LDMPipeline takes no latents: it draws them from the generator on the CPU, as torch.randn does
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    a = pipe(batch_size=3, num_inference_steps=S, generator=torch.Generator().manual_seed(5), output_type="np").images
    b = _ddpmkit_images(lat, x_T).permute(0, 2, 3, 1).numpy()
    diff = float(np.abs(a - b).max())
    print(f"LDMPipeline, DDIM {S} steps: max abs difference {diff:.2e}")
    assert a.shape == (3, 32, 32, 1) and _not_clamped(a) > 0.5
    assert diff < TOL
    # the printed call runs as printed
    code = printed.split("in Python: ", 1)[1].strip()
    assert "LDMPipeline.from_pretrained" in code and "num_inference_steps=40" in code  # T = 40 < LDM's 50
    scope: dict = {}
    exec(code, scope)
    assert [im.size for im in scope["images"]] == [(32, 32)] * 4


def test_a_latent_map_ldm_cannot_apply_gets_its_own_pipeline(runs, tmp_path):
    """A per-channel scale and a shift (e.g. a VAE's latents_mean/latents_std): LDMPipeline divides by one
    scaling_factor, so the folder carries LatentDDPMPipeline, which applies the exact map."""
    run = tmp_path / "lat"
    shutil.copytree(runs / "lat", run)
    config = read_config(run)
    s = config["latent"]["scale"]
    config["latent"].update(scale=[1.1 * s, 0.9 * s], shift=[0.1, -0.2])
    write_config(run, config)
    out = tmp_path / "out"
    printed = quiet_main(["export-diffusers", str(run), "--out", str(out)])
    assert "not an LDMPipeline" in printed and "trust_remote_code=True" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LatentDDPMPipeline"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    space = Run.open(run).latent_space()
    assert index["latent_scale"] == space.scale.tolist() and index["latent_shift"] == space.shift.tolist()
    vae = json.loads((out / "vae" / "config.json").read_text())  # diffusers' conventions say the same map
    assert vae["latents_mean"] == space.shift.tolist() and vae["scaling_factor"] == 1.0
    pipe = _pipe(out, trust_remote_code=True)
    assert type(pipe).__name__ == "LatentDDPMPipeline" and pipe.scheduler.config.clip_sample is False
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    a = pipe(latents=x_T.clone(), num_inference_steps=S, eta=0.0, output_type="pt").images
    b = _ddpmkit_images(run, x_T)
    diff = (a - b).abs().max().item()
    print(f"LatentDDPMPipeline, DDIM {S} steps: max abs difference {diff:.2e}")
    assert diff < TOL and _not_clamped(a) > 0.5
    # the map matters: the same latents through LDMPipeline's single scaling_factor decode otherwise
    z = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        plain = pipe.vae.decode(z / s).sample
    assert (pipe.decode_latents(z) - plain).abs().max() > 1e-2
    # and it comes back: an import of the folder has the same map
    quiet_main(["import-diffusers", str(out), "--out", str(tmp_path / "back")])
    back = Run.open(tmp_path / "back").latent_space()
    assert torch.equal(back.scale, space.scale) and torch.equal(back.shift, space.shift)


@pytest.mark.parametrize("w", [0.0, 2.0])
def test_a_class_conditional_latent_run_decodes_in_its_pipeline(runs, tmp_path, w):
    cond, out = runs / "cond", tmp_path / "out"
    printed = quiet_main(["export-diffusers", str(cond), "--out", str(out)])
    assert "decoded by its vae/" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ClassConditionalDDPMPipeline"] and index["null_class"] == 10
    assert index["latent_scale"] == read_config(cond)["latent"]["scale"] and index["latent_shift"] == 0.0
    pipe = _pipe(out, trust_remote_code=True)  # the call the export prints
    assert isinstance(pipe.vae, DiffusersVAE) and pipe.scheduler.config.clip_sample is False
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    labels = [3, 7, 0]
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    kw = dict(num_inference_steps=S, latents=x_T.clone(), eta=0.0, output_type="pt")
    a = pipe(labels, guidance=w, **kw).images
    b = _ddpmkit_images(cond, x_T, labels, w)
    diff = (a - b).abs().max().item()
    print(f"class-conditional latent export, DDIM {S} steps, w = {w:g}: max abs difference {diff:.2e}")
    assert a.shape == (3, 1, 32, 32) and _not_clamped(a) > 0.5
    assert diff < TOL
    # labels and guidance move the images far more than the tolerance
    assert (a - pipe([4, 8, 1], guidance=w, **kw).images).abs().max() > 1e-2
    assert (a - pipe(labels, guidance=w + 1.0, **kw).images).abs().max() > 1e-2


def _sample_pngs(run: Path, out: Path, *extra) -> np.ndarray:
    quiet_main(["sample", str(run), "--sampler", "ddim", "--steps", str(S), "--n", "4", "--seed", "3", "--out",
                str(out), "--quiet", *extra])
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("sample_*.png"))])


@pytest.mark.parametrize("name,extra", [("lat", []), ("cond", ["--class", "5", "--guidance", "1"])])
def test_an_exported_latent_run_imports_back_and_samples_the_same_images(runs, tmp_path, name, extra):
    run = runs / name
    quiet_main(["export-diffusers", str(run), "--out", str(tmp_path / "out")])
    printed = quiet_main(["import-diffusers", str(tmp_path / "out"), "--out", str(tmp_path / "back")])
    assert "latent diffusion U-Net on 2x8x8 latents" in printed and "f=4, 1x32x32 images" in printed
    back = Run.open(tmp_path / "back")
    assert back.is_latent and back.pixel_shape == (1, 32, 32) and (back.dir / "autoencoder" / "config.json").is_file()
    original = read_config(run)["latent"]
    section = back.latent_section
    assert section["scale"] == original["scale"] and section["shift"] == 0.0
    assert section["shape"] == original["shape"] == [2, 8, 8] and section["image_shape"] == original["image_shape"]
    assert back.class_names == Run.open(run).class_names and back.null_class == Run.open(run).null_class
    # the autoencoder's weights come back bit for bit, and the copy's hash is checked when the run opens it
    for k, v in Run.open(run).latent_space().autoencoder.state_dict().items():
        assert torch.equal(v, back.latent_space().autoencoder.state_dict()[k]), k
    a = _sample_pngs(run, tmp_path / "a", *extra)
    b = _sample_pngs(back.dir, tmp_path / "b", *extra)
    assert a.shape == (4, 32, 32) and a.std() > 5
    assert np.array_equal(a, b)  # the same weights, the same map: `ddpmkit sample` writes the same images


def _bad(args, capsys, fragment):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_latent_cases_give_one_line_and_write_nothing(runs, tmp_path, capsys):
    # a latent run without its copy of the autoencoder cannot be exported: its latents mean nothing without it
    run = tmp_path / "lat"
    shutil.copytree(runs / "lat", run)
    shutil.rmtree(run / "autoencoder")
    _bad(["export-diffusers", str(run), "--out", str(tmp_path / "x")], capsys, "latent run without its autoencoder")
    assert not (tmp_path / "x").exists()
    # a folder to import: LDM's own checkpoints decode with a VQModel, which ddpmkit does not have
    quiet_main(["export-diffusers", str(runs / "lat"), "--out", str(tmp_path / "ok")])
    bad = tmp_path / "vq"
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "vqvae" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    _bad(["import-diffusers", str(bad), "--out", str(tmp_path / "r")], capsys, "is a diffusers VQModel")
    # a U-Net that does not fit the autoencoder's latents
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "ok", bad)
    vae = json.loads((bad / "vqvae" / "config.json").read_text())
    DiffusersVAE(**{k: v for k, v in vae.items() if not k.startswith("_")} | {"latent_channels": 3}).save_pretrained(
        bad / "vqvae")
    _bad(["import-diffusers", str(bad), "--out", str(tmp_path / "r")], capsys, "makes 3-channel latents")
    # a scale that is no scale
    shutil.rmtree(bad)
    shutil.copytree(tmp_path / "ok", bad)
    (bad / "vqvae" / "config.json").write_text(json.dumps({**vae, "scaling_factor": -1.0}))
    _bad(["import-diffusers", str(bad), "--out", str(tmp_path / "r")], capsys, "scaling_factor=-1.0")
    assert not (tmp_path / "r").exists()
