"""The settings every trained run shares, each declared once: its data (:class:`DataSettings`) and the training
loop's (:class:`LoopSettings`). A task's own settings class inherits both and adds its own fields
(:class:`ddpmkit.train.config.TrainConfig` for the diffusion model, :class:`ddpmkit.train.autoencoder_config.
AutoencoderConfig` for the autoencoder); the command-line flags, config.json, the docs' tables and the resume check
are derived from the fields of whichever class (:func:`settings`, :func:`flag`, :func:`locked_settings`), and so is
the command that gives a run's settings again (:func:`changed_arguments`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from ..errors import CheckpointError, ConfigError
from ..limits import MAX_BATCH, MAX_CHANNELS, MAX_IMAGE_SIZE, check_float, check_int

__all__ = ["setting", "default_of", "DataSettings", "LoopSettings", "flag", "settings", "show_value",
           "locked_settings", "positive_int", "settings_from_json", "changed_names", "changed_arguments",
           "class_default", "settings_table"]


def setting(default, help: str, *, locked: bool = False, unet: str | None = None, metavar: str | None = None,
            repeat: bool = False):
    """A settings field.

    help: the one-line meaning (the CLI's help and the docs' tables); locked: a resumed run may not change it
    (it would be a different run); unet: the U-Net constructor argument it sets; metavar: the CLI's value name;
    repeat: a tuple of words whose flag may be given again to add one (``--log a --log b``; ``--log none``: empty).
    """
    meta = {"help": help, "locked": locked}
    if unet:
        meta["unet"] = unet
    if metavar:
        meta["metavar"] = metavar
    if repeat:
        meta["repeat"] = True
    return field(default=default, metadata=meta)


def default_of(base, name: str, default, help: str | None = None):
    """Field ``name`` of settings class ``base`` with another default (and help), for a subclass that redeclares it."""
    meta = dict(base.__dataclass_fields__[name].metadata)
    if help is not None:
        meta["help"] = help
    return field(default=default, metadata=meta)


def positive_int(cfg, name: str) -> None:
    """ConfigError unless setting ``name`` of ``cfg`` is an integer >= 1."""
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{flag(name)} must be a positive integer, got {v!r}")


@dataclass
class LoopSettings:
    """What the training loop (:class:`ddpmkit.train.loop.TrainingLoop`) reads: steps, optimizers, EMA,
    checkpoints, metrics, hardware. The defaults are the digits diffusion run's."""

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
    # not locked: where a run's numbers are shown does not change the run, so a resume may add or drop a backend
    log: tuple = setting((), "also log each metrics.csv row, the sample grids and the settings to tensorboard "
                             "(RUN/tensorboard) or wandb (RUN/wandb); give it again for both, none for neither "
                             "(metrics.csv is always written)", metavar="BACKEND", repeat=True)
    checkpoint_every: int = setting(500, "save a checkpoint every N steps (and at the end)")
    sample_every: int = setting(1000, "save a sample grid from the EMA weights every N steps (and at the end)")
    eval_every: int = setting(0, "every N steps (and at the end) draw --eval-n samples from the EMA weights and log "
                                 "their Frechet distance to metrics.csv (0: never)")
    keep: int = setting(3, "checkpoints to keep")
    skip_nonfinite: bool = setting(False, "skip a step whose loss or gradient norm is NaN, inf or above 1e6, "
                                          "instead of stopping")
    # hardware
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str = setting("auto", "auto (bf16 autocast on CUDA), fp32 or bf16")
    compile: bool = setting(False, "torch.compile the model")

    def validate_loop(self) -> None:
        """ConfigError (one line, naming the flag) for a loop setting out of its range."""
        for name in ["steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "sample_every", "keep"]:
            positive_int(self, name)
        check_int(flag("batch_size"), self.batch_size, 1, MAX_BATCH)
        for name, lo, hi, hi_open in (("grad_clip", 0, 1e12, False), ("adam_beta1", 0, 1, True),
                                      ("adam_beta2", 0, 1, True), ("weight_decay", 0, 1e6, False)):
            check_float(flag(name), getattr(self, name), lo, hi, hi_open=hi_open)
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema-decay must lie in [0, 1), got {self.ema_decay}")
        if self.time_limit is not None and not (self.time_limit > 0 and math.isfinite(self.time_limit)):
            raise ConfigError(f"--time-limit must be a positive number of seconds, got {self.time_limit}")
        if self.lr_decay not in ("none", "cosine"):
            raise ConfigError(f"unknown --lr-decay {self.lr_decay!r}: choose none or cosine")
        check_int("--eval-every", self.eval_every, 0, 10**12)
        from .loggers import check_names

        check_names(self.log)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"unknown precision {self.precision!r}: choose auto, fp32 or bf16")


@dataclass
class DataSettings:
    """The images a run trains on (:func:`ddpmkit.data.load_dataset`'s arguments)."""

    data: str = setting("digits", "data source: digits, cifar10, folder:PATH or a path to a folder of images",
                        locked=True)
    data_dir: str | None = setting(None, "folder that holds (or receives, with --download) cifar-10-batches-py "
                                         "or its archive", metavar="DIR")
    download: bool = setting(False, "download CIFAR-10 when it is absent")
    image_size: int = setting(8, "image side in pixels", locked=True, unet="image_size")
    channels: int = setting(1, "image channels: 1 (grayscale) or 3 (RGB)", locked=True, unet="in_channels")
    flip: bool = setting(False, "random horizontal flips", locked=True)
    strict: bool = setting(False, "fail on a corrupt image instead of skipping it")

    def validate_data(self) -> None:
        for name, hi in (("image_size", MAX_IMAGE_SIZE), ("channels", MAX_CHANNELS)):
            positive_int(self, name)
            check_int(flag(name), getattr(self, name), 1, hi)


def settings_from_json(cls, cfg: dict):
    """The settings of class ``cls`` in a config.json's ``train`` section; a setting it lacks (written before the
    setting existed) takes its default."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict):
        raise CheckpointError("config.json has no 'train' section: not a ddpmkit training run")
    stored = cfg["train"]
    d = {}
    for f in dataclasses.fields(cls):
        if f.name in stored:
            v = stored[f.name]
            d[f.name] = tuple(v) if isinstance(f.default, tuple) and isinstance(v, list) else v
    return cls(**d)


# ------------------------------------------------------------------------------ derived views of the fields
def flag(name: str) -> str:
    """The command-line flag of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def settings(cls) -> list[tuple[dataclasses.Field, type]]:
    """Every setting of ``cls`` but ``preset``, with the type of its values (``X`` for ``X | None``): the data's
    first, then the task's own, then the loop's, each in declaration order."""
    hints = typing.get_type_hints(cls)

    def group(f) -> int:
        if f.name in DataSettings.__dataclass_fields__:
            return 0
        return 2 if f.name in LoopSettings.__dataclass_fields__ else 1

    out = []
    for f in sorted(dataclasses.fields(cls), key=group):  # a stable sort: each group keeps its order
        if f.name == "preset":
            continue
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        out.append((f, args[0] if args else kind))
    return out


def locked_settings(cls) -> tuple[str, ...]:
    """The settings whose change makes a resumed run a different run; everything else may change on resume."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("locked"))


def show_value(v) -> str:
    """A setting's value as the CLI help and the docs write it."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if v is None:
        return "none"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def class_default(cls):
    """The default of each setting of ``cls``: ``class_default(cls)(name)``, for a class without presets."""
    return lambda name: cls.__dataclass_fields__[name].default


def changed_names(cfg, default) -> list[str]:
    """The settings of ``cfg`` whose value differs from ``default(name)``, in the order of :func:`settings`."""
    return [f.name for f, _ in settings(type(cfg)) if getattr(cfg, f.name) != default(f.name)]


def changed_arguments(cfg, default) -> list[str]:
    """The command-line arguments that give ``cfg`` again from the settings ``default(name)``: one flag per
    setting that differs (:func:`changed_names`), a boolean as ``--x`` or ``--no-x``, a float by its repr (its
    shortest exact form: 2e-05, not :func:`show_value`'s rounded %g), a tuple comma-joined, a repeated setting's
    words one flag each (``--log none`` when it has none)."""
    args = []
    for name in changed_names(cfg, default):
        v = getattr(cfg, name)
        if type(cfg).__dataclass_fields__[name].metadata.get("repeat"):
            args += [a for w in (v or ("none",)) for a in (flag(name), w)]
        elif isinstance(v, bool):
            args.append(flag(name) if v else flag(name).replace("--", "--no-", 1))
        else:
            args += [flag(name), repr(v) if isinstance(v, float) else show_value(v)]
    return args


def settings_table(cls, columns: dict) -> str:
    """A docs table of the settings of ``cls``: one row per setting (its flag, marked * when a resume may not change
    it, and its help), then one column per entry of ``columns``: header -> the value of a setting by name."""
    lines = ["| flag | meaning | " + " | ".join(columns) + " |", "| --- | --- |" + " --- |" * len(columns)]
    for f, kind in settings(cls):
        name = flag(f.name).replace("--", "--[no-]", 1) if kind is bool else flag(f.name)
        name = f"`{name}{' ' + f.metadata['metavar'] if 'metavar' in f.metadata else ''}`"
        name += " *" if f.metadata.get("locked") else ""
        values = [show_value(value_of(f.name)) for value_of in columns.values()]
        lines.append(f"| {name} | {f.metadata['help'].replace('|', '/')} | " + " | ".join(values) + " |")
    lines += ["", "\\* fixed for the life of a run: `--resume` refuses a change."]
    return "\n".join(lines) + "\n"
