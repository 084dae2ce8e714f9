"""Interop with diffusers: its UNet2DModel files imported into a ddpmkit run give the same outputs, a run
exported to its format loads in diffusers with the same outputs, and our samplers on the imported model
follow diffusers' own DDPMScheduler and DDIMScheduler stepping its model from the same x_T and noise."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from conftest import randomized  # noqa: E402

from ddpmkit.diffusion.denoiser import DEFAULT_GUIDANCE  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.store import read_config  # noqa: E402
from ddpmkit.cli import main  # noqa: E402
from ddpmkit.errors import ConfigError  # noqa: E402
from ddpmkit.interop import (diffusers_config_from_unet, diffusion_from_scheduler,  # noqa: E402
                             scheduler_from_diffusion, unet_config_from_diffusers)
from ddpmkit.models.unet import UNet  # noqa: E402
from ddpmkit.samplers import sample, timesteps  # noqa: E402

# The configuration of google/ddpm-cifar10-32, as published.
CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
)
# The block layout of google/ddpm-church-256 (channels (128, 128, 256, 256, 512, 512) there), narrower here.
CHURCH_256_SMALL = dict(
    sample_size=64, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64, 128, 128),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
)
# Small enough for 1000-step sampler comparisons.
TINY = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
    norm_num_groups=8,
)

# Smaller still, for the 1000-step DDPM comparisons.
MICRO = dict(TINY, sample_size=8, block_out_channels=(16, 32), norm_num_groups=4)

# Measured on the CIFAR-10 configuration: max |ours - diffusers| = 3e-6 on outputs of magnitude ~1.5.
# float32 summation order differs (a fused qkv projection, channels summed in another order by the convs);
# 1e-4 is the bound and still 100x below what any wrong weight or wrong padding produces.
TOL = 1e-4


def _randomized(cfg: dict, seed: int = 0) -> UNet2DModel:
    return randomized(UNet2DModel, cfg, seed)


def _compare(theirs: UNet2DModel, ours: UNet, size: int, batch: int = 2, seed: int = 1) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, theirs.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    t[0] = 0
    with torch.no_grad():
        a = theirs(x, t).sample
        b = ours(x, t)
    assert a.abs().max() > 0.1  # a real signal, not zeros on both sides
    return (a - b).abs().max().item()


def _import(src: Path, run: Path):
    assert main(["import-diffusers", str(src), "--out", str(run)]) == 0
    return Run.open(run).load_model()


def test_cifar10_32_configuration_imports_exactly(tmp_path, capsys):
    theirs = _randomized(CIFAR10_32)
    theirs.save_pretrained(tmp_path / "model")  # safetensors, current attention naming
    ours = _import(tmp_path / "model", tmp_path / "run")
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 35_746_307
    cfg = ours.config
    assert cfg["channel_mults"] == [1, 2, 2, 2] and cfg["attention_resolutions"] == [16]
    assert cfg["downsample_padding"] == "asymmetric" and cfg["num_heads"] == 1
    diff = _compare(theirs, ours, 32)
    print(f"cifar10-32 max abs difference: {diff:.2e}")
    assert diff < TOL
    # no scheduler config beside the model: the paper's schedule, and the run says so
    assert "paper's defaults" in capsys.readouterr().out
    assert Run.open(tmp_path / "run").schedule.kind == "linear"


def _to_old_attention_names(state: dict) -> dict:
    """The attention naming of the published checkpoints' files (query/key/value/proj_attn)."""
    rename = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    out = {}
    for k, v in state.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def test_church_256_layout_imports_from_a_bin_with_the_old_attention_names(tmp_path):
    theirs = _randomized(CHURCH_256_SMALL)
    model_dir = tmp_path / "model"
    theirs.save_pretrained(model_dir)
    state = load_file(str(model_dir / "diffusion_pytorch_model.safetensors"))
    (model_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(_to_old_attention_names(state), model_dir / "diffusion_pytorch_model.bin")
    ours = _import(model_dir, tmp_path / "run")
    assert ours.config["channel_mults"] == [1, 1, 2, 2, 4, 4]
    assert ours.config["attention_resolutions"] == [4]  # level 4 of a 64x64 model (16x16 at 256x256)
    diff = _compare(theirs, ours, 64, batch=1)
    print(f"church-256 layout max abs difference: {diff:.2e}")
    assert diff < TOL


def test_the_published_256_configuration_is_accepted():
    cfg = unet_config_from_diffusers({**CHURCH_256_SMALL, "block_out_channels": [128, 128, 256, 256, 512, 512],
                                      "sample_size": 256, "_class_name": "UNet2DModel"})
    assert cfg["channel_mults"] == [1, 1, 2, 2, 4, 4] and cfg["attention_resolutions"] == [16]
    assert UNet.from_config(cfg).num_parameters() == 113_673_219  # ddpm-church-256's published size


def _pipeline(tmp_path: Path, cfg: dict, **sched) -> tuple[UNet2DModel, Path]:
    theirs = _randomized(cfg)
    scheduler = DDPMScheduler(num_train_timesteps=sched.pop("T", 1000), **sched)
    DDPMPipeline(unet=theirs, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    return theirs, tmp_path / "pipe"


def test_export_round_trip_loads_in_diffusers(tmp_path):
    # a ddpmkit model with our own conventions (symmetric padding), exported and read by diffusers
    torch.manual_seed(3)
    model = UNet(image_size=16, in_channels=1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), dropout=0.0, num_groups=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from ddpmkit.store import save_checkpoint, write_config

    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run, 1, model_state=model.state_dict())
    write_config(run, {"model": model.config, "diffusion": {"schedule": "cosine", "T": 500, "objective": "v"}})
    assert main(["export-diffusers", str(run), "--out", str(tmp_path / "out")]) == 0
    theirs = UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet").eval()
    pipe = DDPMPipeline.from_pretrained(tmp_path / "out")
    # an unconditional run stays a plain DDPMPipeline folder, with no code of ours in it
    assert json.loads((tmp_path / "out" / "model_index.json").read_text()) == {
        "_class_name": "DDPMPipeline", "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"]}
    assert not (tmp_path / "out" / "pipeline.py").exists()
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod, Run.open(run).schedule.alpha_bar, rtol=1e-5, atol=1e-6)
    diff = _compare(theirs, Run.open(run).load_model(), 16)
    print(f"export round trip max abs difference: {diff:.2e}")
    assert diff < TOL
    # and back again: import of the export is the same model, key for key
    back = _import(tmp_path / "out", tmp_path / "run2")
    for k, v in Run.open(run).load_model().state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    assert read_config(tmp_path / "run2")["diffusion"]["objective"] == "v"


def _diffusers_loop(unet, scheduler, x, steps, generator=None, **step_kw):
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample
            x = scheduler.step(out, t, x, generator=generator, **step_kw).prev_sample
    return x


@pytest.mark.slow
@pytest.mark.parametrize("variance_type,ours", [("fixed_small", "small"), ("fixed_large", "large")])
def test_ddpm_follows_diffusers_scheduler(tmp_path, variance_type, ours):
    theirs, pipe = _pipeline(tmp_path, MICRO, variance_type=variance_type, clip_sample=True)
    _import(pipe, tmp_path / "run")
    run = Run.open(tmp_path / "run")
    assert run.schedule.kind == "linear" and run.variance == read_config(run.dir)["diffusion"]["variance"] == ours
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    sched = DDPMScheduler.from_pretrained(pipe, subfolder="scheduler")
    a = _diffusers_loop(theirs, sched, x_T.clone(), 1000, generator=torch.Generator().manual_seed(9))
    b = sample(run.denoiser(clip_x0=True), x_T, sampler="ddpm", noise=torch.Generator().manual_seed(9))
    diff = (a - b).abs().max().item()
    print(f"DDPM {variance_type}: max abs difference after 1000 steps {diff:.2e}")
    assert a.abs().max() > 0.5
    assert diff < 1e-4


def _ddim(pipe, clip_sample, **kw):
    return DDIMScheduler.from_pretrained(pipe, subfolder="scheduler", set_alpha_to_one=True,
                                         timestep_spacing="trailing", clip_sample=clip_sample, **kw)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_trailing_follows_diffusers_scheduler(tmp_path, clip, eta):
    theirs, pipe = _pipeline(tmp_path, TINY)
    _import(pipe, tmp_path / "run")
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    sched = _ddim(pipe, clip)
    # diffusers re-derives the noise from the clipped x0 only when asked; ddpmkit always does (as DDIM eq. 12
    # reads with a clipped x0_hat), so ask it to
    a = _diffusers_loop(theirs, sched, x_T.clone(), 50, generator=torch.Generator().manual_seed(2), eta=eta,
                        use_clipped_model_output=clip)
    assert list(sched.timesteps.numpy()[::-1]) == list(timesteps(1000, 50, "trailing"))
    den = Run.open(tmp_path / "run").denoiser(clip_x0=clip)
    b = sample(den, x_T, sampler="ddim", steps=50, eta=eta, spacing="trailing",
               noise=torch.Generator().manual_seed(2))
    diff, scale = (a - b).abs().max().item(), max(1.0, a.abs().max().item())
    print(f"DDIM trailing, 50 steps, eta {eta}, clip {clip}: max abs difference {diff:.2e} at scale {scale:.3g}")
    # Measured: 1.5e-5 with clipping (|x| <= 1); 4e-4 to 9e-4 without, where this random network's x0_hat
    # reaches |x| ~ 700: 6e-7 to 1.2e-6 of the scale, float32 rounding amplified by 1/sqrt(alpha_bar) ~ 156 at
    # t = 999 (alpha_bar itself differs by ~1e-6 relative: diffusers multiplies the 1000 alphas in float32).
    assert diff < 1e-4 * scale


def test_ddim_where_diffusers_steps_to_the_wrong_timestep(tmp_path):
    """A named difference. When S does not divide T, diffusers' DDIMScheduler.step goes from t to
    t - T // S, not to the next timestep of its own trailing list; ddpmkit goes to the next one, as DDIM's
    sub-sequence tau defines. With T = 1000 and S = 30 the trailing list steps by 33 or 34, so diffusers
    lands between the listed timesteps and its last step jumps from t = 32 to alpha_bar = 1 from t = -1."""
    theirs, pipe = _pipeline(tmp_path, TINY)
    _import(pipe, tmp_path / "run")
    sched = _ddim(pipe, False)
    sched.set_timesteps(30)
    listed = sched.timesteps.tolist()
    assert listed == list(timesteps(1000, 30, "trailing"))[::-1]
    gaps = {a - b for a, b in zip(listed, listed[1:])}
    assert gaps == {33, 34} and 1000 // 30 == 33  # diffusers always steps by 33: the wrong target at a 34 gap
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    a = _diffusers_loop(theirs, sched, x_T.clone(), 30)
    den = Run.open(tmp_path / "run").denoiser(clip_x0=False)
    b = sample(den, x_T, sampler="ddim", steps=30, spacing="trailing")
    assert (a - b).abs().max().item() > 1e-3  # they really differ; with S = 50 they agree to 1e-4 (above)


def test_schedules_translate_both_ways():
    lin = diffusion_from_scheduler({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                    "num_train_timesteps": 1000})
    assert lin == {"schedule": "linear", "T": 1000, "objective": "eps", "variance": "small"}
    assert diffusion_from_scheduler({"beta_schedule": "squaredcos_cap_v2",
                                     "num_train_timesteps": 4000})["schedule"] == "cosine"
    # diffusers' own schedule equals ours for both named schedules
    for name, kind in (("linear", "linear"), ("squaredcos_cap_v2", "cosine")):
        s = DDPMScheduler(beta_schedule=name)
        from ddpmkit.diffusion import NoiseSchedule

        torch.testing.assert_close(s.alphas_cumprod, NoiseSchedule.from_name(kind, 1000).alpha_bar,
                                   rtol=1e-5, atol=1e-6)
    # anything else is kept as explicit betas, and loads
    custom = diffusion_from_scheduler({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                       "beta_end": 0.012, "prediction_type": "v_prediction"})
    assert custom["schedule"] == "custom" and len(custom["betas"]) == 1000 and custom["objective"] == "v"
    torch.testing.assert_close(torch.tensor(custom["betas"], dtype=torch.float32),
                               DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012).betas)


@pytest.mark.parametrize("change,fragment", [
    ({"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D")}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ("UpBlock2D", "AttnUpBlock2D")}, "does not mirror"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"block_out_channels": (32, 48)}, "multiple of the first"),
    ({"attention_head_dim": 24}, "attention_head_dim=24"),
    ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
])
def test_unsupported_configs_are_named(change, fragment):
    with pytest.raises(ConfigError, match=fragment):
        unet_config_from_diffusers({**TINY, **change})


def test_unsupported_scheduler_options_are_named():
    with pytest.raises(ConfigError, match="variance_type='learned'"):  # diffusers' unbounded learned: not ours
        diffusion_from_scheduler({"variance_type": "learned"})
    # learned_range is Improved DDPM's interpolation: ddpmkit's learned variance, both ways (issue 18)
    assert diffusion_from_scheduler({"variance_type": "learned_range"})["variance"] == "learned"
    assert scheduler_from_diffusion({"schedule": "linear", "T": 1000, "variance": "learned"})["variance_type"] \
        == "learned_range"
    with pytest.raises(ConfigError, match="prediction_type"):
        diffusion_from_scheduler({"prediction_type": "flow"})


def test_export_refuses_what_diffusers_cannot_express():
    cfg = UNet(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
               attention_resolutions=(16,), num_groups=8, num_heads=2).config
    with pytest.raises(ConfigError, match="one head width"):
        diffusers_config_from_unet(cfg)
    # equal attention widths: one head width, expressible
    cfg = {**cfg, "channel_mults": [1, 1]}
    assert diffusers_config_from_unet(cfg)["attention_head_dim"] == 8


def _bad(args, capsys, fragment):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc != 0 and fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_inputs_give_one_line(tmp_path, capsys):
    _bad(["import-diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    _bad(["import-diffusers", str(tmp_path / "empty"), "--out", str(tmp_path / "r")], capsys, "no diffusers model")
    # a hub id without a reachable hub (the test machines have none) or without huggingface_hub
    _bad(["import-diffusers", "no-such-owner-x1/no-such-model", "--out", str(tmp_path / "r")], capsys,
         "no-such-owner-x1/no-such-model")
    theirs = _randomized(TINY)
    theirs.save_pretrained(tmp_path / "m")
    # weights truncated on disk
    w = tmp_path / "m" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    _bad(["import-diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "r")], capsys, "safetensors")
    # weights of another model under this config
    _randomized({**TINY, "block_out_channels": (32, 32)}).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "block_out_channels": [32, 64]}))
    _bad(["import-diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "r")], capsys, "shape")
    assert not (tmp_path / "r").exists()  # nothing written when the import fails
    # an existing, non-empty output is never touched
    theirs.save_pretrained(tmp_path / "ok")
    keep = tmp_path / "busy"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    _bad(["import-diffusers", str(tmp_path / "ok"), "--out", str(keep)], capsys, "not empty")
    assert (keep / "mine.txt").read_text() == "precious"
    _bad(["export-diffusers", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], capsys, "does not exist")


class Planted:  # any object other than tensors and containers must not be unpickled
    pass


def test_a_bin_that_is_not_just_tensors_is_refused(tmp_path, capsys):
    theirs = _randomized(TINY)
    theirs.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "diffusion_pytorch_model.safetensors").unlink()

    torch.save({"conv_in.weight": torch.zeros(1), "x": Planted()}, tmp_path / "m" / "diffusion_pytorch_model.bin")
    _bad(["import-diffusers", str(tmp_path / "m"), "--out", str(tmp_path / "r")], capsys, ".bin")


def test_diffusers_leading_spacing_is_our_uniform_when_s_divides_t():
    for S in (10, 50, 100, 250):
        sched = DDIMScheduler()  # timestep_spacing="leading", steps_offset=0: the DDIM paper's range(0, T, T // S)
        sched.set_timesteps(S)
        assert sched.timesteps.tolist()[::-1] == list(timesteps(1000, S, "uniform")), S


# ---------------------------------------------------------------------------------------------- class-conditional
def _compare_cond(theirs: UNet2DModel, ours: UNet, size: int, n_classes: int, batch: int = 3, seed: int = 2) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, theirs.config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, n_classes, (batch,), generator=g)
    with torch.no_grad():
        a = theirs(x, t, class_labels=y).sample
        b = ours(x, t, y)
        other = ours(x, t, (y + 1) % n_classes)
    assert a.abs().max() > 0.1 and (b - other).abs().max() > 1e-3  # the label matters
    return (a - b).abs().max().item()


def test_class_conditional_unet2dmodel_imports_and_exports_exactly(tmp_path):
    # diffusers' class-conditional UNet2DModel (num_class_embeds, class_embed_type None: nn.Embedding added to
    # the time embedding), random weights, imported: the same outputs for every label
    theirs = _randomized({**MICRO, "num_class_embeds": 5})
    theirs.save_pretrained(tmp_path / "src")
    ours = _import(tmp_path / "src", tmp_path / "run")
    assert ours.config["num_class_embeds"] == 5
    assert _compare_cond(theirs, ours, 8, 5) < TOL
    run = Run.open(tmp_path / "run")
    assert run.class_names == ("0", "1", "2", "3", "4") and run.null_class is None  # no null class known
    # exported as it is: diffusers runs it with labels, unguided (no null class to guide with)
    assert main(["export-diffusers", str(tmp_path / "run"), "--out", str(tmp_path / "out0")]) == 0
    pipe = _cond_pipeline(tmp_path / "out0")
    assert pipe.config.null_class is None and not (tmp_path / "out0" / "unet" / "class_names.json").exists()
    assert pipe([1, 4], num_inference_steps=2, output_type="pt").images.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="cannot be guided"):
        pipe([1, 4], guidance=0.5)
    # a ddpmkit class-conditional run exported: diffusers gives the same outputs, and names and null come back
    from ddpmkit.store import write_config

    cfg = read_config(tmp_path / "run")
    cfg["classes"] = {"names": ["a", "b", "c", "d"], "null": 4}
    write_config(tmp_path / "run", cfg)
    assert main(["export-diffusers", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    back = UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet").eval()
    assert back.config.num_class_embeds == 5
    assert _compare_cond(back, Run.open(tmp_path / "run").load_model(), 8, 5) < TOL
    _import(tmp_path / "out", tmp_path / "run2")
    again = Run.open(tmp_path / "run2")
    assert again.class_names == ("a", "b", "c", "d") and again.null_class == 4


# ------------------------------------------------------------------------- class-conditional export: its own pipeline
@pytest.fixture(scope="module")
def cond_export(tmp_path_factory):
    """A tiny class-conditional digits run (10 classes + the null class, T = 40) with its weights perturbed, so that
    the label and the guidance matter after two training steps, exported through the CLI: (run, out, printed).
    The v objective: an untrained eps network's x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab) is huge at large t
    and every pixel ends at -1 or 1; v's x0_hat = sqrt(ab) x_t - sqrt(1 - ab) v_hat stays in range (3/4 of them)."""
    import contextlib
    import io

    from conftest import tiny_run
    from ddpmkit.store import save_checkpoint

    root = tmp_path_factory.mktemp("cond_export")
    run = tiny_run(root, class_cond=True, steps=2, num_samples=0, objective="v")
    torch.manual_seed(4)
    state = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in Run.open(run).load_model().state_dict().items()}
    save_checkpoint(run, 100, model_state=state, ema_state=state, keep=None)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export-diffusers", str(run), "--out", str(root / "out")]) == 0
    return run, root / "out", printed.getvalue()


def _cond_pipeline(out: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # the call the export prints
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_class_conditional_export_samples_in_diffusers_as_our_ddim(cond_export, w, clip):
    run, out, _ = cond_export
    pipe = _cond_pipeline(out)
    assert type(pipe).__name__ == "ClassConditionalDDPMPipeline"  # not DDPMPipeline, which passes no labels
    null = json.loads((out / "unet" / "class_names.json").read_text())["null"]
    assert pipe.config.null_class == null == Run.open(run).null_class == 10
    # clipping agrees: the exported scheduler clips x0 to [-1, 1], as ddpmkit's Denoiser does by default
    assert pipe.scheduler.config.clip_sample is True and pipe.scheduler.config.clip_sample_range == 1.0
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert Run.open(run).denoiser().clip_x0 is True
    # DDIM from the folder's scheduler config: leading spacing, which is our uniform one when S divides T
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=clip)
    S, labels = 10, [3, 7, 0]
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    # eta 0; diffusers re-derives eps from the clipped x0 only when asked, ddpmkit always does: ask it to
    kw = dict(num_inference_steps=S, latents=x_T.clone(), eta=0.0, use_clipped_model_output=clip)
    a = pipe(labels, guidance=w, output_type="pt", **kw).images
    assert pipe.scheduler.timesteps.tolist()[::-1] == list(timesteps(40, S, "uniform"))
    den = Run.open(run).denoiser(guidance=w, clip_x0=clip).with_cond(torch.tensor(labels))
    b = (sample(den, x_T, sampler="ddim", steps=S, spacing="uniform") / 2 + 0.5).clamp(0, 1)
    diff = (a - b).abs().max().item()
    print(f"class-conditional export, DDIM {S} steps, w = {w:g}, clip {clip}: max abs difference {diff:.2e}")
    assert a.shape == (3, 1, 8, 8) and ((a > 0.05) & (a < 0.95)).float().mean() > 0.2  # not all clamped
    # Measured: 2e-7 to 6e-7 on these [0, 1] images, float32 rounding only (diffusers multiplies its alphas in
    # float32, ddpmkit in float64, and the two sum in other orders); a wrong label, null class or w moves them by
    # 0.1 to 1 (test below), so 1e-5 leaves a 20x margin and catches any of them
    assert diff < 1e-5
    np_images = pipe(labels, guidance=w, output_type="np", **kw).images
    assert np_images.shape == (3, 8, 8, 1)
    torch.testing.assert_close(torch.from_numpy(np_images), a.permute(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_class_conditional_export_prints_the_call_that_runs_it(cond_export):
    run, out, printed = cond_export
    assert "DDPMPipeline.from_pretrained" not in printed and "guidance_scale = 1 + w" in printed
    code = printed.split("in Python: ", 1)[1].strip()
    assert f"DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)" in code
    assert f"pipe(class_labels=[0, 9], guidance={DEFAULT_GUIDANCE:g})" in code
    scope: dict = {}
    exec(code, scope)  # the printed call itself: 40 DDPM steps of the folder's scheduler, labels 0 and 9, w = default
    assert [im.size for im in scope["images"]] == [(8, 8), (8, 8)]
    pipe = scope["pipe"]
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def run_(labels, w):
        return pipe(labels, guidance=w, num_inference_steps=5, latents=x_T, output_type="pt",
                    generator=torch.Generator().manual_seed(2)).images

    base = run_([3, 7], 0.0)
    assert (base - run_([4, 8], 0.0)).abs().max() > 1e-3 and (base - run_([3, 7], 2.0)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="class_labels"):
        pipe([11], guidance=0.5)  # 0..10 only: the ten digits and the null class
