"""The training data of a latent diffusion run: the images encoded once by a frozen autoencoder, scaled.

``prepare_latents`` opens the autoencoder (the run named by ``--autoencoder``; on a resume, the run's own copy of
it, so that the latents keep their meaning), encodes the images (cached, :func:`ddpmkit.latent.cached_latents`)
and picks the scale: the autoencoder's own ``scaling_factor`` when it has one (an imported Stable Diffusion VAE),
else 1 / std measured on these latents. ``save_autoencoder_copy`` writes the copy into the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError
from ..latent import AUTOENCODER_DIR, LatentSpace, cached_latents, measure_scale
from ..run import open_autoencoder
from ..store import prepare_run_dir, save_checkpoint, write_config
from ..store.rundir import CONFIG_NAME

__all__ = ["PreparedLatents", "prepare_latents", "save_autoencoder_copy", "latent_scale_of"]


@dataclass
class PreparedLatents:
    """A latent run's space; :func:`prepare_latents` returns the training set's latents beside it."""

    space: LatentSpace  # the frozen autoencoder and the scale
    info: dict  # config.json's "latent" section
    shape: tuple[int, int, int]  # (C, h, w) of a latent
    autoencoder_config: dict  # the autoencoder run's config.json


def latent_scale_of(latent_section: dict | None, means: torch.Tensor):
    """(scale, shift, where the scale came from) for the posterior means ``means`` of the training set.

    An autoencoder that comes with its ``scaling_factor`` keeps it, with its ``shift_factor``, or with per-channel
    ``latents_mean``/``latents_std`` where it has those: ``z = (mean - m_c) * scaling_factor / s_c``, as diffusers'
    pipelines apply them. Otherwise the scale is measured: 1 / std of every value of ``means``.
    """
    section = latent_section or {}
    factor = section.get("scaling_factor")
    if factor is None:
        return measure_scale(means), 0.0, "measured"
    mean, std = section.get("latents_mean"), section.get("latents_std")
    if mean is not None and std is not None:
        std_t = torch.as_tensor(std, dtype=torch.float64)
        return (float(factor) / std_t).tolist(), list(map(float, mean)), "autoencoder"
    return float(factor), float(section.get("shift_factor") or 0.0), "autoencoder"


def prepare_latents(cfg, images_uint8: torch.Tensor, ctx) -> tuple[PreparedLatents, torch.Tensor,
                                                                     torch.Tensor | None]:
    """The latent space of the run of settings ``cfg`` (``cfg.autoencoder`` set), with the task context ``ctx``
    (device, ranks, log, run_dir, stored_config), and the scaled latents of ``images_uint8`` (uint8 [N, C, H, W]) and
    of their mirror images (with --flip; else None), float32 on the CPU."""
    run_dir = Path(ctx.run_dir) if ctx.run_dir is not None else None
    copy = None if run_dir is None else run_dir / AUTOENCODER_DIR
    # a resume keeps the scale and the autoencoder the run trained with: its own copy, even if the run at
    # --autoencoder trained on since; without the copy, the run at --autoencoder, if it is still the same one
    stored = ctx.stored_config.get("latent") if ctx.stored_config is not None and run_dir is not None else None
    source = copy if stored is not None and (copy / CONFIG_NAME).is_file() else cfg.autoencoder
    ae, ae_config, ae_hash = open_autoencoder(source)
    if stored is not None and stored.get("autoencoder_hash") not in (None, ae_hash):
        missing = "" if source == copy else f", and the run's own copy {copy} is missing"
        raise CheckpointError(f"{source} is not the autoencoder this run was trained with (its hash changed"
                              f"{missing})")
    in_channels = ae.config["in_channels"]
    if in_channels != cfg.channels:
        raise ConfigError(f"the autoencoder {cfg.autoencoder} takes {in_channels}-channel images, and --channels is "
                          f"{cfg.channels}")
    shape = tuple(ae.latent_shape(cfg.image_size))
    ae.to(ctx.device)
    means, mirrored = ctx.dist.main_first(lambda: cached_latents(
        ae, ae_hash, images_uint8, flip=cfg.flip, device=ctx.device, log=ctx.log if not ctx.quiet else None))
    if stored is not None:
        scale, shift, where = stored["scale"], stored.get("shift", 0.0), stored.get("scale_source", "measured")
    else:
        scale, shift, where = latent_scale_of(ae_config.get("latent"), means)
    space = LatentSpace.of(ae, scale, shift)
    latents = space.scaled(means)
    mirrored = None if mirrored is None else space.scaled(mirrored)
    std = float(latents.double().std())
    info = space.section(shape=list(shape), image_shape=[cfg.channels, cfg.image_size, cfg.image_size],
                         autoencoder=str(cfg.autoencoder), autoencoder_hash=ae_hash, scale_source=where,
                         latent_std=std)
    scale_text = f"{space.scale[0]:.5g}" if len(set(space.scale.tolist())) == 1 else "per channel"
    ctx.log(f"latent space of {cfg.autoencoder}: {shape[0]}x{shape[1]}x{shape[2]} latents (f = {ae.factor}), "
            f"scale {scale_text} ({where}); the scaled latents' std is {std:.3f}")
    return PreparedLatents(space, info, shape, ae_config), latents, mirrored


def save_autoencoder_copy(run_dir, prepared: PreparedLatents) -> Path:
    """The run's own copy of its autoencoder, ``RUN/autoencoder``: an autoencoder run of one checkpoint (its EMA
    weights as trained weights), written once; a copy already there is kept."""
    dest = Path(run_dir) / AUTOENCODER_DIR
    if (dest / CONFIG_NAME).is_file():
        return dest
    prepare_run_dir(dest, resume=False)
    ae = prepared.space.autoencoder
    save_checkpoint(dest, 0, model_state={k: v.detach().cpu() for k, v in ae.state_dict().items()}, keep=None)
    source = prepared.autoencoder_config
    config = {"format": "ddpmkit-run", "version": 1, "ddpmkit_version": __version__, "kind": "autoencoder",
              "model": ae.config, "latent": source.get("latent"), "data": source.get("data"),
              "copied_from": {"run": prepared.info["autoencoder"], "hash": prepared.info["autoencoder_hash"]}}
    if "train" in source:  # its settings, for `autoencoder eval` of the copy
        config["train"] = source["train"]
    write_config(dest, config)  # last: a folder without config.json is not taken for a run
    return dest
