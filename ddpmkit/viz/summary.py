"""What a person opens a run's report for, read from the run's own files: what was trained, for how long, how good
it is, one grid of samples, the commands that train it again and sample from it, and its settings with those that
differ from the preset's first.

Reading only; ``report.py`` writes the page. Each number says the file (and setting) it comes from; what a run
does not record is said to be "not recorded", never guessed.

Three kinds of run: a diffusion run on pixels; a latent diffusion run (config.json's ``latent`` section: the U-Net
works on an autoencoder's scaled latents, its samples are decoded); and an autoencoder run (``"kind":
"autoencoder"``), whose summary is its reconstructions, their held-out PSNR and Frechet distance, and the command
that trains a diffusion model on its latents. This module reads the diffusion runs' facts and hands an autoencoder
run to ``summary_autoencoder.py``; what both share is in ``summary_common.py``.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
from functools import partial
from pathlib import Path

from ..errors import DdpmkitError
from ..run import Run
from .summary_autoencoder import autoencoder_settings_rows, autoencoder_shape, summarize_autoencoder
from .summary_common import (NOT_RECORDED, Fact, Setting, Summary, changed_first, data_fact, feature_network, figure,
                             frechet_shown, last_measured, metrics_of, numbers, plural, time_limit_note, train_again,
                             trainer_grids, training)

__all__ = ["Fact", "Setting", "Summary", "summarize", "settings_rows", "space", "figure", "frechet_fact", "bpd_fact",
           "memorization_fact", "sample_grids", "summary_grid", "LATENT_BPD", "NOT_RECORDED"]


def summarize(run_dir, config: dict) -> Summary:
    """The summary of the run in ``run_dir`` whose config.json is ``config``."""
    run = Run(run_dir, config)
    metrics, why = metrics_of(run.dir)
    if run.kind == "autoencoder":
        return summarize_autoencoder(run, metrics, why)
    grid, caption = summary_grid(run)
    return Summary(model=_model(run), training=training(run, metrics, why), quality=_quality(run, metrics),
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


def _model(run: Run) -> list[Fact]:
    return _model_facts(run) + _distilled_facts(run)


def _distilled_facts(run: Run) -> list[Fact]:
    """A distilled student's origin and how it draws (config.json's ``distill`` section)."""
    d = run.distilled
    if d is None:
        return []
    how = run.sampling_defaults()
    w = run.distilled_guidance
    made = (f"progressive, {d.get('teacher_steps')} teacher DDIM steps halved to {d.get('steps')}"
            if d.get("method") == "progressive" else f"{d.get('method')} distillation")
    return [Fact("distilled from", str(d.get("teacher")), f"config.json distill: {made}"),
            Fact("draws with", f"{how['sampler']}, {plural(how['steps'], 'step')}, {how['spacing']} timesteps"
                 + (f", guided at w = {w:g} in one call per step" if w is not None else ""),
                 "config.json distill: the sampler `ddpmkit sample` uses by default")]


def _model_facts(run: Run) -> list[Fact]:
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
        return [data_fact(config),
                Fact("image", f"{h}x{w}, {plural(c, 'channel')}", "decoded by the autoencoder (config.json "
                                                                   "latent.image_shape)"),
                Fact("parameters", f"{params:,}", "U-Net of config.json, on the latents (the autoencoder's apart)"),
                cond, Fact("space", space(config), "diffusion on the scaled latents of a frozen autoencoder"),
                *_latent_facts(run)]
    return [data_fact(config), Fact("image", f"{h}x{w}, {plural(c, 'channel')}", "config.json model"),
            Fact("parameters", f"{params:,}", "U-Net of config.json"), cond,
            Fact("space", space(config), "diffusion on the images themselves")]


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
        f", shift {numbers(shift)}"
    std = section.get("latent_std")
    std = f"; the scaled latents' std {std:.3f}" if isinstance(std, (int, float)) else ""
    return [Fact("autoencoder", str(ae_path) if ae_path is not None else NOT_RECORDED,
                 f"config.json latent.autoencoder, as given to --autoencoder; the run's own copy: "
                 f"{copy.name}/{params}"),
            Fact("latents", f"{c}x{h}x{w}" + (f", f = {f}" if f else ""),
                 "config.json latent.shape: C x H/f x W/f"),
            Fact("scale", numbers(section.get("scale")) + shift_s,
                 f"z = (mean - shift) x scale; {where} (latent.scale_source){std}")]


# ---------------------------------------------------------------------------------------------- how good
def _quality(run: Run, metrics: dict | None) -> list[Fact]:
    return [frechet_fact(run, metrics), bpd_fact(run.dir, run.is_latent), memorization_fact(run.dir)]


def frechet_fact(run: Run, metrics: dict | None) -> Fact:
    """The latest --eval-every Frechet distance in metrics.csv (metrics/quality.py)."""
    train = run.config.get("train", {})
    i = last_measured(metrics, "fd")
    if i is None:
        return Fact("Frechet distance", NOT_RECORDED, "train with --eval-every N to measure it as the run goes")
    n = train.get("eval_n")
    how = (f"{n} samples (--eval-n), " if n else "") + f"{train.get('eval_sampler')} {train.get('eval_steps')} steps"
    return Fact("Frechet distance", frechet_shown(metrics, i),
                f"metrics.csv fd at step {int(metrics['step'][i]):,}: {how}, {feature_network(train)} features; "
                f"lower is better")


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


# ---------------------------------------------------------------------------------------------- commands
def _commands(run: Run) -> list[Fact]:
    """A diffusion run's: train it again (or import it again), and sample from it."""
    from ..train.config import TrainConfig

    sample = Fact("sample from it", f"ddpmkit sample {shlex.quote(str(run.dir))}",
                  "every class in turn, one row each; --class C for one" if run.class_cond else "")
    return [train_again(run, TrainConfig.from_json, partial(_train_again, run)), sample]


def _train_again(run: Run, cfg) -> Fact:
    from ..train.config import PRESETS, train_arguments

    if cfg.preset not in PRESETS:
        return Fact("train it again", NOT_RECORDED, f"preset {cfg.preset!r} is unknown to this ddpmkit")
    args = train_arguments(cfg)
    note = time_limit_note(cfg)
    if run.is_latent:
        note = "; ".join(filter(None, [note, f"--autoencoder as it was given; the run keeps its own copy in "
                                              f"{run.dir / 'autoencoder'}"]))
    return Fact("train it again", "ddpmkit train " + shlex.join(args[:2] + ["--out", str(run.dir)] + args[2:]), note)


# ---------------------------------------------------------------------------------------------- settings
def settings_rows(config: dict) -> list[Setting]:
    """config.json's training settings: those that differ from the preset's first (in declaration order), then
    the rest by name; an autoencoder run's against AutoencoderConfig's defaults. A run without a ``train`` section
    (an imported one) has none."""
    from ..train.config import PRESETS, TrainConfig, changed_settings, preset_value

    if config.get("kind") == "autoencoder":
        return autoencoder_settings_rows(config)
    stored = config.get("train")
    if not isinstance(stored, dict):
        return []
    changed: list[str] = []
    preset = None
    try:
        cfg = TrainConfig.from_json(config)
        if cfg.preset in PRESETS:
            changed, preset = changed_settings(cfg), cfg.preset
    except (DdpmkitError, TypeError):
        pass  # settings this ddpmkit cannot read: shown as stored, none marked
    return changed_first(stored, changed, partial(preset_value, preset))
