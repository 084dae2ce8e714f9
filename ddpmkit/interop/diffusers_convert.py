"""diffusers' ``UNet2DModel`` and ``DDPMScheduler`` in ddpmkit's terms and back: configs and weight names, in memory.

The published DDPM checkpoints (``google/ddpm-cifar10-32``, ``google/ddpm-church-256``, ...) are the paper's
U-Net with three conventions that ddpmkit's U-Net takes as configuration: GroupNorm epsilon 1e-6, the
official code's bottom/right ('SAME') padding before each stride-2 downsampling conv (``downsample_padding=0``
in diffusers), and the sines-first time embedding with frequencies ``exp(-ln(10000) k / (half - 1))``
(``flip_sin_to_cos=False, freq_shift=1``).

Layout of the two models, level by level, with their parameter names:

================================  ============================================
ddpmkit ``UNet``                  diffusers ``UNet2DModel``
================================  ============================================
``conv_in``                       ``conv_in``
``time_embed.0`` / ``.2``         ``time_embedding.linear_1`` / ``.linear_2``
``down.i.res`` / ``down.i.attn``  ``down_blocks.L.resnets.j`` / ``.attentions.j``
``down.i.conv``                   ``down_blocks.L.downsamplers.0.conv``
``mid_res1, mid_attn, mid_res2``  ``mid_block.resnets.0, attentions.0, resnets.1``
``up.i.res`` / ``up.i.attn``      ``up_blocks.k.resnets.j`` / ``.attentions.j``
``up.i.conv``                     ``up_blocks.k.upsamplers.0.conv``
``norm_out``, ``conv_out``        ``conv_norm_out``, ``conv_out``
``class_embed`` (class-cond.)     ``class_embedding`` (``num_class_embeds`` rows)
================================  ============================================

Inside a ResNet block ``temb_proj`` is ``time_emb_proj`` and ``skip`` is ``conv_shortcut``; inside attention
``norm`` is ``group_norm``, ``proj`` is ``to_out.0`` (``proj_attn`` in older files) and ``qkv`` is
``to_q``, ``to_k``, ``to_v`` (``query``, ``key``, ``value`` in older files) stacked in that order.

The files (folders, hub ids, ``class_names.json``) are :mod:`.diffusers_files`'s, the exported pipeline
:mod:`.diffusers`'s.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..models.unet import UNet

__all__ = ["unet_config_from_diffusers", "diffusers_config_from_unet", "state_from_diffusers", "state_to_diffusers",
           "diffusion_from_scheduler", "scheduler_from_diffusion"]

_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> has attention
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}

# Options of UNet2DModel that ddpmkit's U-Net has no counterpart for: each must keep one of these values.
_FIXED = {
    "time_embedding_type": ("positional",),
    "center_input_sample": (False,),
    "act_fn": ("silu",),
    "mid_block_scale_factor": (1, 1.0),
    "resnet_time_scale_shift": ("default",),
    "add_attention": (True,),
    "class_embed_type": (None,),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "mid_block_type": ("UNetMidBlock2D", None),
}

# ---------------------------------------------------------------------------------------------- configs


def _get(cfg: Mapping, key: str, default: Any) -> Any:
    return cfg[key] if key in cfg else default


def unet_config_from_diffusers(dcfg: Mapping) -> dict:
    """ddpmkit's U-Net configuration for a diffusers ``UNet2DModel`` config (its ``config.json``).

    Anything the U-Net cannot express is a ConfigError that names the option and its value.
    """
    cls = dcfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise ConfigError(f"the model is a diffusers {cls}; only UNet2DModel can be imported")
    for key, allowed in _FIXED.items():
        if key in dcfg and dcfg[key] not in allowed:
            raise ConfigError(f"unsupported UNet2DModel option {key}={dcfg[key]!r} (supported: "
                              f"{', '.join(repr(a) for a in allowed)})")
    boc = list(_get(dcfg, "block_out_channels", (224, 448, 672, 896)))
    down = list(_get(dcfg, "down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                                "AttnDownBlock2D")))
    up = list(_get(dcfg, "up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    if not boc or any(not isinstance(c, int) or c < 1 for c in boc):
        raise ConfigError(f"unsupported block_out_channels={boc!r}")
    for kind, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        for b in types:
            if b not in known:
                raise ConfigError(f"unsupported {kind} entry {b!r} (supported: {', '.join(known)})")
        if len(types) != len(boc):
            raise ConfigError(f"{kind} has {len(types)} entries but block_out_channels has {len(boc)}")
    n = len(boc)
    for k in range(n):
        if _UP[up[k]] != _DOWN[down[n - 1 - k]]:
            raise ConfigError(f"unsupported layout: up block {k} ({up[k]}) does not mirror down block {n - 1 - k} "
                              f"({down[n - 1 - k]}); attention must sit at the same resolutions on both paths")
    base = boc[0]
    if any(c % base for c in boc):
        raise ConfigError(f"unsupported block_out_channels={boc}: every width must be a multiple of the first")
    ted = _get(dcfg, "time_embedding_dim", None)
    if ted not in (None, 4 * base):
        raise ConfigError(f"unsupported time_embedding_dim={ted} (ddpmkit's is 4 x {base} = {4 * base})")
    groups = _get(dcfg, "norm_num_groups", 32)
    ang = _get(dcfg, "attn_norm_num_groups", None)
    if ang not in (None, groups):
        raise ConfigError(f"unsupported attn_norm_num_groups={ang} (must equal norm_num_groups={groups})")
    size = _get(dcfg, "sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ConfigError(f"unsupported sample_size={list(size)}: only square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise ConfigError(f"unsupported sample_size={size!r}: an image side in pixels is needed")
    pad = _get(dcfg, "downsample_padding", 1)
    if pad not in (0, 1):
        raise ConfigError(f"unsupported downsample_padding={pad!r} (supported: 0, 1)")

    attn_res = [size // 2 ** level for level in range(n) if _DOWN[down[level]]]
    head_dim = _get(dcfg, "attention_head_dim", 8)
    attn_widths = sorted({boc[level] for level in range(n) if _DOWN[down[level]]} | {boc[-1]})
    if head_dim is None:
        heads = 1  # diffusers: one head as wide as the block
    else:
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ConfigError(f"unsupported attention_head_dim={head_dim!r}")
        counts = {w // head_dim for w in attn_widths}
        if any(w % head_dim for w in attn_widths) or len(counts) != 1:
            raise ConfigError(f"unsupported attention_head_dim={head_dim} with attention widths {attn_widths}: "
                              "ddpmkit uses the same number of heads at every attention layer")
        heads = counts.pop()
    flip = _get(dcfg, "flip_sin_to_cos", True)
    if not isinstance(flip, bool):
        raise ConfigError(f"unsupported flip_sin_to_cos={flip!r}")
    in_ch = _get(dcfg, "in_channels", 3)
    cfg = {
        "image_size": size,
        "in_channels": in_ch,
        "out_channels": _get(dcfg, "out_channels", 3),
        "base_channels": base,
        "channel_mults": [c // base for c in boc],
        "num_res_blocks": _get(dcfg, "layers_per_block", 2),
        "attention_resolutions": attn_res,
        "dropout": float(_get(dcfg, "dropout", 0.0)),
        "num_groups": groups,
        "num_heads": heads,
        "norm_eps": float(_get(dcfg, "norm_eps", 1e-5)),
        "downsample_padding": "asymmetric" if pad == 0 else "symmetric",
        "flip_sin_to_cos": flip,
        "freq_shift": float(_get(dcfg, "freq_shift", 0)),
    }
    n_cls = _get(dcfg, "num_class_embeds", None)
    if n_cls is not None:
        if isinstance(n_cls, bool) or not isinstance(n_cls, int) or n_cls < 1:
            raise ConfigError(f"unsupported num_class_embeds={n_cls!r}")
        cfg["num_class_embeds"] = n_cls  # diffusers: class_embedding = nn.Embedding(num_class_embeds, 4 ch)
    return UNet.from_config(cfg).config  # validated and normalised by the U-Net itself


def diffusers_config_from_unet(cfg: Mapping) -> dict:
    """The diffusers ``UNet2DModel`` config of a ddpmkit U-Net configuration; ConfigError where none exists."""
    cfg = UNet.from_config(dict(cfg)).config
    base, mults, size = cfg["base_channels"], cfg["channel_mults"], cfg["image_size"]
    boc = [base * m for m in mults]
    attn = set(cfg["attention_resolutions"])
    has_attn = [size // 2 ** level in attn for level in range(len(mults))]
    heads = cfg["num_heads"]
    if heads == 1:
        head_dim = None
    else:
        widths = sorted({boc[level] for level in range(len(mults)) if has_attn[level]} | {boc[-1]})
        if len(widths) != 1:
            raise ConfigError(f"diffusers cannot express {heads} attention heads over attention widths {widths}: "
                              "its UNet2DModel has one head width for every layer")
        head_dim = widths[0] // heads
    return {
        "_class_name": "UNet2DModel",
        "sample_size": size,
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": cfg["flip_sin_to_cos"],
        "freq_shift": cfg["freq_shift"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "block_out_channels": boc,
        "layers_per_block": cfg["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if cfg["downsample_padding"] == "asymmetric" else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg["dropout"],
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": cfg["num_groups"],
        "attn_norm_num_groups": None,
        "norm_eps": cfg["norm_eps"],
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.get("num_class_embeds"),
    }


_OBJECTIVES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_VARIANCES = {"fixed_small": "small", "fixed_small_log": "small", "fixed_large": "large",
              "fixed_large_log": "large",
              # diffusers' learned_range is Improved DDPM eq. 15 on a 2C-channel output: ddpmkit's learned
              "learned_range": "learned"}


def _diffusers_betas(scfg: Mapping, T: int) -> np.ndarray:
    """The betas diffusers computes from a scheduler config (float32, as it does), as float64."""
    trained = scfg.get("trained_betas")
    if trained is not None:
        return np.asarray(trained, dtype=np.float32).astype(np.float64)
    kind = scfg.get("beta_schedule", "linear")
    start, end = float(scfg.get("beta_start", 1e-4)), float(scfg.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, T, dtype=np.float32).astype(np.float64)
    if kind == "scaled_linear":
        return (np.linspace(start ** 0.5, end ** 0.5, T, dtype=np.float32) ** 2).astype(np.float64)
    raise ConfigError(f"unsupported scheduler beta_schedule={kind!r} (supported: linear, scaled_linear, "
                      "squaredcos_cap_v2, or trained_betas)")


def diffusion_from_scheduler(scfg: Mapping) -> dict:
    """The ``diffusion`` section of a run's config.json for a diffusers scheduler config.

    diffusers' ``linear`` schedule with the paper's betas at T steps is ddpmkit's ``linear`` and
    ``squaredcos_cap_v2`` is ddpmkit's ``cosine``; any other schedule is kept as its explicit betas.
    """
    for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
        if scfg.get(key) == bad:
            raise ConfigError(f"unsupported scheduler option {key}={bad}")
    T = scfg.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ConfigError(f"unsupported scheduler num_train_timesteps={T!r}")
    pred = scfg.get("prediction_type", "epsilon")
    if pred not in _OBJECTIVES:
        raise ConfigError(f"unsupported scheduler prediction_type={pred!r} (supported: {', '.join(_OBJECTIVES)})")
    var = scfg.get("variance_type", "fixed_small")
    if var not in _VARIANCES:
        raise ConfigError(f"unsupported scheduler variance_type={var!r} (supported: {', '.join(_VARIANCES)})")
    out = {"T": T, "objective": _OBJECTIVES[pred], "variance": _VARIANCES[var]}
    kind = scfg.get("beta_schedule", "linear")
    if scfg.get("trained_betas") is None and kind == "squaredcos_cap_v2":
        return {"schedule": "cosine", **out}
    betas = _diffusers_betas(scfg, T)
    scale = 1000.0 / T  # ddpmkit's linear schedule is the paper's, scaled to T steps
    ours = np.linspace(scale * 1e-4, scale * 0.02, T)
    if scfg.get("trained_betas") is None and kind == "linear" and np.allclose(betas, ours, rtol=1e-6, atol=0):
        return {"schedule": "linear", **out}
    if not np.all(np.isfinite(betas)) or np.any(betas <= 0) or np.any(betas > 1) or betas.size != T:
        raise ConfigError("the scheduler's betas must be T finite numbers in (0, 1]")
    return {"schedule": "custom", "betas": betas.tolist(), **out}


def scheduler_from_diffusion(diffusion: Mapping) -> dict:
    """A diffusers ``DDPMScheduler`` config for the ``diffusion`` section of a run's config.json."""
    T = int(diffusion["T"])
    objective = diffusion.get("objective", "eps")
    pred = {v: k for k, v in _OBJECTIVES.items()}[objective]
    cfg = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": T,
        # learned: Improved DDPM's interpolation, diffusers' learned_range; analytic has no diffusers counterpart
        "variance_type": {"large": "fixed_large", "learned": "learned_range"}.get(diffusion.get("variance"),
                                                                                   "fixed_small"),
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": pred,
        "trained_betas": None,
    }
    kind = diffusion["schedule"]
    if kind == "linear":
        scale = 1000.0 / T
        cfg.update(beta_schedule="linear", beta_start=scale * 1e-4, beta_end=scale * 0.02)
    elif kind == "cosine":
        cfg.update(beta_schedule="squaredcos_cap_v2")
    elif isinstance(diffusion.get("betas"), list):
        cfg.update(beta_schedule="linear", trained_betas=list(diffusion["betas"]))
    else:
        raise ConfigError(f"cannot express the noise schedule {kind!r} as a diffusers scheduler")
    return cfg


# ---------------------------------------------------------------------------------------------- weights


def _pairs(cfg: Mapping) -> list[tuple[str, str, str]]:
    """(ddpmkit prefix, diffusers prefix, kind) for every layer, kind being ``plain``, ``res`` or ``attn``."""
    mults, n_res = cfg["channel_mults"], cfg["num_res_blocks"]
    attn, res = set(cfg["attention_resolutions"]), cfg["image_size"]
    pairs = [("conv_in", "conv_in", "plain"), ("time_embed.0", "time_embedding.linear_1", "plain"),
             ("time_embed.2", "time_embedding.linear_2", "plain")]
    if cfg.get("num_class_embeds") is not None:
        pairs.append(("class_embed", "class_embedding", "embed"))
    i = 0
    for level in range(len(mults)):
        for j in range(n_res):
            pairs.append((f"down.{i}.res", f"down_blocks.{level}.resnets.{j}", "res"))
            if res in attn:
                pairs.append((f"down.{i}.attn", f"down_blocks.{level}.attentions.{j}", "attn"))
            i += 1
        if level != len(mults) - 1:
            pairs.append((f"down.{i}.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            i += 1
            res //= 2
    pairs += [("mid_res1", "mid_block.resnets.0", "res"), ("mid_attn", "mid_block.attentions.0", "attn"),
              ("mid_res2", "mid_block.resnets.1", "res")]
    i = 0
    for k, level in enumerate(reversed(range(len(mults)))):
        for j in range(n_res + 1):
            pairs.append((f"up.{i}.res", f"up_blocks.{k}.resnets.{j}", "res"))
            if res in attn:
                pairs.append((f"up.{i}.attn", f"up_blocks.{k}.attentions.{j}", "attn"))
            i += 1
        if level != 0:
            pairs.append((f"up.{i}.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
            i += 1
            res *= 2
    pairs += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return pairs


_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
              "conv2": "conv2", "skip": "conv_shortcut"}
_QKV_NEW, _QKV_OLD = ("to_q", "to_k", "to_v"), ("query", "key", "value")


def _linear(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], w.shape[1]) if w.ndim == 4 else w  # a 1x1 conv's weight as a Linear's


def state_from_diffusers(dstate: Mapping[str, torch.Tensor], cfg: Mapping) -> dict[str, torch.Tensor]:
    """ddpmkit U-Net weights (float32) from a diffusers ``UNet2DModel`` state dict, for the U-Net ``cfg``.

    Reads both attention namings (``to_q``/``to_out.0`` and the older ``query``/``proj_attn``). Every key of
    the file must be used: a leftover or a missing weight is a CheckpointError naming it.
    """
    src = {k: v for k, v in dstate.items()}
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise CheckpointError(f"the diffusers weights lack {name!r} (the config and the weights disagree)")
        used.add(name)
        return src[name].detach().to(torch.float32)

    def has(name: str) -> bool:
        return name in src

    for ours, theirs, kind in _pairs(cfg):
        if kind == "embed":
            out[f"{ours}.weight"] = take(f"{theirs}.weight")
        elif kind == "plain":
            for p in ("weight", "bias"):
                out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
        elif kind == "res":
            for o, t in _RES_NAMES.items():
                if o == "skip" and not has(f"{theirs}.{t}.weight"):
                    continue
                for p in ("weight", "bias"):
                    out[f"{ours}.{o}.{p}"] = take(f"{theirs}.{t}.{p}")
        else:
            qkv, proj = (_QKV_NEW, "to_out.0") if has(f"{theirs}.to_q.weight") else (_QKV_OLD, "proj_attn")
            for p in ("weight", "bias"):
                out[f"{ours}.norm.{p}"] = take(f"{theirs}.group_norm.{p}")
                parts = [take(f"{theirs}.{q}.{p}") for q in qkv]
                out[f"{ours}.qkv.{p}"] = torch.cat([_linear(x) if p == "weight" else x for x in parts], dim=0)
                w = take(f"{theirs}.{proj}.{p}")
                out[f"{ours}.proj.{p}"] = _linear(w) if p == "weight" else w
    refuse_names(set(src) - used, "have", "that the config does not describe")
    return out


def refuse_names(names, verb: str, why: str) -> None:
    """One CheckpointError line naming (the first five of) ``names``, when there are any: the tensors the diffusers
    weights ``verb`` (have, lack) ``why``."""
    names = sorted(names)
    if names:
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        raise CheckpointError(f"the diffusers weights {verb} {len(names)} tensor(s) {why}: "
                              f"{', '.join(names[:5])}{more}")


def state_to_diffusers(state: Mapping[str, torch.Tensor], cfg: Mapping) -> dict[str, torch.Tensor]:
    """A diffusers ``UNet2DModel`` state dict (current naming) from ddpmkit U-Net weights of config ``cfg``."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in _pairs(cfg):
        if kind == "embed":
            out[f"{theirs}.weight"] = state[f"{ours}.weight"]
        elif kind == "plain":
            for p in ("weight", "bias"):
                out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
        elif kind == "res":
            for o, t in _RES_NAMES.items():
                if f"{ours}.{o}.weight" in state:
                    for p in ("weight", "bias"):
                        out[f"{theirs}.{t}.{p}"] = state[f"{ours}.{o}.{p}"]
        else:
            for p in ("weight", "bias"):
                out[f"{theirs}.group_norm.{p}"] = state[f"{ours}.norm.{p}"]
                for q, part in zip(_QKV_NEW, state[f"{ours}.qkv.{p}"].chunk(3, dim=0)):
                    out[f"{theirs}.{q}.{p}"] = part
                out[f"{theirs}.to_out.0.{p}"] = state[f"{ours}.proj.{p}"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}
