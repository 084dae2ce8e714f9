"""The settings of a training run, each declared once: a :class:`TrainConfig` field with its default and its help.

Everything else is derived from the fields: the presets override them, the ``ddpmkit train`` flags and their
help are generated from them (``cli/train.py``), so are the run's ``config.json``, the U-Net's constructor arguments
(:meth:`TrainConfig.model_config`), the list of settings a resume may not change, docs/training.md's table of
settings (:func:`settings_table`, checked by a test) and the report's command that trains a run again
(:func:`train_arguments`).

The defaults are the ``digits`` preset. The U-Net's numbers are not written here: they come from
:data:`ddpmkit.models.UNET_PRESETS`, which the U-Net derives from its own constructor.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from .. import __version__
from ..diffusion import OBJECTIVES, VARIANCES, NoiseSchedule
from ..errors import CheckpointError, ConfigError
from ..limits import (MAX_BATCH, MAX_CHANNELS, MAX_GRID, MAX_IMAGE_SIZE, MAX_T, check_float, check_int,
                      check_model_config)
from ..models.unet import UNET_PRESETS

__all__ = ["TrainConfig", "PRESETS", "config_from_preset", "flag", "settings", "preset_value", "show_value",
           "settings_table", "resume_locked", "changed_settings", "train_arguments"]

_NET = UNET_PRESETS["digits"]  # the default architecture


def setting(default, help: str, *, locked: bool = False, unet: str | None = None, metavar: str | None = None):
    """A :class:`TrainConfig` field.

    help: the one-line meaning (the CLI's help and docs/training.md's table); locked: a resumed run may not change it
    (it would be a different run); unet: the U-Net constructor argument it sets; metavar: the CLI's value name.
    """
    meta = {"help": help, "locked": locked}
    if unet:
        meta["unet"] = unet
    if metavar:
        meta["metavar"] = metavar
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every setting of a training run. ``config.json`` of a run holds all of it."""

    preset: str = field(default="digits", metadata={"help": "starting configuration; every other setting "
                                                             "overrides it"})
    # data
    data: str = setting("digits", "data source: digits, cifar10, folder:PATH or a path to a folder of images",
                        locked=True)
    data_dir: str | None = setting(None, "folder that holds (or receives, with --download) cifar-10-batches-py "
                                         "or its archive", metavar="DIR")
    download: bool = setting(False, "download CIFAR-10 when it is absent")
    image_size: int = setting(_NET["image_size"], "image side in pixels", locked=True, unet="image_size")
    channels: int = setting(_NET["in_channels"], "image channels: 1 (grayscale) or 3 (RGB)", locked=True,
                            unet="in_channels")
    flip: bool = setting(False, "random horizontal flips", locked=True)
    strict: bool = setting(False, "fail on a corrupt image instead of skipping it")
    class_cond: bool = setting(False, "class-conditional: the network takes the data's class labels (digits, "
                                      "CIFAR-10, a folder of class subfolders), for --class and --guidance when "
                                      "sampling", locked=True)
    p_uncond: float = setting(0.1, "with --class-cond, the probability that a label is replaced by the null class "
                                   "in training (Ho & Salimans 2022), which classifier-free guidance needs")
    # model: the U-Net's constructor arguments
    base_channels: int = setting(_NET["base_channels"], "U-Net width of the first level", locked=True,
                                 unet="base_channels")
    channel_mults: tuple = setting(tuple(_NET["channel_mults"]), "U-Net width multipliers per level, "
                                   "comma-separated", locked=True, unet="channel_mults")
    num_res_blocks: int = setting(_NET["num_res_blocks"], "ResNet blocks per level", locked=True,
                                  unet="num_res_blocks")
    attention_resolutions: tuple = setting(tuple(_NET["attention_resolutions"]), "feature-map sides with "
                                           "self-attention, comma-separated (empty: none)", locked=True,
                                           unet="attention_resolutions")
    dropout: float = setting(_NET["dropout"], "dropout rate in the ResNet blocks", unet="dropout")
    num_groups: int = setting(_NET["num_groups"], "GroupNorm groups", locked=True, unet="num_groups")
    num_heads: int = setting(_NET["num_heads"], "attention heads", locked=True, unet="num_heads")
    # diffusion
    schedule: str = setting("linear", "noise schedule: linear or cosine", locked=True)
    T: int = setting(1000, "number of diffusion steps", locked=True)
    objective: str = setting("eps", "what the network predicts: eps, x0 or v", locked=True)
    learn_sigma: bool = setting(False, "learn the reverse variance (Improved DDPM): the network has twice the image "
                                       "channels and trains on L_hybrid = L_simple + 0.001 L_vlb; the run's variance "
                                       "is then learned", locked=True)
    vlb_only: bool = setting(False, "with --learn-sigma: train on L_vlb alone, the bound, instead of L_hybrid "
                                    "(Improved DDPM sec. 3.3; for the lowest bits/dim, best with "
                                    "--timestep-sampler loss-second-moment)")
    timestep_sampler: str = setting("uniform", "how training draws t: uniform, or loss-second-moment (importance "
                                               "sampling by sqrt(E[L_t^2]) over the last 10 losses of each t, "
                                               "Improved DDPM sec. 3.3)")
    loss_weight: str = setting("none", "per-timestep weight of the loss: none, or min-snr (Min-SNR-gamma, Hang et al. "
                                       "2023: min(SNR, gamma)/SNR for eps, min(SNR, gamma)/(SNR+1) for v)")
    min_snr_gamma: float = setting(5.0, "gamma of --loss-weight min-snr")
    variance: str = setting("small", "the reverse-process variance the run is made for, small (beta_tilde), "
                                     "large (beta, the official CIFAR-10 fixedlarge), learned (with --learn-sigma) "
                                     "or analytic (Analytic-DPM, after `eval variance`); sampling and the bound "
                                     "default to it")
    # optimisation
    steps: int = setting(5000, "training steps")
    time_limit: float | None = setting(None, "stop after this many seconds of training (the run can be resumed)",
                                       metavar="SECONDS")
    batch_size: int = setting(128, "images per optimizer step: the global batch, over all processes and "
                                  "micro-batches", locked=True)
    grad_accum: int = setting(1, "split each process's share of the batch into this many micro-batches, one "
                                 "forward and backward each, before one optimizer step: less memory, the same "
                                 "result")
    lr: float = setting(2e-3, "Adam learning rate")
    warmup: int = setting(100, "linear learning-rate warm-up, in steps")
    lr_decay: str = setting("cosine", "learning-rate decay after the warm-up: none, or cosine (to 0 at --steps, or at "
                                    "--time-limit when that comes first)")
    grad_clip: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.999, "Adam beta2")
    weight_decay: float = setting(0.0, "Adam weight decay")
    ema_decay: float = setting(0.999, "EMA decay of the weights")
    ema_warmup: bool = setting(True, "warm the EMA decay up as min(decay, (1+n)/(10+n))")
    # bookkeeping
    seed: int = setting(0, "random seed of the run", locked=True)
    log_every: int = setting(25, "write a metrics.csv row every N steps")
    checkpoint_every: int = setting(500, "save a checkpoint every N steps (and at the end)")
    sample_every: int = setting(1000, "save a sample grid from the EMA weights every N steps (and at the end)")
    num_samples: int = setting(64, "images in each sample grid")
    sample_sampler: str = setting("ddim", "sampler of the sample grids: any of `ddpmkit sample --help`'s")
    sample_steps: int = setting(50, "steps of that sampler for the sample grids")
    eval_every: int = setting(0, "every N steps (and at the end) draw --eval-n samples from the EMA weights and log "
                                 "their Frechet distance to metrics.csv (0: never)")
    eval_n: int = setting(200, "samples of each --eval-every measurement")
    eval_sampler: str = setting("dpmpp-2m", "sampler of the --eval-every samples")
    eval_steps: int = setting(10, "steps of that sampler")
    keep: int = setting(3, "checkpoints to keep")
    skip_nonfinite: bool = setting(False, "skip a step whose loss or gradient norm is NaN, inf or above 1e6, "
                                          "instead of stopping")
    # hardware
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA), fp32 or bf16")
    compile: bool = setting(False, "torch.compile the model")

    def model_config(self, num_classes: int | None = None) -> dict:
        """The U-Net's constructor arguments (config.json's ``model`` section).

        With ``class_cond``, the class embedding has ``num_classes + 1`` rows: the data's classes and, last, the
        null class of classifier-free guidance (``num_classes`` defaults to 10, enough to check the settings).
        """
        cfg = {f.metadata["unet"]: _json_value(getattr(self, f.name))
               for f in dataclasses.fields(self) if "unet" in f.metadata}
        cfg["out_channels"] = 2 * self.channels if self.learn_sigma else None  # learn_sigma: Improved DDPM's 2C outputs
        if self.class_cond:
            cfg["num_class_embeds"] = (10 if num_classes is None else int(num_classes)) + 1
        return cfg

    def to_json(self, class_names=None) -> dict:
        """The run's config.json: the flat settings plus the sections that loaders read.

        A class-conditional run also records its classes: ``classes = {"names": [...], "null": K}``, label k
        named ``names[k]`` and K the null class's label.
        """
        extra = {}
        if self.class_cond and class_names is not None:
            extra["classes"] = {"names": [str(c) for c in class_names], "null": len(class_names)}
        return {
            "format": "ddpmkit-run",
            "version": 1,
            "ddpmkit_version": __version__,
            "train": {k: _json_value(v) for k, v in dataclasses.asdict(self).items()},
            "model": self.model_config(None if class_names is None else len(class_names)),
            "diffusion": {"schedule": self.schedule, "T": self.T, "objective": self.objective,
                          "variance": self.variance},
            "data": {"source": self.data, "image_size": self.image_size, "channels": self.channels},
            **extra,
        }

    @classmethod
    def from_json(cls, cfg: dict) -> "TrainConfig":
        """The settings of a config.json; a setting it lacks (written before the setting existed) takes its
        default."""
        if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict):
            raise CheckpointError("config.json has no 'train' section: not a ddpmkit training run")
        stored = cfg["train"]
        d = {}
        for f in dataclasses.fields(cls):
            if f.name in stored:
                v = stored[f.name]
                d[f.name] = tuple(v) if isinstance(f.default, tuple) and isinstance(v, list) else v
        return cls(**d)

    def validate(self) -> None:
        def positive_int(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{flag(name)} must be a positive integer, got {v!r}")

        for name in ["image_size", "channels", "T", "steps", "batch_size", "grad_accum", "log_every",
                     "checkpoint_every", "sample_every", "keep", "sample_steps"]:
            positive_int(name)
        # upper bounds before anything is allocated (ddpmkit/limits.py): a config.json or a flag of 2^40 is one line
        for name, hi in (("T", MAX_T), ("batch_size", MAX_BATCH), ("channels", MAX_CHANNELS),
                         ("image_size", MAX_IMAGE_SIZE)):
            check_int(flag(name), getattr(self, name), 1, hi)
        check_int("--num-samples", self.num_samples, 0, MAX_GRID)
        for name, lo, hi, hi_open in (("grad_clip", 0, 1e12, False), ("adam_beta1", 0, 1, True),
                                      ("adam_beta2", 0, 1, True), ("weight_decay", 0, 1e6, False),
                                      ("dropout", 0, 1, True)):
            check_float(flag(name), getattr(self, name), lo, hi, hi_open=hi_open)
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}: choose {' or '.join(VARIANCES)}")
        if (self.variance == "learned") != bool(self.learn_sigma):
            raise ConfigError("--variance learned goes with --learn-sigma, and a --learn-sigma run's variance is "
                              f"learned (got --variance {self.variance}"
                              f"{' with' if self.learn_sigma else ' without'} --learn-sigma)")
        if self.vlb_only and not self.learn_sigma:
            raise ConfigError("--vlb-only trains a learned variance on the bound: it needs --learn-sigma")
        if self.vlb_only and self.loss_weight != "none":
            raise ConfigError(f"--vlb-only trains on the bound itself: it takes no --loss-weight (got "
                              f"{self.loss_weight})")
        from ..diffusion.losses import TIMESTEP_SAMPLERS

        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ConfigError(f"unknown --timestep-sampler {self.timestep_sampler!r}: choose one of "
                              f"{', '.join(TIMESTEP_SAMPLERS)}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if not (isinstance(self.p_uncond, (int, float)) and 0.0 <= self.p_uncond < 1.0):
            raise ConfigError(f"--p-uncond must lie in [0, 1), got {self.p_uncond}")
        if self.time_limit is not None and not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise ConfigError(f"--time-limit must be a positive number of seconds, got {self.time_limit}")
        from ..diffusion.losses import LOSS_WEIGHTS

        if self.loss_weight not in LOSS_WEIGHTS:
            raise ConfigError(f"unknown --loss-weight {self.loss_weight!r}: choose one of {', '.join(LOSS_WEIGHTS)}")
        if check_float("--min-snr-gamma", self.min_snr_gamma, 0, 1e6) <= 0:
            raise ConfigError(f"--min-snr-gamma must be positive, got {self.min_snr_gamma}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"unknown --lr-decay {self.lr_decay!r}: choose none or cosine")
        check_int("--eval-every", self.eval_every, 0, 10**12)
        check_int("--eval-n", self.eval_n, 2, MAX_GRID)
        check_int("--eval-steps", self.eval_steps, 1, self.T)
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose linear or cosine")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}: choose auto, fp32 or bf16")
        if self.sample_steps > self.T:
            raise ConfigError(f"--sample-steps {self.sample_steps} exceeds T = {self.T}")
        from ..samplers import SAMPLERS, sampler_names

        if self.sample_sampler not in SAMPLERS:
            raise ConfigError(f"unknown --sample-sampler {self.sample_sampler!r}: choose one of "
                              f"{', '.join(sampler_names())}")
        if self.eval_sampler not in SAMPLERS:
            raise ConfigError(f"unknown --eval-sampler {self.eval_sampler!r}: choose one of "
                              f"{', '.join(sampler_names())}")
        try:
            NoiseSchedule.from_name(self.schedule, self.T)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        # the U-Net built on the meta device (no memory): its own checks, and its size against MAX_PARAMETERS
        check_model_config(self.model_config(), "the U-Net of these settings")


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def _net_settings(net: dict) -> dict:
    """The TrainConfig fields that a U-Net configuration (an entry of UNET_PRESETS) sets."""
    return {f.name: tuple(net[f.metadata["unet"]]) if isinstance(f.default, tuple) else net[f.metadata["unet"]]
            for f in dataclasses.fields(TrainConfig) if "unet" in f.metadata}


# What each preset changes in the field defaults. digits: the defaults (a small CPU configuration, the best of the
# recipe search of bench/bench_demo_recipe.py: 8x8, batch 128, cosine decay, EMA 0.999);
# cifar10: the paper's setup (DDPM section 4 and appendix B), its U-Net from UNET_PRESETS.
PRESETS: dict[str, dict] = {
    "digits": {},
    "cifar10": dict(
        _net_settings(UNET_PRESETS["cifar10"]), data="cifar10", flip=True, variance="large",
        steps=800_000, batch_size=128, lr=2e-4, warmup=5000, lr_decay="none", ema_decay=0.9999,
        log_every=100, checkpoint_every=10_000, sample_every=10_000, sample_steps=100,
    ),
}


def config_from_preset(preset: str, **overrides) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with any field overridden (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"unknown configuration field(s): {', '.join(bad)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
    if values.get("learn_sigma") and overrides.get("variance") is None:
        values["variance"] = "learned"  # the variance a --learn-sigma run is made for
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, tuple):
            values[f.name] = tuple(values.get(f.name, f.default))
    return TrainConfig(**values)


def resume_locked() -> tuple[str, ...]:
    """The settings whose change makes a resumed run a different run; everything else may change on resume."""
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("locked"))


# ------------------------------------------------------------------------------ derived views of the fields
def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def settings() -> list[tuple[dataclasses.Field, type]]:
    """Every setting but ``preset``, with the type of its values (``X`` for ``X | None``), in field order."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "preset":
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        out.append((f, args[0] if args else kind))
    return out


def preset_value(preset: str, name: str):
    """The value of setting ``name`` in ``preset``."""
    return PRESETS[preset].get(name, TrainConfig.__dataclass_fields__[name].default)


def show_value(v) -> str:
    """A setting's value as the CLI help and docs/training.md write it."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def changed_settings(cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` whose value differs from its preset's, in field order."""
    return [f.name for f, _ in settings() if getattr(cfg, f.name) != preset_value(cfg.preset, f.name)]


def train_arguments(cfg: TrainConfig) -> list[str]:
    """The ``ddpmkit train`` arguments that give ``cfg`` again: ``--preset P`` and one flag per changed setting."""
    args = ["--preset", cfg.preset]
    for name in changed_settings(cfg):
        v = getattr(cfg, name)
        if isinstance(v, bool):
            args.append(flag(name) if v else flag(name).replace("--", "--no-", 1))
        else:  # repr: a float's shortest exact form (2e-05, not show_value's rounded %g)
            args += [flag(name), repr(v) if isinstance(v, float) else show_value(v)]
    return args


def describe_default(name: str) -> str:
    """``default: X``, or ``default: digits X, cifar10 Y`` when the presets differ."""
    values = {p: show_value(preset_value(p, name)) for p in PRESETS}
    if len(set(values.values())) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default: " + ", ".join(f"{p} {v}" for p, v in values.items())


def settings_table() -> str:
    """docs/training.md's table of the training settings: one row per setting, a column per preset."""
    presets = list(PRESETS)
    lines = ["| flag | meaning | " + " | ".join(f"`{p}`" for p in presets) + " |",
             "| --- | --- |" + " --- |" * len(presets)]
    for f, kind in settings():
        name = flag(f.name).replace("--", "--[no-]", 1) if kind is bool else flag(f.name)
        name = f"`{name}{' ' + f.metadata['metavar'] if 'metavar' in f.metadata else ''}`"
        name += " *" if f.metadata.get("locked") else ""
        values = [show_value(preset_value(p, f.name)) for p in presets]
        lines.append(f"| {name} | {f.metadata['help'].replace('|', '/')} | " + " | ".join(values) + " |")
    lines += ["", "\\* fixed for the life of a run: `--resume` refuses a change."]
    return "\n".join(lines) + "\n"
