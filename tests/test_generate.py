"""Sampling a run into files: per-sample noise streams, and runs written before the redesign."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.diffusion import Denoiser
from ddpmkit.generate import SampleOptions, default_out_dir, generate
from ddpmkit.run import Run
from ddpmkit.samplers import sample
from ddpmkit.samplers.batches import sample_batches

DATA = Path(__file__).parent / "data"
OLD_RUN = DATA / "run_v0_1"  # written by ddpmkit 0.1.0, before the Denoiser and the sampler registry


@pytest.fixture(scope="module")
def old_run():
    return Run.open(OLD_RUN)


@pytest.mark.parametrize("sampler,options", [("ddpm", {}), ("ddim", {"eta": 1.0})])
def test_images_do_not_depend_on_the_batch_size(old_run, sampler, options):
    den = old_run.denoiser()
    runs = {}
    for bs in (1, 7, 64):
        xs = [x for _, x in sample_batches(den, n=20, shape=old_run.image_shape, sampler=sampler, steps=10,
                                           seed=3, batch_size=bs, options=options)]
        runs[bs] = torch.cat(xs)
    assert runs[1].shape == (20, 1, 8, 8)
    for bs in (7, 64):
        # the same noise per sample; the network's batched arithmetic may differ in the last float bits
        torch.testing.assert_close(runs[bs], runs[1], atol=1e-5, rtol=0)
        assert torch.equal(((runs[bs] + 1) * 127.5).round(), ((runs[1] + 1) * 127.5).round())
    other = torch.cat([x for _, x in sample_batches(den, n=20, shape=old_run.image_shape, sampler=sampler, steps=10,
                                                    seed=4, batch_size=7, options=options)])
    assert not torch.allclose(other, runs[1])
    # a later slice of the run is the same samples as the same indices of the whole run
    tail = torch.cat([x for _, x in sample_batches(den, n=5, start=15, shape=old_run.image_shape, sampler=sampler,
                                                   steps=10, seed=3, batch_size=2, options=options)])
    torch.testing.assert_close(tail, runs[1][15:], atol=1e-5, rtol=0)


def test_generate_gives_the_same_files_at_any_batch_size(tmp_path):
    a = generate(OLD_RUN, tmp_path / "a", SampleOptions(sampler="ddpm", steps=8, n=9, batch_size=9), progress=False)
    b = generate(OLD_RUN, tmp_path / "b", SampleOptions(sampler="ddpm", steps=8, n=9, batch_size=2), progress=False)
    assert torch.equal(a["images"], b["images"])
    assert [p.name for p in a["files"]] == [p.name for p in b["files"]] == [f"sample_{i:05d}.png" for i in range(9)]
    assert a["steps"] == 8


def same_kernels(meta) -> bool:
    """Whether this process runs the PyTorch version and CPU kernels that wrote a reference file (its metadata)."""
    meta = meta or {}
    return (meta.get("torch") == torch.__version__
            and meta.get("cpu_capability") == torch.backends.cpu.get_cpu_capability())


# Samples of a reference file are bit for bit equal only where the same PyTorch ran the same CPU kernels (AVX2,
# AVX512, ...) that wrote them: another version or another vector width sums the convolutions in another order.
# Elsewhere they must agree to REF_TOL. Measured against the 0.1.0 file with torch 2.13.0 and 2.14.1 on an AVX512
# CPU: at most 4.2e-7 apart, over 40 steps with values in [-1, 1]. 1e-5 leaves 20x room and is still 1/800 of one
# uint8 level (2/255), while a changed formula (one coefficient, one timestep off) moves samples by 1e-3 or more.
REF_TOL = 1e-5


def test_a_run_written_before_the_redesign_samples_as_it_did(old_run):
    # tests/data/run_v0_1_samples.safetensors holds what ddpmkit 0.1.0 drew from this run with one generator; its
    # metadata names what wrote it ("not recorded": the tolerance applies everywhere)
    from safetensors import safe_open

    path = DATA / "run_v0_1_samples.safetensors"
    ref = load_file(path)
    with safe_open(path, "pt") as f:
        exact = same_kernels(f.metadata())
    net, schedule = old_run.load_model(), old_run.schedule
    cases = {"ddpm_small": ({"variance": "small"}, {"sampler": "ddpm"}),
             "ddpm_large": ({"variance": "large"}, {"sampler": "ddpm"}),
             "ddim10_eta0": ({}, {"sampler": "ddim", "steps": 10}),
             "ddim10_eta1": ({}, {"sampler": "ddim", "steps": 10, "eta": 1.0}),
             "ddim7_quad_noclip": ({"clip_x0": False}, {"sampler": "ddim", "steps": 7, "spacing": "quadratic"})}
    for name, (den_kw, sample_kw) in cases.items():
        g = torch.Generator().manual_seed(123)
        x_T = torch.randn((4, 1, 8, 8), generator=g)
        assert torch.equal(x_T, ref["x_T"])  # the generator itself is the same on every version
        x = sample(Denoiser(net, schedule, objective=old_run.objective, **den_kw), x_T, noise=g, **sample_kw)
        if exact:
            assert torch.equal(x, ref[name]), name
        else:  # relative too: without clipping the samples reach 157
            torch.testing.assert_close(x, ref[name], atol=REF_TOL, rtol=REF_TOL, msg=name)


def test_the_reference_tolerance_still_tells_a_changed_sampler(old_run):
    """REF_TOL is no blanket: the large variance for the small one, or eta 0.9 for 1, is refused by it."""
    ref = load_file(DATA / "run_v0_1_samples.safetensors")
    net, schedule = old_run.load_model(), old_run.schedule
    for den_kw, sample_kw, name in [({"variance": "small"}, {"sampler": "ddpm"}, "ddpm_large"),
                                    ({}, {"sampler": "ddim", "steps": 10, "eta": 0.999}, "ddim10_eta1")]:
        g = torch.Generator().manual_seed(123)
        x_T = torch.randn((4, 1, 8, 8), generator=g)
        x = sample(Denoiser(net, schedule, objective=old_run.objective, **den_kw), x_T, noise=g, **sample_kw)
        assert not torch.allclose(x, ref[name], atol=REF_TOL, rtol=REF_TOL), name


def test_default_folder_names_the_settings(old_run):
    assert default_out_dir(OLD_RUN, SampleOptions()).name == "ddim-40-uniform-eta0-seed0"  # 50 steps, at most T = 40
    assert default_out_dir(OLD_RUN, SampleOptions(sampler="ddpm", seed=3)).name == "ddpm-40-uniform-small-seed3"
    opt = SampleOptions(sampler="ddim", steps=10, spacing="trailing", options={"eta": 0.5})
    assert default_out_dir(OLD_RUN, opt).name == "ddim-10-trailing-eta0.5-seed0"
    # DDIM reads the reverse variance only where it changes the samples: the analytic one at eta > 0
    opt.variance = "analytic"
    assert default_out_dir(OLD_RUN, opt).name == "ddim-10-trailing-eta0.5-analytic-seed0"
    opt.options = {"eta": 0.0}
    assert default_out_dir(OLD_RUN, opt).name == "ddim-10-trailing-eta0-seed0"
