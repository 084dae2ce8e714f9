"""Sane ranges for the numbers a user hands in (a flag, a run's config.json), checked before anything is allocated.

A number outside its range is a one-line :class:`~ddpmkit.errors.ConfigError` (or the error class the caller
names: :class:`~ddpmkit.errors.CheckpointError` for a run's config.json), never an allocation of terabytes and
a traceback. The bounds are far beyond any real use (the paper's CIFAR-10 U-Net has 35.7 M parameters, T = 1000,
a batch of 128) and far below what would exhaust a machine before a clear error could be given.

The U-Net's size (and the KL autoencoder's) is checked by building it on PyTorch's ``meta`` device, which allocates
no memory, and counting its parameters.
"""

from __future__ import annotations

import math
import numbers

from .errors import ConfigError

__all__ = ["MAX_T", "MAX_BATCH", "MAX_PARAMETERS", "MAX_GRID", "MAX_CHANNELS", "MAX_IMAGE_SIZE", "check_int",
           "check_float", "check_T", "check_model_config", "count_parameters", "check_autoencoder_config"]

MAX_T = 100_000  # diffusion steps (the papers use 1000 to 4000)
MAX_BATCH = 65_536  # images in one batch (the paper's CIFAR-10 batch is 128)
MAX_GRID = 4_096  # images in a training sample grid
MAX_CHANNELS = 64  # image channels (RGB is 3)
MAX_IMAGE_SIZE = 4_096  # image side in pixels (CIFAR-10 is 32)
MAX_PARAMETERS = 10_000_000_000  # 40 GB of float32 weights, 280 times the paper's CIFAR-10 U-Net


def check_int(name: str, value, lo: int, hi: int | None = None, error=ConfigError) -> int:
    """``value`` (a Python or NumPy integer) as an int if it lies in [lo, hi]; else one line naming ``name`` and the
    range, in ``error``'s class."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lo
          and (hi is None or value <= hi))
    if not ok:
        what = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise error(f"{name} must be {what}, got {_show(value)}")
    return int(value)


def check_float(name: str, value, lo: float, hi: float, *, hi_open: bool = False, error=ConfigError) -> float:
    """``value`` if it is a finite number in [lo, hi] (or [lo, hi) with ``hi_open``); else one line."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and lo <= value and (value < hi if hi_open else value <= hi))
    if not ok:
        raise error(f"{name} must be a finite number in [{lo:g}, {hi:g}{')' if hi_open else ']'}, "
                    f"got {_show(value)}")
    return float(value)


def check_T(T, name: str = "T", error=ConfigError) -> int:
    """The number of diffusion steps: 1 .. MAX_T (a schedule holds a few arrays of T float64s)."""
    return check_int(name, T, 1, MAX_T, error)


def count_parameters(model_config: dict) -> int:
    """The U-Net's number of parameters, from a build on the meta device (no memory is allocated)."""
    import torch

    from .models.unet import UNet

    with torch.device("meta"):
        net = UNet.from_config(dict(model_config))
    return sum(p.numel() for p in net.parameters())


def check_model_config(model_config: dict, where: str, error=ConfigError) -> int:
    """Check a U-Net configuration (config.json's ``model`` section, or the training settings' U-Net arguments)
    before any weight is allocated; return its number of parameters.

    Every integer is checked against a range first (so that the check itself allocates nothing large), then
    the U-Net is built on the meta device, which runs its own checks, and its parameters are counted.
    """
    if type(model_config) is not dict:
        raise error(f"{where}: the model settings must be a JSON object, got {_show(model_config)}")
    ranges = {"image_size": (1, MAX_IMAGE_SIZE), "in_channels": (1, MAX_CHANNELS), "base_channels": (1, 8192),
              "num_res_blocks": (1, 64), "num_groups": (1, 8192), "num_heads": (1, 1024),
              "num_class_embeds": (1, 1_000_000)}
    for key, (lo, hi) in ranges.items():
        if model_config.get(key) is not None:
            check_int(f"{where}: {key}", model_config[key], lo, hi, error)
    if model_config.get("out_channels") is not None:
        check_int(f"{where}: out_channels", model_config["out_channels"], 1, 128, error)
    for key, most in (("channel_mults", 16), ("attention_resolutions", 64)):
        v = model_config.get(key)
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) > most:
            raise error(f"{where}: {key} must be a list of at most {most} integers, got {_show(v)}")
        for x in v:
            check_int(f"{where}: each of {key}", x, 1, 64 if key == "channel_mults" else MAX_IMAGE_SIZE, error)
    return _counted(lambda: count_parameters(model_config), where, "U-Net",
                    "base_channels, channel_mults or num_res_blocks", error)


def _counted(count, where: str, what: str, lower: str, error) -> int:
    """``count()``, a network's number of parameters from a build on the meta device, refused in one line when the
    build fails or the count passes MAX_PARAMETERS (``lower``: the settings to lower)."""
    try:
        n = count()
    except (ConfigError, TypeError, ValueError, KeyError) as e:
        raise error(f"{where} does not describe a valid {what}: {e}") from None
    if n > MAX_PARAMETERS:
        raise error(f"{where}: the {what} would have {n:,} parameters ({4 * n / 1e9:,.0f} GB of float32 weights), "
                    f"more than the {MAX_PARAMETERS:,} allowed: lower {lower}")
    return n


def check_autoencoder_config(model_config: dict, where: str, error=ConfigError) -> int:
    """Check a KL autoencoder's configuration (an autoencoder run's config.json ``model`` section) before any
    weight is allocated; return its number of parameters.

    As :func:`check_model_config` does for the U-Net: every integer against a range first, then a build on the
    meta device (which runs the autoencoder's own checks) to count its parameters.
    """
    if type(model_config) is not dict:
        raise error(f"{where}: the autoencoder settings must be a JSON object, got {_show(model_config)}")
    ranges = {"in_channels": (1, MAX_CHANNELS), "out_channels": (1, MAX_CHANNELS), "layers_per_block": (1, 64),
              "latent_channels": (1, 1024), "norm_num_groups": (1, 8192), "image_size": (1, MAX_IMAGE_SIZE)}
    for key, (lo, hi) in ranges.items():
        if model_config.get(key) is not None:
            check_int(f"{where}: {key}", model_config[key], lo, hi, error)
    widths = model_config.get("block_out_channels")
    if widths is not None:
        if not isinstance(widths, (list, tuple)) or len(widths) > 16:
            raise error(f"{where}: block_out_channels must be a list of at most 16 integers, got {_show(widths)}")
        for w in widths:
            check_int(f"{where}: each of block_out_channels", w, 1, 8192, error)
    import torch

    from .models.autoencoder import AutoencoderKL

    def count() -> int:
        with torch.device("meta"):
            return AutoencoderKL.from_config(dict(model_config)).num_parameters()

    return _counted(count, where, "autoencoder", "block_out_channels or layers_per_block", error)


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
