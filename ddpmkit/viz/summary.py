"""What a person opens a run's report for, read from the run's own files: what was trained, for how long, how good
it is, one grid of samples, the commands that train it again and sample from it, and its settings with those that
differ from the preset's first.

Reading only; ``report.py`` writes the page. Each number says the file (and setting) it comes from; what a run
does not record is said to be "not recorded", never guessed.

Three kinds of run: a diffusion run on pixels; a latent diffusion run (config.json's ``latent`` section: the U-Net
works on an autoencoder's scaled latents, its samples are decoded); and an autoencoder run (``"kind":
"autoencoder"``), whose summary is its reconstructions, their held-out PSNR and Frechet distance, and the command
that trains a diffusion model on its latents.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DdpmkitError
from ..run import Run
from . import plots

__all__ = ["Fact", "Setting", "Summary", "summarize", "settings_rows", "space", "autoencoder_arguments",
           "NOT_RECORDED"]

NOT_RECORDED = "not recorded"


class Fact(NamedTuple):
    label: str
    value: str
    source: str = ""  # where the value comes from: a file, a setting, a paper


class Setting(NamedTuple):
    name: str
    value: object
    preset_value: object = None  # the preset's value, for a setting that differs from it
    changed: bool = False


@dataclass
class Summary:
    model: list[Fact]  # what was trained
    training: list[Fact]  # for how long
    quality: list[Fact]  # how good
    grid: Path | None  # one grid of samples
    grid_caption: str
    commands: list[Fact]  # (what it does, the command line, a note)


def summarize(run_dir, config: dict) -> Summary:
    """The summary of the run in ``run_dir`` whose config.json is ``config``."""
    run = Run(run_dir, config)
    metrics, why = _metrics(run.dir)
    if run.kind == "autoencoder":
        grid, caption = reconstruction_figure(run)
        return Summary(model=_autoencoder_model(run), training=_training(run, metrics, why),
                       quality=_autoencoder_quality(run, metrics), grid=grid, grid_caption=caption,
                       commands=_autoencoder_commands(run))
    grid, caption = summary_grid(run)
    return Summary(model=_model(run), training=_training(run, metrics, why), quality=_quality(run, metrics),
                   grid=grid, grid_caption=caption, commands=_commands(run))


# ---------------------------------------------------------------------------------------------- what
def space(config: dict) -> str:
    """Where the diffusion runs: "latent" for a latent diffusion run (DESIGN.md: data through a frozen autoencoder;
    config.json's ``latent`` section holds its scale), else "pixel". An autoencoder run's own ``latent`` section
    describes its latents, not a diffusion."""
    section = config.get("latent")
    if config.get("kind") != "autoencoder" and type(section) is dict and "scale" in section:
        return "latent"
    return "pixel"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _data_fact(config: dict) -> Fact:
    imported = config.get("imported_from")
    if isinstance(imported, dict):
        return Fact("data", "not recorded", f"imported from {imported.get('source')} ({imported.get('format')})")
    return Fact("data", str(config.get("train", {}).get("data", NOT_RECORDED)))


def _model(run: Run) -> list[Fact]:
    from ..limits import check_model_config

    config = run.config
    c, h, w = run.image_shape
    params = check_model_config(config.get("model"), "config.json")  # the U-Net built on the meta device
    if run.class_cond:
        cond = Fact("conditioning", f"class-conditional, {len(run.class_names)} classes",
                    f"null label {run.null_class} for guidance" if run.null_class is not None else "no null class")
    else:
        cond = Fact("conditioning", "unconditional")
    if run.is_latent:
        c, h, w = run.pixel_shape
        return [_data_fact(config),
                Fact("image", f"{h}x{w}, {_plural(c, 'channel')}", "decoded by the autoencoder (config.json "
                                                                    "latent.image_shape)"),
                Fact("parameters", f"{params:,}", "U-Net of config.json, on the latents (the autoencoder's apart)"),
                cond, Fact("space", space(config), "diffusion on the scaled latents of a frozen autoencoder"),
                *_latent_facts(run)]
    return [_data_fact(config), Fact("image", f"{h}x{w}, {_plural(c, 'channel')}", "config.json model"),
            Fact("parameters", f"{params:,}", "U-Net of config.json"), cond,
            Fact("space", space(config), "diffusion on the images themselves")]


def _numbers(v) -> str:
    """A scale or shift: one number, or one per channel."""
    if isinstance(v, (list, tuple)):
        return ", ".join(_numbers(x) for x in v)
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def _latent_facts(run: Run) -> list[Fact]:
    """A latent run's autoencoder: where it came from, f, the latents' shape, their scale and where it came from."""
    section = run.latent_section
    copy = run.dir / "autoencoder"
    ae_path = section.get("autoencoder")
    params = ""
    try:
        ae = json.loads((copy / "config.json").read_text())
        params = f"; {autoencoder_shape(ae.get('model'))[0]:,} parameters"
    except (OSError, ValueError, DdpmkitError, TypeError, AttributeError):
        pass  # the facts below come from the run's own config.json
    shape = section.get("shape")
    c, h, w = shape if isinstance(shape, list) and len(shape) == 3 else run.image_shape
    image_h = run.pixel_shape[1]
    f = image_h // h if h and image_h % h == 0 else None
    where = {"measured": "measured: 1 / std of the posterior means over the training images",
             "autoencoder": "the autoencoder's own scaling factor"}.get(section.get("scale_source"),
                                                                      str(section.get("scale_source", NOT_RECORDED)))
    shift = section.get("shift", 0.0)
    shift_s = "" if shift in (0, 0.0, None) or (isinstance(shift, list) and not any(shift)) else \
        f", shift {_numbers(shift)}"
    std = section.get("latent_std")
    std = f"; the scaled latents' std {std:.3f}" if isinstance(std, (int, float)) else ""
    return [Fact("autoencoder", str(ae_path) if ae_path is not None else NOT_RECORDED,
                 f"config.json latent.autoencoder, as given to --autoencoder; the run's own copy: "
                 f"{copy.name}/{params}"),
            Fact("latents", f"{c}x{h}x{w}" + (f", f = {f}" if f else ""),
                 "config.json latent.shape: C x H/f x W/f"),
            Fact("scale", _numbers(section.get("scale")) + shift_s,
                 f"z = (mean - shift) x scale; {where} (latent.scale_source){std}")]


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


def _autoencoder_model(run: Run) -> list[Fact]:
    config = run.config
    model = config.get("model")
    params, f, latent = autoencoder_shape(model)
    c, size = model.get("in_channels"), model.get("image_size")
    image = (Fact("image", f"{size}x{size}, {_plural(c, 'channel')}", "config.json model") if size is not None
             else Fact("image", f"any size divisible by {f}, {_plural(c, 'channel')}", "config.json model"))
    lc = model.get("latent_channels")
    latents = (Fact("latents", f"{latent[0]}x{latent[1]}x{latent[2]}", "C x H/f x W/f of the posterior's mean")
               if latent else Fact("latents", f"{lc} x H/{f} x W/{f}", "config.json model: latent_channels"))
    data = _data_fact(config)
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
        facts.append(Fact("latent scale", _numbers(own["scaling_factor"]),
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
        layers = _plural(layers, "stride-2 layer") if isinstance(layers, int) else "stride-2 layers"
        facts.append(Fact("discriminator", "on", f"PatchGAN, {layers}; "
                                                 f"--disc-weight {weight:g} x LDM's adaptive weight, from step "
                                                 f"{start}"))
    else:
        facts.append(Fact("discriminator", "off", "--disc-weight 0: L1 and KL only"))
    if train.get("perceptual"):
        facts.append(Fact("perceptual loss", str(train["perceptual"]),
                          f"--perceptual, weight {train.get('perceptual_weight', '?')}"))
    return facts


# ---------------------------------------------------------------------------------------------- how long
def _metrics(run_dir: Path) -> tuple[dict | None, str]:
    """metrics.csv's columns, or None and why not."""
    try:
        return plots.load_metrics(run_dir / "metrics.csv"), ""
    except plots.PlotError as e:
        return None, str(e)


def duration(seconds: float) -> str:
    """31 s, 12.5 min, 3.2 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _training(run: Run, metrics: dict | None, why: str) -> list[Fact]:
    train = run.config.get("train", {})
    machine = run.config.get("machine")
    device = train.get("device", "auto")
    if type(machine) is dict and machine.get("device"):  # written by the trainer (describe_machine)
        procs = machine.get("processes", 1)
        device = Fact("device", str(machine["device"]) + (f" x {procs}" if isinstance(procs, int) and procs > 1
                                                             else ""),
                      f"{machine.get('name', '')}; torch {machine.get('torch', '?')} (config.json machine)")
    else:
        device = (Fact("device", NOT_RECORDED, "--device auto: the run does not write down the device it picked")
                  if device == "auto" else Fact("device", str(device), "--device"))
    if metrics is None:
        return [Fact("steps", NOT_RECORDED, why), Fact("wall-clock", NOT_RECORDED, why), device]
    step = int(metrics["step"][-1])
    asked = [f"--steps {train['steps']:,}"] if isinstance(train.get("steps"), int) and step < train["steps"] else []
    asked += [f"--time-limit {train['time_limit']} s"] if train.get("time_limit") else []
    steps = Fact("steps", f"{step:,}", "last row of metrics.csv" + (f" ({', '.join(asked)})" if asked else ""))
    wall = metrics.get("wall_s")
    if wall is None or not math.isfinite(wall[-1]):
        clock = Fact("wall-clock", NOT_RECORDED, "metrics.csv has no wall_s")
    else:  # the trainer's wall_s: seconds since the run began, over resumes, the --eval-every measuring included
        clock = Fact("wall-clock", duration(float(wall[-1])), f"metrics.csv wall_s at step {step:,}")
    return [steps, clock, device]


# ---------------------------------------------------------------------------------------------- how good
def figure(x: float) -> str:
    """Three significant digits, no exponent: 379, 6.73, 0.0412."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:,.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def _quality(run: Run, metrics: dict | None) -> list[Fact]:
    return [frechet_fact(run, metrics), bpd_fact(run.dir, run.is_latent), memorization_fact(run.dir)]


def frechet_fact(run: Run, metrics: dict | None) -> Fact:
    """The latest --eval-every Frechet distance in metrics.csv (metrics/quality.py)."""
    train = run.config.get("train", {})
    fd = metrics.get("fd") if metrics is not None else None
    if fd is None or not np.isfinite(fd).any():
        return Fact("Frechet distance", NOT_RECORDED, "train with --eval-every N to measure it as the run goes")
    i = int(np.flatnonzero(np.isfinite(fd))[-1])
    features = "digits classifier" if str(train.get("data")).lower() == "digits" else "Inception"  # QualityProbe
    n = train.get("eval_n")
    how = (f"{n} samples (--eval-n), " if n else "") + f"{train.get('eval_sampler')} {train.get('eval_steps')} steps"
    se = metrics.get("fd_stderr")
    shown = figure(float(fd[i]))
    if se is not None and math.isfinite(float(se[i])):  # the jackknife standard error (metrics/quality.py)
        shown += f" \u00b1 {figure(float(se[i]))}"
    return Fact("Frechet distance", shown,
                f"metrics.csv fd at step {int(metrics['step'][i]):,}: {how}, {features} features; lower is better")


# A latent run's bound (metrics/nll.py): on the density of the scaled latents, with a continuous Gaussian L_0
LATENT_BPD = "bits/latent dim"
_LATENT_BPD_NOTE = "on the scaled latents, continuous Gaussian L_0; not comparable to pixel bits/dim"
_LATENT_COLUMN = "bits_per_latent_dim"  # eval/nll_terms.csv's column of a latent run (``write_terms_csv``)


def bpd_fact(run_dir: Path, latent: bool = False) -> Fact:
    """The variational bound of ``ddpmkit eval nll``: eval/nll_terms.json (the bound, its standard error, the
    images and the conditioning), else the sum of the T+1 terms of eval/nll_terms.csv.

    A latent run's bound (``"space": "latent"`` in the notes, the ``bits_per_latent_dim`` column in the CSV; or
    ``latent`` when there is neither) is in bits per latent dimension, labelled as such: it is not pixel
    bits/dim."""
    notes = run_dir / "eval" / "nll_terms.json"
    label = LATENT_BPD if latent else "bits/dim"
    try:
        d = json.loads(notes.read_text()) if notes.is_file() else None
        if d is not None:
            cond = f", conditioned on {d['conditioning']}" if d.get("conditioning") else ""
            value = f"{float(d['bpd']):.3f} \u00b1 {float(d['bpd_stderr']):.3f}"
            if d.get("space") == "latent":
                shape = d.get("latent_shape")
                into = f" encoded into {'x'.join(map(str, shape))} latents" if isinstance(shape, list) else ""
                return Fact(LATENT_BPD, value, f"upper bound, DDPM eq. 5, {_LATENT_BPD_NOTE}: {d['n']} images of "
                                               f"{d['source']} ({d['split']}){into}{cond}, variance "
                                               f"{d['variance']}; eval/nll_terms.json")
            return Fact("bits/dim", value,
                        f"upper bound, DDPM eq. 5: {d['n']} images of {d['source']} ({d['split']}){cond}, "
                        f"variance {d['variance']}; eval/nll_terms.json")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact(label, "unreadable", f"{notes}: {e}")
    path = run_dir / "eval" / "nll_terms.csv"
    if not path.is_file():
        return Fact(label, "not measured", f"ddpmkit eval nll {run_dir}")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            latent_csv = _LATENT_COLUMN in (reader.fieldnames or ())
            bits = [float(row[_LATENT_COLUMN if latent_csv else "bits"]) for row in reader]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact(label, "unreadable", f"{path}: {e}")
    # DDPM eq. 5: L = L_T + sum_{t>1} L_{t-1} + L_0; the file's rows are the mean bits/dim of each term
    if latent_csv:
        return Fact(LATENT_BPD, f"{sum(bits):.3f}",
                    f"upper bound, DDPM eq. 5, {_LATENT_BPD_NOTE}: the sum of eval/nll_terms.csv")
    return Fact("bits/dim", f"{sum(bits):.3f}", "upper bound, DDPM eq. 5: the sum of eval/nll_terms.csv")


def _autoencoder_quality(run: Run, metrics: dict | None) -> list[Fact]:
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
    features = "digits classifier" if str(train.get("data")).lower() == "digits" else "Inception"
    col = metrics.get("psnr") if metrics is not None else None
    if col is None or not np.isfinite(col).any():
        psnr = Fact("PSNR", "not measured", how)
    else:
        i = int(np.flatnonzero(np.isfinite(col))[-1])
        psnr = Fact("PSNR", f"{float(col[i]):.2f} dB",
                    f"metrics.csv psnr at step {int(metrics['step'][i]):,}: {train.get('eval_n', '?')} held-out "
                    f"images (--eval-n), EMA weights; higher is better; {measure} measures it again")
    fd = metrics.get("fd") if metrics is not None else None
    if fd is None or not np.isfinite(fd).any():
        frechet = Fact("Frechet distance", "not measured", how)
    else:
        i = int(np.flatnonzero(np.isfinite(fd))[-1])
        se = metrics.get("fd_stderr")
        shown = figure(float(fd[i]))
        if se is not None and math.isfinite(float(se[i])):
            shown += f" \u00b1 {figure(float(se[i]))}"
        frechet = Fact("Frechet distance", shown,
                       f"metrics.csv fd at step {int(metrics['step'][i]):,}: the reconstructions of "
                       f"{train.get('eval_n', '?')} held-out images to their originals, {features} features; lower "
                       f"is better")
    return [psnr, frechet]


def memorization_fact(run_dir: Path) -> Fact:
    """The verdict of ``ddpmkit eval memorization`` (eval/memorization.json, pixel distances)."""
    path = run_dir / "eval" / "memorization.json"
    label = "memorisation check"
    if not path.is_file():
        return Fact(label, "not run", f"ddpmkit eval memorization {run_dir}")
    try:
        px = json.loads(path.read_text())["pixels"]
        near, real, n = float(px["near_copies"]), float(px["real_near_copies"]), int(px["n"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Fact(label, "unreadable", f"{path}: {e}")
    # metrics/memorization.py: no more near copies than real images have, up to the sampling error of n samples
    # (two binomial standard errors of the real images' rate)
    allowed = real + 2 * math.sqrt(real * (1 - real) / max(n, 1))
    verdict = "passed" if near <= allowed else "failed"
    return Fact(label, verdict, f"{100 * near:.1f}% of {n} samples are near copies of training images (real "
                                f"images: {100 * real:.1f}%); eval/memorization.json")


# ---------------------------------------------------------------------------------------------- samples
def trainer_grids(run_dir: Path) -> list[Path]:
    """The trainer's sample grids (samples/grid_step_N.png), oldest first."""
    return sorted((run_dir / "samples").glob("grid_step_*.png")) if (run_dir / "samples").is_dir() else []


def sample_grids(run_dir: Path) -> list[Path]:
    """The grids of ``ddpmkit sample`` and the demo (samples*/**/grid.png)."""
    return sorted(run_dir.glob("samples*/**/grid.png"))


def summary_grid(run: Run) -> tuple[Path | None, str]:
    """The grid the summary shows: the trainer's latest (the model at its last sampled step), else the newest
    grid of ``ddpmkit sample``."""
    rows = ", one row per class" if run.class_cond else ""
    grids = trainer_grids(run.dir)
    if grids:
        train = run.config.get("train", {})
        step = int(grids[-1].stem.rsplit("_", 1)[-1])
        how = f"{train.get('sample_sampler', '?')}, {train.get('sample_steps', '?')} steps"
        if run.class_cond:
            from ..diffusion.denoiser import DEFAULT_GUIDANCE  # the trainer guides its grid with it

            how += f", guidance {DEFAULT_GUIDANCE:g}"
        decoded = ", decoded by the autoencoder" if run.is_latent else ""
        return grids[-1], f"EMA samples at step {step:,} ({how}){decoded}{rows}; samples/{grids[-1].name}"
    grids = sample_grids(run.dir)
    if grids:
        newest = max(grids, key=lambda p: p.stat().st_mtime)
        return newest, f"samples{rows}; {newest.relative_to(run.dir)}"
    return None, "no samples yet: ddpmkit sample " + str(run.dir)


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
def _commands(run: Run) -> list[Fact]:
    out = shlex.quote(str(run.dir))
    sample = Fact("sample from it", f"ddpmkit sample {out}",
                  "every class in turn, one row each; --class C for one" if run.class_cond else "")
    imported = run.config.get("imported_from")
    if isinstance(imported, dict):
        return [Fact("import it again", f"ddpmkit import-diffusers {shlex.quote(str(imported.get('source')))} "
                                        f"--out {out}"), sample]
    from ..train.config import PRESETS, TrainConfig, train_arguments

    try:
        cfg = TrainConfig.from_json(run.config)
    except (DdpmkitError, TypeError) as e:
        return [Fact("train it again", NOT_RECORDED, str(e)), sample]
    if cfg.preset not in PRESETS:
        return [Fact("train it again", NOT_RECORDED, f"preset {cfg.preset!r} is unknown to this ddpmkit"), sample]
    args = train_arguments(cfg)
    note = "the steps a --time-limit allows depend on the machine" if cfg.time_limit else ""
    if run.is_latent:
        note = "; ".join(filter(None, [note, f"--autoencoder as it was given; the run keeps its own copy in "
                                              f"{run.dir / 'autoencoder'}"]))
    return [Fact("train it again", "ddpmkit train " + shlex.join(args[:2] + ["--out", str(run.dir)] + args[2:]),
                 note), sample]


def _changed_from_defaults(cfg) -> list[str]:
    """The settings of ``cfg`` (a settings class without presets) that differ from the class's defaults, in the
    order of :func:`ddpmkit.train.settings.settings`."""
    from ..train.settings import settings as settings_of

    return [f.name for f, _ in settings_of(type(cfg)) if getattr(cfg, f.name) != f.default]


def _flags(cfg, names) -> list[str]:
    """Command-line arguments that set settings ``names`` of ``cfg`` (as ``train_arguments`` writes them)."""
    from ..train.settings import flag, show_value

    args = []
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool):
            args.append(flag(name) if v else flag(name).replace("--", "--no-", 1))
        else:  # repr: a float's shortest exact form
            args += [flag(name), repr(v) if isinstance(v, float) else show_value(v)]
    return args


def autoencoder_arguments(cfg) -> list[str]:
    """The ``ddpmkit autoencoder train`` arguments that give the AutoencoderConfig ``cfg`` again: one flag per
    setting that differs from AutoencoderConfig's defaults."""
    return _flags(cfg, _changed_from_defaults(cfg))


def _autoencoder_commands(run: Run) -> list[Fact]:
    """An autoencoder run's: train it again (or import it again), and train a diffusion model on its latents."""
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
    imported = run.config.get("imported_from")
    if isinstance(imported, dict):
        return [Fact("import it again", f"ddpmkit import-diffusers {shlex.quote(str(imported.get('source')))} "
                                        f"--out {out}"), nxt]
    from ..train.autoencoder_config import AutoencoderConfig

    try:
        cfg = AutoencoderConfig.from_json(run.config)
    except (DdpmkitError, TypeError) as e:
        return [Fact("train it again", NOT_RECORDED, str(e)), nxt]
    note = "the steps a --time-limit allows depend on the machine" if cfg.time_limit else ""
    again = "ddpmkit autoencoder train " + shlex.join(["--out", str(run.dir)] + autoencoder_arguments(cfg))
    return [Fact("train it again", again, note), nxt]


# ---------------------------------------------------------------------------------------------- settings
def settings_rows(config: dict) -> list[Setting]:
    """config.json's training settings: those that differ from the preset's first (in declaration order), then
    the rest by name; an autoencoder run's against AutoencoderConfig's defaults. A run without a ``train`` section
    (an imported one) has none."""
    from ..train.config import PRESETS, TrainConfig, changed_settings, preset_value

    stored = config.get("train")
    if not isinstance(stored, dict):
        return []
    if config.get("kind") == "autoencoder":
        return _autoencoder_settings_rows(config, stored)
    changed: list[str] = []
    try:
        cfg = TrainConfig.from_json(config)
        if cfg.preset in PRESETS:
            changed = changed_settings(cfg)
    except (DdpmkitError, TypeError):
        pass  # settings this ddpmkit cannot read: shown as stored, none marked
    first = [Setting(k, stored[k], preset_value(cfg.preset, k), True) for k in changed if k in stored]
    rest = [Setting(k, v) for k, v in sorted(stored.items()) if k not in changed]
    return first + rest


def _autoencoder_settings_rows(config: dict, stored: dict) -> list[Setting]:
    from ..train.autoencoder_config import AutoencoderConfig

    defaults = AutoencoderConfig.__dataclass_fields__
    changed: list[str] = []
    try:
        changed = _changed_from_defaults(AutoencoderConfig.from_json(config))
    except (DdpmkitError, TypeError):
        pass  # settings this ddpmkit cannot read: shown as stored, none marked
    first = [Setting(k, stored[k], defaults[k].default, True) for k in changed if k in stored]
    rest = [Setting(k, v) for k, v in sorted(stored.items()) if k not in changed]
    return first + rest
