"""The presets for folders of images (folder64, folder128) and the paper's 256x256 runs (lsun256, celebahq256): their
U-Nets are the published layouts, as diffusers' UNet2DModel builds them from the same description; their
settings validate, and a folder's images reach the network at the preset's size."""

import json

import pytest
import torch
from PIL import Image

from conftest import one_error_line
from ddpmkit.cli import main
from ddpmkit.data import load_dataset
from ddpmkit.errors import ConfigError
from ddpmkit.models import UNET_PRESETS, UNet, unet_from_preset
from ddpmkit.train import PRESETS, config_from_preset

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402

from ddpmkit.interop import unet_config_from_diffusers  # noqa: E402
from ddpmkit.interop.diffusers_convert import state_from_diffusers  # noqa: E402

FOLDER_PRESETS = ["folder64", "folder128", "lsun256", "celebahq256"]

# google/ddpm-church-256's config.json, as published (113,673,219 parameters).
CHURCH_256 = {
    "_class_name": "UNet2DModel", "sample_size": 256, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 128, 256, 256, 512, 512], "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    "act_fn": "silu", "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "time_embedding_type": "positional",
}
# The layouts of the folder presets in diffusers' terms, written from their sources: Improved DDPM's ImageNet-64
# model (widths 128 x (1, 2, 3, 4), 3 blocks, attention at 16 and 8, 6 outputs) and ADM's 128x128 layout at width
# 128 (128 x (1, 1, 2, 3, 4), 2 blocks, attention at 32, 16 and 8, 6 outputs), both with ADM's dropout 0.1. One
# attention head here: the heads change no weight's shape.
_ATTN, _PLAIN = ("AttnDownBlock2D", "AttnUpBlock2D"), ("DownBlock2D", "UpBlock2D")
FOLDER_LAYOUTS = {
    "folder64": dict(sample_size=64, block_out_channels=[128, 256, 384, 512], layers_per_block=3,
                     attention=[False, False, True, True], dropout=0.1),
    "folder128": dict(sample_size=128, block_out_channels=[128, 128, 256, 384, 512], layers_per_block=2,
                      attention=[False, False, True, True, True], dropout=0.1),
}


def _diffusers_config(sample_size, block_out_channels, layers_per_block, attention, dropout) -> dict:
    return {**CHURCH_256, "sample_size": sample_size, "block_out_channels": block_out_channels,
            "layers_per_block": layers_per_block, "out_channels": 6, "dropout": dropout,
            "down_block_types": [_ATTN[0] if a else _PLAIN[0] for a in attention],
            "up_block_types": [_ATTN[1] if a else _PLAIN[1] for a in reversed(attention)]}


def _shapes(state) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _same_network(preset: str, dcfg: dict) -> None:
    """The preset's U-Net has the weights (names and shapes) that import-diffusers makes of a UNet2DModel of
    ``dcfg``, and as many parameters. Shapes only, so both are built on the meta device (no memory, no time)."""
    with torch.device("meta"):
        theirs = UNet2DModel(**{k: v for k, v in dcfg.items() if not k.startswith("_")})
        ours = unet_from_preset(preset)
    n = sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters() == n, "a different number of parameters"
    imported = unet_config_from_diffusers(dcfg)  # what `ddpmkit import-diffusers` builds from that config
    converted = state_from_diffusers(theirs.state_dict(), imported)
    assert _shapes(converted) == _shapes(ours.state_dict()), "other weights"
    # and the configurations agree but for what changes no weight: the padding before a stride-2 conv (ours
    # symmetric, as the cifar10 preset; the published files the official code's bottom/right) and the heads
    keep = set(imported) - {"downsample_padding", "num_heads"}
    assert {k: imported[k] for k in keep} == {k: UNET_PRESETS[preset][k] for k in keep}


@pytest.mark.parametrize("preset", ["lsun256", "celebahq256"])
def test_the_256_presets_are_the_published_church_256_network(preset):
    _same_network(preset, CHURCH_256)
    assert UNET_PRESETS[preset] == UNET_PRESETS["lsun256"]
    with torch.device("meta"):
        assert unet_from_preset(preset).num_parameters() == 113_673_219  # google/ddpm-church-256's published size


@pytest.mark.parametrize("preset", sorted(FOLDER_LAYOUTS))
def test_the_folder_presets_are_their_sources_layouts(preset):
    _same_network(preset, _diffusers_config(**FOLDER_LAYOUTS[preset]))
    assert UNET_PRESETS[preset]["num_heads"] == 4  # Improved DDPM's and ADM's four heads


def test_a_wrong_layout_is_told_apart():
    # the check above can fail: the church layout with its attention at 8x8 instead of 16x16 (both levels 512 wide:
    # the same number of parameters, other weights), or with one multiplier changed, is not the lsun256 network
    moved = dict(CHURCH_256, down_block_types=["DownBlock2D"] * 5 + ["AttnDownBlock2D"],
                 up_block_types=["AttnUpBlock2D"] + ["UpBlock2D"] * 5)
    wider = dict(CHURCH_256, block_out_channels=[128, 128, 256, 256, 512, 768])
    for dcfg, where in ((moved, "other weights"), (wider, "a different number")):
        with pytest.raises(AssertionError, match=where):
            _same_network("lsun256", dcfg)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_validates_and_trains_its_u_net_preset(preset):
    cfg = config_from_preset(preset, data="/images" if preset in FOLDER_PRESETS else None)
    cfg.validate()  # builds the U-Net on the meta device, within the size limits
    with torch.device("meta"):
        assert UNet(**cfg.model_config()).config == UNET_PRESETS[preset]
    assert json.loads(json.dumps(cfg.to_json()))["model"] == cfg.model_config()


def test_the_folder_presets_settings():
    f64, f128 = config_from_preset("folder64"), config_from_preset("folder128")
    lsun, celeba = config_from_preset("lsun256"), config_from_preset("celebahq256")
    assert (f64.image_size, f128.image_size, lsun.image_size, celeba.image_size) == (64, 128, 256, 256)
    # DDPM appendix B for 256x256: Adam 2e-5, batch 64, EMA 0.9999, T = 1000 linear, dropout 0, flips, beta_tilde
    for c in (lsun, celeba):
        assert (c.lr, c.batch_size, c.ema_decay, c.T, c.schedule, c.dropout, c.flip, c.learn_sigma, c.variance) == \
            (2e-5, 64, 0.9999, 1000, "linear", 0.0, True, False, "small")
    assert (lsun.steps, celeba.steps) == (1_200_000, 500_000)
    # Improved DDPM's recipe: L_hybrid (a learned variance), Adam 1e-4, batch 128; cosine at 64, linear at 128
    for c in (f64, f128):
        assert (c.lr, c.batch_size, c.learn_sigma, c.variance, c.T, c.dropout) == (1e-4, 128, True, "learned", 1000,
                                                                                   0.1)
        assert c.model_config()["out_channels"] == 6
    assert (f64.schedule, f128.schedule) == ("cosine", "linear")
    # --no-learn-sigma on them: 3 outputs and the default variance, a valid run
    plain = config_from_preset("folder64", data="/images", learn_sigma=False)
    plain.validate()
    with torch.device("meta"):
        assert plain.variance == "small" and UNet(**plain.model_config()).config["out_channels"] == 3


@pytest.mark.parametrize("preset", FOLDER_PRESETS)
def test_a_folder_preset_needs_data(preset, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--data DIR"):
        config_from_preset(preset).validate()
    out = tmp_path / "run"
    assert main(["train", "--preset", preset, "--out", str(out), "--quiet"]) == 2
    one_error_line(capsys, preset, "--data DIR")
    assert not out.exists()


def _folder(root, sizes):
    root.mkdir()
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i, 255 - 40 * i, 90)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("preset", FOLDER_PRESETS)
def test_a_folders_images_come_at_the_presets_size(preset, tmp_path):
    # the data source resizes (shorter side) and center-crops every image to the preset's --image-size
    cfg = config_from_preset(preset, data=str(_folder(tmp_path / "images", [(300, 200), (50, 90), (256, 256)])))
    data = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels, cache_dir=tmp_path / "cache",
                        progress=False)
    size = UNET_PRESETS[preset]["image_size"]
    assert tuple(data.images.shape) == (3, 3, size, size) and cfg.image_size == size


def test_the_folder64_network_runs_at_batch_1():
    torch.manual_seed(0)
    model = unet_from_preset("folder64").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.tensor([500]))
    assert out.shape == (1, 6, 64, 64) and torch.isfinite(out).all()


def test_a_folder_preset_trains_end_to_end(tmp_path, monkeypatch):
    # folder64's recipe (cosine, L_hybrid, flips) on a folder through the command, the network made narrow to be
    # quick: the images are 64x64 and the run's U-Net has 6 outputs
    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    images = _folder(tmp_path / "images", [(80, 64), (64, 100), (64, 64), (70, 70)])
    out = tmp_path / "run"
    assert main(["train", "--preset", "folder64", "--data", str(images), "--out", str(out), "--base-channels", "32",
                 "--num-res-blocks", "1", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--num-samples", "0",
                 "--quiet"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["image_size"] == 64 and cfg["model"]["image_size"] == 64
    assert cfg["model"]["out_channels"] == 6 and cfg["diffusion"]["variance"] == "learned"
    assert cfg["diffusion"]["schedule"] == "cosine" and cfg["train"]["preset"] == "folder64"
