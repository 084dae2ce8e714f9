"""Interop with diffusers for runs trained with EDM's preconditioning (``--precond edm``): the export's own pipeline
(diffusers' code stepping the exported U-Net through the folder's ``pipeline.py``) draws what ddpmkit draws from the
same x_T, with diffusers' DDIMScheduler and DDPMScheduler, guided or not; and an import of the export is a run with
the same preconditioning whose ``ddpmkit sample`` writes the same images as the original's."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from conftest import one_error_line, perturb_run, quiet_main, tiny_flags, tiny_run  # noqa: E402
from ddpmkit.cli import main  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.samplers import sample, timesteps  # noqa: E402
from ddpmkit.store import read_config  # noqa: E402

S = 10  # DDIM steps: they divide T = 40, where diffusers' leading spacing is ddpmkit's uniform one
T = 40  # tiny_cfg's
# Measured on these runs: max |diffusers - ddpmkit| = 1.8e-7 to 4.2e-7 on the [0, 1] images (float32 rounding:
# diffusers multiplies its alphas in float32, ddpmkit in float64). A pipeline that drops c_in, takes ln(sigma) for
# c_noise (no / 4), drops c_skip x or forgets x = x_t / sqrt(alpha_bar) moves them by 1e-2 to 0.5 (each tried once
# by hand), and reading the U-Net without the preconditioning or with another sigma_data by more than 5e-2 (tested
# below): 1e-5 keeps a 20x margin above the rounding and 1000x below any of them.
TOL = 1e-5




@pytest.fixture(scope="module")
def edm(tmp_path_factory):
    """Two tiny EDM runs on 8x8 digits (T = 40, sigma_data 0.5), their weights perturbed: class-conditional ("cond")
    and unconditional ("uncond"), each exported through the CLI into ``NAME-out``; the printed lines by name."""
    root = tmp_path_factory.mktemp("edm_interop")
    printed = {}
    for name, extra in (("cond", {"class_cond": True}), ("uncond", {})):
        run = tiny_run(root, name, precond="edm", steps=2, num_samples=0, **extra)
        perturb_run(run, 4)
        printed[name] = quiet_main(["export-diffusers", str(run), "--out", str(root / f"{name}-out")])
    return root, printed


def _pipe(out: Path, **kw):
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True, **kw)  # the call the export prints
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _draw(pipe, labels, w, scheduler: str, x_T, seed: int = 9):
    """diffusers' images in [0, 1] from x_T: S DDIM steps (eta 0, eps from the clipped x0, as ddpmkit's DDIM), or
    all T steps of the folder's DDPMScheduler with its noise from a generator seeded ``seed``."""
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        kw = dict(num_inference_steps=S, eta=0.0, use_clipped_model_output=True)
    else:
        assert type(pipe.scheduler) is DDPMScheduler  # the folder's own
        kw = dict(num_inference_steps=T, generator=torch.Generator().manual_seed(seed))
    if labels is None:
        return pipe(latents=x_T.clone(), output_type="pt", **kw).images
    return pipe(labels, guidance=w, latents=x_T.clone(), output_type="pt", **kw).images


def _ours(run: Path, labels, w, scheduler: str, x_T, seed: int = 9):
    """ddpmkit's images in [0, 1] from x_T: uniform DDIM at S steps, or DDPM at all T with the same noise."""
    den = Run.open(run).denoiser(guidance=w or None)
    assert den.precond == 0.5 and den.objective == "x0" and den.clip_x0 is True
    if labels is not None:
        den = den.with_cond(torch.tensor(labels))
    if scheduler == "ddim":
        x0 = sample(den, x_T, sampler="ddim", steps=S, spacing="uniform")
    else:
        x0 = sample(den, x_T, sampler="ddpm", noise=torch.Generator().manual_seed(seed))
    return (x0 / 2 + 0.5).clamp(0, 1)


def _not_clamped(images) -> float:
    return ((images > 0.02) & (images < 0.98)).float().mean().item()


CASES = [("cond", [3, 7, 0], 0.0, "ddim"), ("cond", [3, 7, 0], 2.0, "ddim"), ("cond", [3, 7, 0], 2.0, "ddpm"),
         ("uncond", None, 0.0, "ddim"), ("uncond", None, 0.0, "ddpm")]


@pytest.mark.parametrize("name,labels,w,scheduler", CASES,
                         ids=[f"{n}-w{w:g}-{s}" for n, _, w, s in CASES])
def test_the_exported_pipeline_draws_what_ddpmkit_draws(edm, name, labels, w, scheduler):
    root, _ = edm
    run, out = root / name, root / f"{name}-out"
    pipe = _pipe(out)
    assert type(pipe).__name__ == ("ClassConditionalDDPMPipeline" if labels else "UnconditionalDDPMPipeline")
    assert pipe.config.precond_sigma_data == 0.5
    # the U-Net's output is EDM's D, the clean image: the scheduler reads it as its "sample" prediction, and clips it
    # to [-1, 1] as ddpmkit's Denoiser does by default
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.config.clip_sample is True
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    a = _draw(pipe, labels, w, scheduler, x_T)
    if scheduler == "ddim":
        assert pipe.scheduler.timesteps.tolist()[::-1] == list(timesteps(T, S, "uniform"))
    b = _ours(run, labels, w, scheduler, x_T)
    diff = (a - b).abs().max().item()
    print(f"EDM export, {name}, {scheduler}, w = {w:g}: max abs difference {diff:.2e}")
    assert a.shape == (3, 1, 8, 8) and _not_clamped(a) > 0.2
    assert diff < TOL
    if labels:  # the labels and the guidance weight move the images far more than the tolerance
        assert (a - _draw(pipe, [4, 8, 1], w, scheduler, x_T)).abs().max() > 1e-2
        assert (a - _draw(pipe, labels, w + 1.0, scheduler, x_T)).abs().max() > 1e-2


@pytest.mark.parametrize("sigma_data", [None, 1.0])
def test_the_preconditioning_matters(edm, sigma_data):
    """The same folder read without the preconditioning (the U-Net's raw output taken for the clean image), or with
    another sigma_data, draws something else: the agreement above is not vacuous."""
    root, _ = edm
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    right = _draw(_pipe(root / "cond-out"), [3, 7, 0], 2.0, "ddim", x_T)
    wrong = _draw(_pipe(root / "cond-out", precond_sigma_data=sigma_data), [3, 7, 0], 2.0, "ddim", x_T)
    assert (right - wrong).abs().max().item() > 5e-2


def test_the_folder_names_the_preconditioning_and_prints_its_call(edm):
    root, printed = edm
    for name, cls in (("cond", "ClassConditionalDDPMPipeline"), ("uncond", "UnconditionalDDPMPipeline")):
        out = root / f"{name}-out"
        index = json.loads((out / "model_index.json").read_text())
        assert index["_class_name"] == ["pipeline", cls] and index["precond_sigma_data"] == 0.5
        assert (out / "pipeline.py").is_file() and "sigma_data 0.5" in printed[name]
        scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["prediction_type"] == "sample" and scheduler["_class_name"] == "DDPMScheduler"
    assert "not a DDPMPipeline" in printed["uncond"]
    code = printed["uncond"].split("in Python: ", 1)[1].strip()
    assert "pipe(batch_size=4)" in code
    scope: dict = {}
    exec(code, scope)  # the printed call itself: T DDPM steps of the folder's scheduler
    assert [im.size for im in scope["images"]] == [(8, 8)] * 4


def _sample_pngs(run: Path, out: Path, *extra) -> np.ndarray:
    quiet_main(["sample", str(run), "--n", "4", "--seed", "3", "--out", str(out), "--quiet", *extra])
    return np.stack([np.asarray(Image.open(p)) for p in sorted(out.glob("sample_*.png"))])


@pytest.mark.parametrize("name,extra", [("cond", ["--class", "5", "--guidance", "1"]), ("uncond", []),
                                        ("uncond", ["--sampler", "heun", "--steps", "4"])],
                         ids=["cond-guided", "uncond-default", "uncond-heun"])
def test_an_export_imports_back_and_samples_the_same_images(edm, tmp_path, name, extra):
    root, _ = edm
    run, back = root / name, tmp_path / "back"
    printed = quiet_main(["import-diffusers", str(root / f"{name}-out"), "--out", str(back)])
    assert "EDM's preconditioning (sigma_data 0.5)" in printed
    original, imported = Run.open(run), Run.open(back)
    assert imported.precond_sigma_data == original.precond_sigma_data == 0.5
    assert read_config(back)["diffusion"]["precond"] == read_config(run)["diffusion"]["precond"]
    assert imported.objective == "x0" and imported.schedule.kind == "linear" and imported.schedule.T == T
    assert imported.class_names == original.class_names and imported.null_class == original.null_class
    if name == "uncond":  # the export's unet/ alone keeps the preconditioning of the pipeline around it
        quiet_main(["import-diffusers", str(root / f"{name}-out" / "unet"), "--out", str(tmp_path / "unet-only")])
        assert Run.open(tmp_path / "unet-only").precond_sigma_data == 0.5
    a = _sample_pngs(run, tmp_path / "a", *extra)
    b = _sample_pngs(back, tmp_path / "b", *extra)
    assert a.shape == (4, 8, 8) and a.std() > 5
    assert np.array_equal(a, b)  # the same weights and preconditioning: `ddpmkit sample` writes the same images
    # and the samples themselves, before they become uint8 files, bit for bit
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    den_a, den_b = original.denoiser(), imported.denoiser()
    if name == "cond":
        den_a, den_b = (d.guided(1.0).with_cond(torch.tensor([5, 5, 0, 9])) for d in (den_a, den_b))
    assert torch.equal(sample(den_a, x_T, sampler="dpmpp-2m", steps=5), sample(den_b, x_T, sampler="dpmpp-2m", steps=5))


def test_a_consistency_student_of_an_edm_teacher_is_still_refused(edm, tmp_path, capsys):
    root, _ = edm
    student = tmp_path / "student"
    quiet_main(["distill", str(root / "uncond"), "--out", str(student), "--method", "consistency", "--steps", "1",
                "--teacher-steps", "2", "--round-steps", "1", "--batch-size", "8", "--quiet"])
    assert Run.open(student).precond_sigma_data == 0.5
    capsys.readouterr()
    assert main(["export-diffusers", str(student), "--out", str(tmp_path / "out")]) == 2
    one_error_line(capsys, "consistency-distilled student")
    assert not (tmp_path / "out").exists()


def test_a_bad_precond_entry_is_one_line_and_writes_nothing(edm, tmp_path, capsys):
    root, _ = edm
    for index_change, sched_change, words in (({"precond_sigma_data": -1.0}, {}, "positive number"),
                                              ({"precond_sigma_data": "half"}, {}, "positive number"),
                                              ({}, {"prediction_type": "epsilon"}, "prediction_type")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(root / "uncond-out", bad)
        for path, change in ((bad / "model_index.json", index_change),
                             (bad / "scheduler" / "scheduler_config.json", sched_change)):
            path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
        capsys.readouterr()
        assert main(["import-diffusers", str(bad), "--out", str(tmp_path / "r")]) == 2
        one_error_line(capsys, "precond_sigma_data", words)
        assert not (tmp_path / "r").exists()


def test_a_latent_edm_run_exports_imports_and_samples_the_same(tmp_path):
    """An unconditional latent EDM run: LDMPipeline cannot read it, so it gets the folder's own pipeline (with its vae
    and the latent map), which decodes what ddpmkit decodes; its import samples the same images."""
    ae, lat, out = tmp_path / "ae", tmp_path / "lat", tmp_path / "out"
    quiet_main(["autoencoder", "train", "--steps", "2", "--base-channels", "8", "--num-groups", "4",
                "--latent-channels", "2", "--batch-size", "8", "--num-samples", "0", "--out", str(ae), "--quiet"])
    quiet_main(["train", "--autoencoder", str(ae), *tiny_flags(image_size=32), "--steps", "2", "--sample-every", "100",
                "--num-samples", "0", "--precond", "edm", "--out", str(lat)])
    perturb_run(lat, 5)
    printed = quiet_main(["export-diffusers", str(lat), "--out", str(out)])
    assert "not an LDMPipeline" in printed
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "LatentDDPMPipeline"] and index["precond_sigma_data"] == 0.5
    pipe = _pipe(out)
    assert pipe.scheduler.config.prediction_type == "sample" and pipe.scheduler.config.clip_sample is False
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    x_T = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    a = pipe(latents=x_T.clone(), num_inference_steps=S, eta=0.0, output_type="pt").images
    den = Run.open(lat).denoiser()
    assert den.precond == 0.5 and den.clip_x0 is False  # latents are never clipped
    b = (den.to_pixels(sample(den, x_T, sampler="ddim", steps=S, spacing="uniform")) / 2 + 0.5).clamp(0, 1)
    diff = (a - b).abs().max().item()
    print(f"latent EDM export, DDIM {S} steps: max abs difference {diff:.2e}")
    # the two autoencoders' decoders differ by up to 5e-6 on the same latents (tests/test_interop_latent.py)
    assert diff < 5e-5 and _not_clamped(a) > 0.5
    quiet_main(["import-diffusers", str(out), "--out", str(tmp_path / "back")])
    assert Run.open(tmp_path / "back").precond_sigma_data == 0.5 and Run.open(tmp_path / "back").is_latent
    flags = ["--sampler", "ddim", "--steps", str(S)]
    assert np.array_equal(_sample_pngs(lat, tmp_path / "a", *flags), _sample_pngs(tmp_path / "back", tmp_path / "b",
                                                                                   *flags))
