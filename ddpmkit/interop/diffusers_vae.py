"""diffusers' ``AutoencoderKL`` in ddpmkit's terms and back: configs and weight names, in memory.

ddpmkit's :class:`~ddpmkit.models.autoencoder.AutoencoderKL` names every layer as diffusers does, so the weights
map one to one; the only translation is of older files, whose middle attention layers are named ``query``,
``key``, ``value`` and ``proj_attn`` (sometimes stored as 1x1 convolutions, [C, C, 1, 1]) where diffusers now
writes ``to_q``, ``to_k``, ``to_v`` and ``to_out.0``.

The config's latent statistics (``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``) are not
the network's: they describe its latent space and are kept apart, as an autoencoder run's ``latent`` section.
The files (folders, runs) are :mod:`.diffusers_latent`'s.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, ConfigError
from ..limits import check_autoencoder_config
from ..models.autoencoder import AutoencoderKL
from .diffusers_convert import refuse_names

__all__ = ["autoencoder_config_from_diffusers", "diffusers_config_from_autoencoder", "state_from_diffusers_vae",
           "state_to_diffusers_vae", "LATENT_KEYS"]

LATENT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")

_DOWN, _UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _get(cfg: Mapping, key: str, default: Any) -> Any:
    return cfg[key] if key in cfg else default


def _number(key: str, v, *, positive: bool = False) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ConfigError(f"unsupported AutoencoderKL {key}={v!r}: a finite{' positive' if positive else ''} "
                          "number is needed")
    return float(v)


def _vector(key: str, v, n: int) -> list[float] | None:
    if v is None:
        return None
    if (not isinstance(v, (list, tuple)) or len(v) != n
            or not all(not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in v)):
        raise ConfigError(f"unsupported AutoencoderKL {key}: a list of {n} finite numbers (one per latent channel) "
                          "is needed")
    return [float(x) for x in v]


def autoencoder_config_from_diffusers(dcfg: Mapping) -> tuple[dict, dict]:
    """(ddpmkit's AutoencoderKL configuration, the ``latent`` section) for a diffusers ``AutoencoderKL`` config.

    Absent keys take diffusers' defaults, except the latent statistics, which are None where the config has none.
    Anything the network cannot express is a ConfigError that names the option and its value.
    """
    cls = dcfg.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ConfigError(f"the model is a diffusers {cls}; only AutoencoderKL can be imported as an autoencoder")
    act = _get(dcfg, "act_fn", "silu")
    if act != "silu":
        raise ConfigError(f"unsupported AutoencoderKL option act_fn={act!r} (supported: 'silu')")
    widths = _get(dcfg, "block_out_channels", [64])
    if not isinstance(widths, (list, tuple)) or not widths:
        raise ConfigError(f"unsupported AutoencoderKL block_out_channels={widths!r}")
    for key, allowed, default in (("down_block_types", _DOWN, [_DOWN]), ("up_block_types", _UP, [_UP])):
        types = _get(dcfg, key, default)
        if not isinstance(types, (list, tuple)):
            raise ConfigError(f"unsupported AutoencoderKL {key}={types!r}")
        for b in types:
            if b != allowed:
                raise ConfigError(f"unsupported AutoencoderKL {key} entry {b!r} (supported: {allowed!r})")
        if len(types) != len(widths):
            raise ConfigError(f"AutoencoderKL {key} has {len(types)} entries but block_out_channels has "
                              f"{len(widths)}")
    size = _get(dcfg, "sample_size", 32)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"unsupported AutoencoderKL sample_size={list(size)}: only square images")
        size = size[0]
    cfg = {
        "in_channels": _get(dcfg, "in_channels", 3),
        "out_channels": _get(dcfg, "out_channels", 3),
        "block_out_channels": list(widths),
        "layers_per_block": _get(dcfg, "layers_per_block", 1),
        "latent_channels": _get(dcfg, "latent_channels", 4),
        "norm_num_groups": _get(dcfg, "norm_num_groups", 32),
        "mid_attention": _get(dcfg, "mid_block_add_attention", True),
        "use_quant_conv": _get(dcfg, "use_quant_conv", True),
        "use_post_quant_conv": _get(dcfg, "use_post_quant_conv", True),
        "image_size": size,
    }
    # every number against its range, then the network's own checks and its size on the meta device: nothing is
    # allocated for a config that asks for too much
    check_autoencoder_config(cfg, "the AutoencoderKL config")
    with torch.device("meta"):
        cfg = AutoencoderKL.from_config(cfg).config  # normalised (lists, out_channels set)
    z = cfg["latent_channels"]
    latent = {
        "scaling_factor": _number("scaling_factor", dcfg.get("scaling_factor"), positive=True),
        "shift_factor": _number("shift_factor", dcfg.get("shift_factor")),
        "latents_mean": _vector("latents_mean", dcfg.get("latents_mean"), z),
        "latents_std": _vector("latents_std", dcfg.get("latents_std"), z),
    }
    return cfg, latent


def diffusers_config_from_autoencoder(model_cfg: Mapping, latent: Mapping | None = None) -> dict:
    """The diffusers ``AutoencoderKL`` config of a ddpmkit autoencoder configuration and its ``latent`` section.

    A ``scaling_factor`` that is None (an autoencoder trained by ddpmkit, whose latent scale is measured by the
    latent diffusion run) is written as 1.0; a model without ``image_size`` gets diffusers' default of 32.
    """
    with torch.device("meta"):
        cfg = AutoencoderKL.from_config(dict(model_cfg)).config
    latent = dict(latent or {})
    unknown = sorted(set(latent) - set(LATENT_KEYS))
    if unknown:
        raise ConfigError(f"unknown latent setting(s): {', '.join(map(str, unknown))}")
    z = cfg["latent_channels"]
    scale = _number("scaling_factor", latent.get("scaling_factor"), positive=True)
    n = len(cfg["block_out_channels"])
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "down_block_types": [_DOWN] * n,
        "up_block_types": [_UP] * n,
        "block_out_channels": list(cfg["block_out_channels"]),
        "layers_per_block": cfg["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": z,
        "norm_num_groups": cfg["norm_num_groups"],
        "sample_size": cfg["image_size"] if cfg["image_size"] is not None else 32,
        "scaling_factor": 1.0 if scale is None else scale,
        "shift_factor": _number("shift_factor", latent.get("shift_factor")),
        "latents_mean": _vector("latents_mean", latent.get("latents_mean"), z),
        "latents_std": _vector("latents_std", latent.get("latents_std"), z),
        "force_upcast": True,
        "use_quant_conv": cfg["use_quant_conv"],
        "use_post_quant_conv": cfg["use_post_quant_conv"],
        "mid_block_add_attention": cfg["mid_attention"],
    }


def _expected_shapes(model_cfg: Mapping) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = AutoencoderKL.from_config(dict(model_cfg))
    return {k: v.shape for k, v in model.state_dict().items()}


def _new_name(key: str) -> str:
    """``key`` with an older attention name (``...attentions.0.query.weight``) in the current naming."""
    parts = key.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _OLD_ATTENTION:
        return ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
    return key


def state_from_diffusers_vae(dstate: Mapping[str, torch.Tensor], model_cfg: Mapping) -> dict[str, torch.Tensor]:
    """ddpmkit AutoencoderKL weights (float32) from a diffusers ``AutoencoderKL`` state dict.

    The names are the same; older attention names are renamed and 1x1-conv attention weights flattened to a
    Linear's. Every tensor of the file must be used and every weight of the model present: a leftover or a
    missing one is a CheckpointError naming it (shapes are checked when the weights are loaded).
    """
    expected = _expected_shapes(model_cfg)
    out: dict[str, torch.Tensor] = {}
    left: list[str] = []
    for key, value in dstate.items():
        name = _new_name(key)
        if name not in expected or name in out:
            left.append(key)
            continue
        t = value.detach().to(torch.float32)
        if (name.endswith(".weight") and any(f".{p}.weight" in name for p in _PROJECTIONS) and t.ndim == 4
                and t.shape[2:] == (1, 1)):
            t = t.reshape(t.shape[0], t.shape[1])  # a 1x1 conv's weight as a Linear's
        out[name] = t
    refuse_names(left, "have", "that the config does not describe")
    refuse_names(set(expected) - set(out), "lack", "that the config describes")
    return out


def state_to_diffusers_vae(state: Mapping[str, torch.Tensor], model_cfg: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict (current naming, float32, on the CPU) from ddpmkit weights."""
    expected = _expected_shapes(model_cfg)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"the autoencoder weights lack {missing[0]!r}"
                              + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return {k: state[k].detach().to("cpu", torch.float32).contiguous() for k in expected}
