"""The summary of an autoencoder run (``"kind": "autoencoder"`` in config.json): what the autoencoder is, its
reconstructions, their held-out PSNR and Frechet distance, the command that trains it again and the one that trains
a diffusion model on its latents, and its settings against AutoencoderConfig's defaults.

Reading only, as ``summary.py``, whose ``summarize`` and ``settings_rows`` come here for such a run.
"""

from __future__ import annotations

import json
import shlex
from functools import partial
from pathlib import Path

from ..errors import DdpmkitError
from ..run import Run
from .summary_common import (NOT_RECORDED, Fact, Setting, Summary, changed_first, data_fact, feature_network, figure,
                             frechet_shown, last_measured, numbers, plural, time_limit_note, train_again,
                             trainer_grids, training)

__all__ = ["summarize_autoencoder", "autoencoder_settings_rows", "autoencoder_shape", "autoencoder_arguments",
           "reconstruction_figures", "reconstruction_figure"]


def summarize_autoencoder(run: Run, metrics: dict | None, why: str) -> Summary:
    """The summary of the autoencoder run ``run``; ``why`` says why ``metrics`` (metrics.csv's) is None."""
    grid, caption = reconstruction_figure(run)
    return Summary(model=_model(run), training=training(run, metrics, why), quality=_quality(run, metrics),
                   grid=grid, grid_caption=caption, commands=_commands(run))


# ---------------------------------------------------------------------------------------------- what
def autoencoder_shape(model_config) -> tuple[int, int, tuple[int, int, int] | None]:
    """An autoencoder configuration's (parameters, f, latent (C, h, w) or None without an image size), from the
    network built on the meta device after ``limits.check_autoencoder_config``'s checks."""
    import torch

    from ..limits import check_autoencoder_config
    from ..models.autoencoder import AutoencoderKL

    params = check_autoencoder_config(model_config, "config.json")
    with torch.device("meta"):
        ae = AutoencoderKL.from_config(dict(model_config))
    return params, ae.factor, ae.latent_shape() if model_config.get("image_size") is not None else None


def _model(run: Run) -> list[Fact]:
    config = run.config
    model = config.get("model")
    params, f, latent = autoencoder_shape(model)
    c, size = model.get("in_channels"), model.get("image_size")
    image = (Fact("image", f"{size}x{size}, {plural(c, 'channel')}", "config.json model") if size is not None
             else Fact("image", f"any size divisible by {f}, {plural(c, 'channel')}", "config.json model"))
    lc = model.get("latent_channels")
    latents = (Fact("latents", f"{latent[0]}x{latent[1]}x{latent[2]}", "C x H/f x W/f of the posterior's mean")
               if latent else Fact("latents", f"{lc} x H/{f} x W/{f}", "config.json model: latent_channels"))
    data = data_fact(config)
    train = config.get("train")
    holdout = train.get("holdout") if isinstance(train, dict) else None
    if isinstance(holdout, (int, float)) and holdout > 0 and str(train.get("data")).lower() != "cifar10":
        data = data._replace(source=f"{holdout:.0%} of it held out (--holdout): the pictures and the PSNR are of "
                                    "those images")
    elif str(data.value).lower() == "cifar10":
        data = data._replace(source="the pictures and the PSNR are of its test split")
    facts = [data, image,
             Fact("parameters", f"{params:,}", "KL autoencoder of config.json: encoder and decoder"),
             Fact("factor", f"f = {f}", "downsampling of each side (config.json model.block_out_channels)"),
             latents]
    own = config.get("latent")
    if isinstance(own, dict) and own.get("scaling_factor") is not None:  # e.g. an imported diffusers VAE's
        facts.append(Fact("latent scale", numbers(own["scaling_factor"]),
                          "its own scaling_factor (config.json latent): a latent run takes it instead of measuring"))
    if not isinstance(train, dict):  # an imported autoencoder: its training is not known here
        imported = config.get("imported_from")
        why = (f"imported from {imported.get('source')} ({imported.get('format')})" if isinstance(imported, dict)
               else "config.json has no train section")
        return facts + [Fact("KL weight", NOT_RECORDED, why), Fact("discriminator", NOT_RECORDED, why)]
    facts.append(Fact("KL weight", f"{train.get('kl_weight', NOT_RECORDED):g}"
                      if isinstance(train.get("kl_weight"), (int, float)) else NOT_RECORDED,
                      "--kl-weight: KL summed over the latent against L1 summed over the pixels (LDM)"))
    weight = train.get("disc_weight")
    if isinstance(weight, (int, float)) and weight > 0:
        start = train.get("disc_start", 0)
        start = f"{start:,}" if isinstance(start, int) else str(start)
        layers = train.get("disc_layers")
        layers = plural(layers, "stride-2 layer") if isinstance(layers, int) else "stride-2 layers"
        facts.append(Fact("discriminator", "on", f"PatchGAN, {layers}; "
                                                 f"--disc-weight {weight:g} x LDM's adaptive weight, from step "
                                                 f"{start}"))
    else:
        facts.append(Fact("discriminator", "off", "--disc-weight 0: L1 and KL only"))
    if train.get("perceptual"):
        facts.append(Fact("perceptual loss", str(train["perceptual"]),
                          f"--perceptual, weight {train.get('perceptual_weight', '?')}"))
    return facts


# ---------------------------------------------------------------------------------------------- how good
def _quality(run: Run, metrics: dict | None) -> list[Fact]:
    """The held-out PSNR and the Frechet distance of the reconstructions: ``ddpmkit autoencoder eval``'s
    eval/reconstruction.json, else the last --eval-every row of metrics.csv."""
    path = run.dir / "eval" / "reconstruction.json"
    measure = f"ddpmkit autoencoder eval {run.dir}"
    if path.is_file():
        try:
            d = json.loads(path.read_text())
            psnr, std, n = float(d["psnr_db"]), float(d["psnr_std"]), int(d["n"])
            fd, se = d.get("fd"), d.get("fd_stderr")
            data, features, ema = d.get("data"), d.get("features"), d.get("ema")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [Fact("PSNR", "unreadable", f"{path}: {e}"), Fact("Frechet distance", "unreadable", str(path))]
        stale = ""
        if (run.dir / "metrics.csv").is_file() and (run.dir / "metrics.csv").stat().st_mtime > path.stat().st_mtime:
            stale = " (measured before the run's last steps: run it again)"
        weights = "EMA" if ema else "raw" if ema is not None else "?"
        where = f"eval/reconstruction.json{stale}"
        quality = [Fact("PSNR", f"{psnr:.2f} dB", f"held-out: mean over {n} images of {data} (std {std:.2f} dB), "
                                                   f"{weights} weights; higher is better; {where}")]
        if fd is None:
            quality.append(Fact("Frechet distance", "not measured", f"no feature network for {data}; {where}"))
        else:
            shown = figure(float(fd)) + (f" \u00b1 {figure(float(se))}" if se is not None else "")
            quality.append(Fact("Frechet distance", shown, f"of the {n} reconstructions to their originals, "
                                                           f"{features} features; lower is better; {where}"))
        return quality
    train = run.config.get("train")
    if not isinstance(train, dict):  # an imported autoencoder has no held-out images of its own
        train, how = {}, f"{measure} --data SOURCE"
    else:
        how = f"{measure} (or train with --eval-every N)"
    i = last_measured(metrics, "psnr")
    if i is None:
        psnr = Fact("PSNR", "not measured", how)
    else:
        psnr = Fact("PSNR", f"{float(metrics['psnr'][i]):.2f} dB",
                    f"metrics.csv psnr at step {int(metrics['step'][i]):,}: {train.get('eval_n', '?')} held-out "
                    f"images (--eval-n), EMA weights; higher is better; {measure} measures it again")
    i = last_measured(metrics, "fd")
    if i is None:
        frechet = Fact("Frechet distance", "not measured", how)
    else:
        frechet = Fact("Frechet distance", frechet_shown(metrics, i),
                       f"metrics.csv fd at step {int(metrics['step'][i]):,}: the reconstructions of "
                       f"{train.get('eval_n', '?')} held-out images to their originals, {feature_network(train)} "
                       f"features; lower is better")
    return [psnr, frechet]


# ---------------------------------------------------------------------------------------------- reconstructions
def reconstruction_figures(run_dir: Path) -> list[Path]:
    """An autoencoder run's pictures of held-out originals above their reconstructions: the trainer's latest
    (samples/grid_step_N.png) and ``ddpmkit autoencoder eval``'s (eval/reconstructions.png), oldest first."""
    figures = trainer_grids(run_dir)[-1:]
    if (run_dir / "eval" / "reconstructions.png").is_file():
        figures.append(run_dir / "eval" / "reconstructions.png")
    return sorted(figures, key=lambda p: p.stat().st_mtime)


def reconstruction_figure(run: Run) -> tuple[Path | None, str]:
    """The picture an autoencoder run's summary shows: the newest of its reconstruction figures."""
    figures = reconstruction_figures(run.dir)
    if not figures:
        return None, f"no reconstructions yet: ddpmkit autoencoder eval {run.dir}"
    newest = figures[-1]
    what = "held-out originals (top rows) above their reconstructions (the rows below)"
    if newest.parent.name == "eval":
        try:
            ema = json.loads((newest.parent / "reconstruction.json").read_text()).get("ema")
            weights = {True: "EMA weights", False: "raw weights"}.get(ema, "")
        except (OSError, ValueError, AttributeError):
            weights = ""
        return newest, (f"{what}, posterior means{', ' + weights if weights else ''} (ddpmkit autoencoder eval); "
                        f"eval/{newest.name}")
    step = int(newest.stem.rsplit("_", 1)[-1])
    return newest, f"{what}, EMA weights at step {step:,}; samples/{newest.name}"


# ---------------------------------------------------------------------------------------------- commands
def _defaults():
    """AutoencoderConfig's default of each setting, by name: what an autoencoder run's settings differ from."""
    from ..train.autoencoder_config import AutoencoderConfig
    from ..train.settings import class_default

    return class_default(AutoencoderConfig)


def autoencoder_arguments(cfg) -> list[str]:
    """The ``ddpmkit autoencoder train`` arguments that give the AutoencoderConfig ``cfg`` again: one flag per
    setting that differs from AutoencoderConfig's defaults."""
    from ..train.settings import changed_arguments

    return changed_arguments(cfg, _defaults())


def _train_again(run: Run, cfg) -> Fact:
    again = "ddpmkit autoencoder train " + shlex.join(["--out", str(run.dir)] + autoencoder_arguments(cfg))
    return Fact("train it again", again, time_limit_note(cfg))


def _commands(run: Run) -> list[Fact]:
    """An autoencoder run's: train it again (or import it again), and train a diffusion model on its latents."""
    from ..train.autoencoder_config import AutoencoderConfig

    out = shlex.quote(str(run.dir))
    model = run.config.get("model") or {}
    train = run.config.get("train")
    latent = [f"--image-size {model['image_size']}"] if model.get("image_size") is not None else []
    if isinstance(train, dict):  # the data it trained on, where that is not `ddpmkit train`'s default
        from ..train.config import TrainConfig

        defaults = TrainConfig.__dataclass_fields__
        for name in ("data", "channels"):
            if train.get(name) is not None and train[name] != defaults[name].default:
                latent.append(f"--{name} {shlex.quote(str(train[name]))}")
    c = model.get("latent_channels")
    note = f"latent diffusion: the U-Net works on its {c}-channel latents" if c else "latent diffusion"
    if model.get("image_size") is None:
        note += "; give the images' --image-size, --data and --channels"
    nxt = Fact("train a diffusion model on its latents",
               " ".join(["ddpmkit train --autoencoder", out, *latent, "--out runs/latent"]), note)
    return [train_again(run, AutoencoderConfig.from_json, partial(_train_again, run)), nxt]


# ---------------------------------------------------------------------------------------------- settings
def autoencoder_settings_rows(config: dict) -> list[Setting]:
    """An autoencoder run's config.json training settings: those that differ from AutoencoderConfig's defaults
    first (in declaration order), then the rest by name; none marked where this ddpmkit cannot read them."""
    from ..train.autoencoder_config import AutoencoderConfig
    from ..train.settings import changed_names

    stored = config.get("train")
    if not isinstance(stored, dict):
        return []
    changed: list[str] = []
    try:
        changed = changed_names(AutoencoderConfig.from_json(config), _defaults())
    except (DdpmkitError, TypeError):
        pass  # settings this ddpmkit cannot read: shown as stored, none marked
    return changed_first(stored, changed, _defaults())
