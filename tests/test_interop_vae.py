"""Interop with diffusers' AutoencoderKL: its files imported into an autoencoder run give the same posterior and
the same decoded images, and a run exported to its format loads in diffusers with the same outputs."""

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import randomized

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ddpmkit.cli import main  # noqa: E402
from ddpmkit.errors import ConfigError  # noqa: E402
from ddpmkit.interop.diffusers_vae import (autoencoder_config_from_diffusers,  # noqa: E402
                                           diffusers_config_from_autoencoder, state_from_diffusers_vae)
from ddpmkit.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL  # noqa: E402
from ddpmkit.run import Run  # noqa: E402
from ddpmkit.store import read_config, write_config  # noqa: E402

# The Stable Diffusion 1.x/2.x VAE's configuration (stabilityai/sd-vae-ft-mse and the vae/ of the SD pipelines).
SD_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
# The same layout, narrow, for the quick tests.
SMALL_VAE = dict(SD_VAE, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8, sample_size=32,
                 scaling_factor=0.5)

# Measured: max |ours - diffusers| = 0 on the same layer order (the two models do the same float32 operations);
# 1e-4 still allows another summation order and is far below what a wrong padding or attention scale produces.
TOL = 1e-4


def _randomized(cfg: dict, seed: int = 0) -> DiffusersVAE:
    return randomized(DiffusersVAE, cfg, seed)


def _compare(theirs: DiffusersVAE, ours: AutoencoderKL, size: int, seed: int = 1) -> float:
    """max |ours - theirs| over the posterior's mean and log-variance and a decoded image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, theirs.config.in_channels, size, size, generator=g)
    with torch.no_grad():
        a = theirs.encode(x).latent_dist
        b = ours.encode(x)
        z = torch.randn(a.mean.shape, generator=g)
        da, db = theirs.decode(z).sample, ours.decode(z)
    assert a.mean.abs().max() > 0.1 and da.abs().max() > 0.1  # a real signal, not zeros on both sides
    assert db.shape == da.shape == (1, theirs.config.out_channels, size, size)
    return max((a.mean - b.mean).abs().max().item(), (a.logvar - b.logvar).abs().max().item(),
               (da - db).abs().max().item())


def _import(src: Path, run: Path) -> AutoencoderKL:
    assert main(["import-diffusers", str(src), "--out", str(run)]) == 0
    r = Run.open(run)
    assert r.kind == "autoencoder"
    return r.load_model()


def _round_trip(tmp_path: Path, cfg: dict, size: int, capsys) -> None:
    theirs = _randomized(cfg)
    theirs.save_pretrained(tmp_path / "vae")
    ours = _import(tmp_path / "vae", tmp_path / "run")
    assert "train a latent diffusion model on it with: ddpmkit train --autoencoder" in capsys.readouterr().out
    assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters())
    diff = _compare(theirs, ours, size)
    print(f"import max abs difference: {diff:.2e}")
    assert diff < TOL

    config = read_config(tmp_path / "run")
    assert config["kind"] == "autoencoder" and config["model"] == ours.config
    assert config["latent"] == {"scaling_factor": cfg["scaling_factor"], "shift_factor": None,
                                "latents_mean": None, "latents_std": None}
    assert config["data"] == {"source": None, "image_size": cfg["sample_size"], "channels": cfg["in_channels"]}
    assert config["imported_from"]["format"] == "diffusers"
    assert config["imported_from"]["vae_config"]["_class_name"] == "AutoencoderKL"

    assert main(["export-diffusers", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "AutoencoderKL.from_pretrained" in capsys.readouterr().out
    back = DiffusersVAE.from_pretrained(tmp_path / "out").eval()
    assert back.config.scaling_factor == cfg["scaling_factor"]
    assert list(back.config.block_out_channels) == list(cfg["block_out_channels"])
    diff = _compare(back, ours, size)
    print(f"export max abs difference: {diff:.2e}")
    assert diff < TOL


def test_a_small_autoencoder_round_trips_exactly(tmp_path, capsys):
    _round_trip(tmp_path, SMALL_VAE, 32, capsys)


@pytest.mark.slow
def test_the_stable_diffusion_vae_round_trips_exactly(tmp_path, capsys):
    t0 = time.perf_counter()
    _round_trip(tmp_path, SD_VAE, 32, capsys)
    print(f"the Stable Diffusion configuration's round trip took {time.perf_counter() - t0:.1f} s")
    assert Run.open(tmp_path / "run").load_model().config == AUTOENCODER_PRESETS["sd"]


def test_the_vae_of_a_stable_diffusion_pipeline_folder_is_imported(tmp_path, capsys):
    theirs = _randomized(SMALL_VAE)
    pipe = tmp_path / "sd"
    theirs.save_pretrained(pipe / "vae")
    (pipe / "unet").mkdir()  # a text-to-image U-Net: not a UNet2DModel, so the folder's VAE is imported
    (pipe / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    ours = _import(pipe, tmp_path / "run")
    assert _compare(theirs, ours, 16) < TOL
    assert "KL autoencoder (f=4, 32x32 images to 4x8x8 latents), latent scaling factor 0.5" in capsys.readouterr().out


def test_old_attention_names_and_conv_shaped_weights_import(tmp_path):
    theirs = _randomized(SMALL_VAE)
    d = tmp_path / "vae"
    theirs.save_pretrained(d)
    state = load_file(str(d / "diffusion_pytorch_model.safetensors"))
    (d / "diffusion_pytorch_model.safetensors").unlink()
    rename = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    old = {}
    for k, v in state.items():
        for a, b in rename.items():
            if a in k:
                k = k.replace(a, b)
                if k.endswith(".weight") and b == ".query.":  # some files keep q as a 1x1 conv's [C, C, 1, 1]
                    v = v[:, :, None, None]
        old[k] = v
    assert any(".proj_attn." in k for k in old) and not any(".to_q." in k for k in old)
    torch.save(old, d / "diffusion_pytorch_model.bin")
    ours = _import(d, tmp_path / "run")
    assert _compare(theirs, ours, 16) < TOL


def test_a_broken_formula_is_caught(tmp_path, monkeypatch):
    """The parity check can fail: the same weights, with downsampling padded on the wrong side, differ."""
    import torch.nn.functional as F

    from ddpmkit.models import autoencoder

    theirs = _randomized(SMALL_VAE)
    cfg, _ = autoencoder_config_from_diffusers(dict(theirs.config))
    ours = AutoencoderKL.from_config(cfg).eval()
    ours.load_state_dict(state_from_diffusers_vae(theirs.state_dict(), cfg))
    assert _compare(theirs, ours, 16) < TOL
    monkeypatch.setattr(autoencoder._Downsample, "forward", lambda self, x: self.conv(F.pad(x, (1, 0, 1, 0))))
    assert _compare(theirs, ours, 16) > 100 * TOL


def test_configs_translate_both_ways():
    cfg, latent = autoencoder_config_from_diffusers({**SMALL_VAE, "_class_name": "AutoencoderKL",
                                                     "sample_size": [32, 32], "shift_factor": 0.1,
                                                     "latents_mean": [0, 1, 2, 3], "mid_block_add_attention": False})
    assert cfg == {"in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32, 32], "layers_per_block": 1,
                   "latent_channels": 4, "norm_num_groups": 8, "mid_attention": False, "use_quant_conv": True,
                   "use_post_quant_conv": True, "image_size": 32}
    assert latent == {"scaling_factor": 0.5, "shift_factor": 0.1, "latents_mean": [0.0, 1.0, 2.0, 3.0],
                      "latents_std": None}
    dcfg = diffusers_config_from_autoencoder(cfg, latent)
    assert autoencoder_config_from_diffusers(dcfg) == (cfg, latent)
    # diffusers' defaults where a key is absent; no latent statistics where the config has none
    cfg, latent = autoencoder_config_from_diffusers({"_class_name": "AutoencoderKL"})
    assert cfg["block_out_channels"] == [64] and cfg["layers_per_block"] == 1 and latent["scaling_factor"] is None
    # a ddpmkit autoencoder without a scaling factor exports as 1.0
    assert diffusers_config_from_autoencoder(cfg, {"scaling_factor": None})["scaling_factor"] == 1.0
    # diffusers builds the same parameters from the exported config
    dcfg = diffusers_config_from_autoencoder(AUTOENCODER_PRESETS["digits"], {})
    with torch.device("meta"):
        n = sum(p.numel() for p in DiffusersVAE.from_config(dcfg).parameters())
        assert n == AutoencoderKL.from_config(AUTOENCODER_PRESETS["digits"]).num_parameters()


@pytest.mark.parametrize("change,fragment", [
    ({"act_fn": "relu"}, "act_fn='relu'"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
     "'AttnDownEncoderBlock2D'"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "up_block_types has 1 entries"),
    ({"norm_num_groups": 5}, "not divisible by norm_num_groups=5"),
    ({"layers_per_block": 10**9}, "layers_per_block must be an integer in [1, 64]"),  # refused before any build
    ({"sample_size": [32, 64]}, "only square"),
    ({"scaling_factor": -1}, "scaling_factor=-1"),
    ({"latents_std": [1.0]}, "latents_std"),
    ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny"),
])
def test_unsupported_configs_are_named(change, fragment):
    with pytest.raises(ConfigError) as e:
        autoencoder_config_from_diffusers({**SMALL_VAE, **change})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _bad(args, capsys, fragment):
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_bad_inputs_give_one_line_and_write_nothing(tmp_path, capsys):
    theirs = _randomized(SMALL_VAE)
    d = tmp_path / "vae"
    theirs.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "act_fn": "relu"}))
    _bad(["import-diffusers", str(d), "--out", str(tmp_path / "r")], capsys, "act_fn='relu'")
    (d / "config.json").write_text(json.dumps(cfg))
    # a weight missing from the file
    w = d / "diffusion_pytorch_model.safetensors"
    state = load_file(str(w))
    del state["decoder.mid_block.attentions.0.to_k.bias"]
    save_file(state, str(w))
    _bad(["import-diffusers", str(d), "--out", str(tmp_path / "r")], capsys,
         "lack 1 tensor(s) that the config describes: decoder.mid_block.attentions.0.to_k.bias")
    # weights of another shape under this config
    _randomized({**SMALL_VAE, "latent_channels": 8}).save_pretrained(d)
    (d / "config.json").write_text(json.dumps(cfg))
    _bad(["import-diffusers", str(d), "--out", str(tmp_path / "r")], capsys, "shape")
    # a config without weights
    w.unlink()
    _bad(["import-diffusers", str(d), "--out", str(tmp_path / "r")], capsys, "no weights")
    assert not (tmp_path / "r").exists()  # nothing written when the import fails


def test_a_trained_autoencoder_without_a_scale_exports_with_1(tmp_path, capsys):
    _randomized(SMALL_VAE).save_pretrained(tmp_path / "vae")
    _import(tmp_path / "vae", tmp_path / "run")
    config = read_config(tmp_path / "run")
    config["latent"] = {"scaling_factor": None, "shift_factor": None, "latents_mean": None, "latents_std": None}
    write_config(tmp_path / "run", config)  # as an autoencoder trained by ddpmkit has it
    capsys.readouterr()
    assert main(["export-diffusers", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    assert "latent diffusion run" in capsys.readouterr().out
    assert DiffusersVAE.from_pretrained(tmp_path / "out").config.scaling_factor == 1.0
