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
from dataclasses import dataclass, field
from functools import partial

from .. import __version__
from ..diffusion import OBJECTIVES, VARIANCES, NoiseSchedule
from ..errors import ConfigError
from ..limits import MAX_GRID, MAX_T, check_float, check_int, check_model_config
from ..models.unet import UNET_PRESETS
from .settings import (DataSettings, LoopSettings, changed_arguments, changed_names, default_of, flag,
                       locked_settings, positive_int, setting, settings_from_json, show_value)
from .settings import settings as settings_of
from .settings import settings_table as table_of

__all__ = ["TrainConfig", "PRESETS", "config_from_preset", "flag", "settings", "preset_value", "show_value",
           "settings_table", "resume_locked", "changed_settings", "train_arguments"]

_NET = UNET_PRESETS["digits"]  # the default architecture

PRECONDS = ("none", "edm")  # --precond: the network as it is, or EDM's preconditioning (ddpmkit.diffusion.precond)


@dataclass
class TrainConfig(DataSettings, LoopSettings):
    """Every setting of a diffusion training run: the data's and the loop's (:mod:`.settings`) and the diffusion
    model's. ``config.json`` of a run holds all of it."""

    preset: str = field(default="digits", metadata={"help": "starting configuration; every other setting "
                                                             "overrides it"})
    # data (the rest in DataSettings)
    image_size: int = default_of(DataSettings, "image_size", _NET["image_size"])
    channels: int = default_of(DataSettings, "channels", _NET["in_channels"])
    autoencoder: str | None = setting(None, "latent diffusion: train in the latent space of this autoencoder run "
                                            "(`ddpmkit autoencoder train`, or an imported diffusers VAE); the "
                                            "U-Net's settings then describe the latent grid", locked=True,
                                      metavar="RUN")
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
    precond: str = setting("none", "parameterisation of the network: none, or edm (EDM's preconditioning, Karras et "
                                   "al. 2022: the network is EDM's denoiser D of the noise level sigma(t), trained "
                                   "on EDM's loss at log-normal noise levels; objective x0)", locked=True)
    # not `sigma_data`: DistillConfig (a TrainConfig) has a field of that name, consistency distillation's own
    edm_sigma_data: float = setting(0.5, "with --precond edm, the data's standard deviation sigma_data of EDM's "
                                         "preconditioning and loss weight", locked=True)
    p_mean: float = setting(-1.2, "with --precond edm, the mean P_mean of EDM's training noise levels, "
                                  "ln(sigma) ~ N(P_mean, P_std^2)", locked=True)
    p_std: float = setting(1.2, "with --precond edm, the standard deviation P_std of ln(sigma) in training",
                           locked=True)
    variance: str = setting("small", "the reverse-process variance the run is made for, small (beta_tilde), "
                                     "large (beta, the official CIFAR-10 fixedlarge), learned (with --learn-sigma) "
                                     "or analytic (Analytic-DPM, after `eval variance`); sampling and the bound "
                                     "default to it")
    # sample grids and --eval-every (when: LoopSettings' sample_every and eval_every)
    num_samples: int = setting(64, "images in each sample grid")
    sample_sampler: str = setting("ddim", "sampler of the sample grids: any of `ddpmkit sample --help`'s")
    sample_steps: int = setting(50, "steps of that sampler for the sample grids")
    eval_n: int = setting(200, "samples of each --eval-every measurement")
    eval_sampler: str = setting("dpmpp-2m", "sampler of the --eval-every samples")
    eval_steps: int = setting(10, "steps of that sampler")

    def model_config(self, num_classes: int | None = None, latent_shape=None) -> dict:
        """The U-Net's constructor arguments (config.json's ``model`` section).

        With ``class_cond``, the class embedding has ``num_classes + 1`` rows: the data's classes and, last, the
        null class of classifier-free guidance (``num_classes`` defaults to 10, enough to check the settings).
        A latent run's U-Net takes the latents' (C, h, w) ``latent_shape`` instead of the images'.
        """
        cfg = {f.metadata["unet"]: _json_value(getattr(self, f.name))
               for f in dataclasses.fields(self) if "unet" in f.metadata}
        if latent_shape is not None:
            cfg["in_channels"], cfg["image_size"] = int(latent_shape[0]), int(latent_shape[1])
        c = cfg["in_channels"]
        cfg["out_channels"] = 2 * c if self.learn_sigma else None  # learn_sigma: Improved DDPM's 2C outputs
        if self.class_cond:
            cfg["num_class_embeds"] = (10 if num_classes is None else int(num_classes)) + 1
        return cfg

    def to_json(self, class_names=None, latent: dict | None = None) -> dict:
        """The run's config.json: the flat settings plus the sections that loaders read.

        A class-conditional run also records its classes: ``classes = {"names": [...], "null": K}``, label k
        named ``names[k]`` and K the null class's label. A latent run records its ``latent`` section
        (:meth:`ddpmkit.latent.LatentSpace.section`, with the latents' ``shape``): its model is the latents'.
        """
        extra = {}
        if self.class_cond and class_names is not None:
            extra["classes"] = {"names": [str(c) for c in class_names], "null": len(class_names)}
        if latent is not None:
            extra["latent"] = latent
        return {
            "format": "ddpmkit-run",
            "version": 1,
            "ddpmkit_version": __version__,
            "train": {k: _json_value(v) for k, v in dataclasses.asdict(self).items()},
            "model": self.model_config(None if class_names is None else len(class_names),
                                       None if latent is None else latent["shape"]),
            "diffusion": {"schedule": self.schedule, "T": self.T, "objective": self.objective,
                          "variance": self.variance, **self._precond_section()},
            "data": {"source": self.data, "image_size": self.image_size, "channels": self.channels},
            **extra,
        }

    @property
    def precond_sigma_data(self) -> float | None:
        """EDM's sigma_data of a ``--precond edm`` run, what ``Denoiser(precond=...)`` takes; None otherwise."""
        return self.edm_sigma_data if self.precond == "edm" else None

    def _precond_section(self) -> dict:
        """config.json's ``diffusion.precond`` of an EDM run (what ``Run.denoiser`` reads); nothing otherwise."""
        if self.precond_sigma_data is None:
            return {}
        return {"precond": {"kind": self.precond, "sigma_data": self.precond_sigma_data}}

    @classmethod
    def from_json(cls, cfg: dict) -> "TrainConfig":
        """The settings of a config.json; a setting it lacks (written before the setting existed) takes its
        default."""
        return settings_from_json(cls, cfg)

    def validate(self) -> None:
        if self.data is None:  # a preset for the user's own folder of images (folder64, lsun256, ...)
            raise ConfigError(f"the {self.preset} preset trains on a folder of your images: give it with --data DIR")
        self.validate_data()
        self.validate_loop()
        for name in ["T", "sample_steps"]:
            positive_int(self, name)
        # upper bounds before anything is allocated (ddpmkit/limits.py): a config.json or a flag of 2^40 is one line
        check_int(flag("T"), self.T, 1, MAX_T)
        check_int("--num-samples", self.num_samples, 0, MAX_GRID)
        check_float(flag("dropout"), self.dropout, 0, 1, hi_open=True)
        if self.variance not in VARIANCES:
            raise ConfigError(f"unknown variance {self.variance!r}: choose {' or '.join(VARIANCES)}")
        if (self.variance == "learned") != bool(self.learn_sigma):
            raise ConfigError("--variance learned goes with --learn-sigma, and a --learn-sigma run's variance is "
                              f"learned (got --variance {self.variance}"
                              f"{' with' if self.learn_sigma else ' without'} --learn-sigma)")
        self.validate_precond()
        if self.vlb_only and not self.learn_sigma:
            raise ConfigError("--vlb-only trains a learned variance on the bound: it needs --learn-sigma")
        if self.vlb_only and self.loss_weight != "none":
            raise ConfigError(f"--vlb-only trains on the bound itself: it takes no --loss-weight (got "
                              f"{self.loss_weight})")
        from ..diffusion.losses import TIMESTEP_SAMPLERS

        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ConfigError(f"unknown --timestep-sampler {self.timestep_sampler!r}: choose one of "
                              f"{', '.join(TIMESTEP_SAMPLERS)}")
        if not (isinstance(self.p_uncond, (int, float)) and 0.0 <= self.p_uncond < 1.0):
            raise ConfigError(f"--p-uncond must lie in [0, 1), got {self.p_uncond}")
        from ..diffusion.losses import LOSS_WEIGHTS

        if self.loss_weight not in LOSS_WEIGHTS:
            raise ConfigError(f"unknown --loss-weight {self.loss_weight!r}: choose one of {', '.join(LOSS_WEIGHTS)}")
        if check_float("--min-snr-gamma", self.min_snr_gamma, 0, 1e6) <= 0:
            raise ConfigError(f"--min-snr-gamma must be positive, got {self.min_snr_gamma}")
        check_int("--eval-n", self.eval_n, 2, MAX_GRID)
        check_int("--eval-steps", self.eval_steps, 1, self.T)
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"unknown schedule {self.schedule!r}: choose linear or cosine")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}: choose one of {', '.join(OBJECTIVES)}")
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

    def validate_precond(self) -> None:
        """--precond and its settings: their ranges, and the settings an EDM run cannot take (they are about a
        network of the discrete t, or a loss other than EDM's)."""
        if self.precond not in PRECONDS:
            raise ConfigError(f"unknown --precond {self.precond!r}: choose {' or '.join(PRECONDS)}")
        if check_float(flag("edm_sigma_data"), self.edm_sigma_data, 0, 1e6) <= 0:
            raise ConfigError(f"--edm-sigma-data must be positive, got {self.edm_sigma_data}")
        check_float(flag("p_mean"), self.p_mean, -100, 100)
        if check_float(flag("p_std"), self.p_std, 0, 100) <= 0:
            raise ConfigError(f"--p-std must be positive, got {self.p_std}")
        if self.precond == "none":
            changed = [flag(n) for n in ("edm_sigma_data", "p_mean", "p_std")
                       if getattr(self, n) != TrainConfig.__dataclass_fields__[n].default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} {'is a setting' if len(changed) == 1 else 'are settings'} "
                                  "of EDM's preconditioning: add --precond edm")
            return
        edm = "--precond edm"
        if self.objective != "x0":
            raise ConfigError(f"{edm} trains EDM's denoiser D, which predicts the clean image: its objective is x0 "
                              f"(got --objective {self.objective}; leave --objective out)")
        if self.learn_sigma:
            raise ConfigError(f"{edm} takes no --learn-sigma: Improved DDPM's learned variance and its L_hybrid are "
                              "made for a network of the discrete timesteps")
        if self.loss_weight != "none":
            raise ConfigError(f"{edm} weights its loss by EDM's lambda(sigma): it takes no --loss-weight (got "
                              f"{self.loss_weight})")
        if self.timestep_sampler != "uniform":
            raise ConfigError(f"{edm} draws its noise levels from EDM's log-normal (--p-mean, --p-std): it takes no "
                              f"--timestep-sampler {self.timestep_sampler}")


def _json_value(v):
    return list(v) if isinstance(v, tuple) else v


def _net_settings(net: dict) -> dict:
    """The TrainConfig fields that a U-Net configuration (an entry of UNET_PRESETS) sets."""
    return {f.name: tuple(net[f.metadata["unet"]]) if isinstance(f.default, tuple) else net[f.metadata["unet"]]
            for f in dataclasses.fields(TrainConfig) if "unet" in f.metadata}


def _folder_preset(net: str, **settings) -> dict:
    """A preset for a folder of the user's images (``data`` None: --data names it) with U-Net ``net`` of
    UNET_PRESETS: random flips (DDPM, ADM), Adam at a constant rate after the DDPM code's 5,000-step warm-up, EMA
    0.9999 (DDPM, Improved DDPM). A U-Net with twice the image channels out learns its variance (L_hybrid)."""
    u = UNET_PRESETS[net]
    learned = {"learn_sigma": True, "variance": "learned"} if u["out_channels"] == 2 * u["in_channels"] else {}
    return dict(_net_settings(u), data=None, flip=True, warmup=5000, lr_decay="none", ema_decay=0.9999, **learned,
                log_every=100, checkpoint_every=10_000, sample_every=10_000, **settings)


# What each preset changes in the field defaults. digits: the defaults (a small CPU configuration, the best of the
# recipe search of bench/bench_demo_recipe.py: 8x8, batch 128, cosine decay, EMA 0.999);
# cifar10: the paper's setup (DDPM section 4 and appendix B), its U-Net from UNET_PRESETS.
# folder64, folder128: a folder at 64 or 128 pixels, Improved DDPM's recipe (Nichol & Dhariwal 2021: L_hybrid,
# Adam 1e-4, batch 128; the cosine schedule at 64, the linear one at 128 as ADM's 128x128 model) with ADM's
# T = 1000, for 500k steps (DDPM's CelebA-HQ run of 30,000 images: a folder is nearer that than ImageNet).
# lsun256, celebahq256: DDPM appendix B (Adam 2e-5, batch 64, flips; 1.2M steps on LSUN Church, 0.5M on CelebA-HQ).
PRESETS: dict[str, dict] = {
    "digits": {},
    "cifar10": dict(
        _net_settings(UNET_PRESETS["cifar10"]), data="cifar10", flip=True, variance="large",
        steps=800_000, batch_size=128, lr=2e-4, warmup=5000, lr_decay="none", ema_decay=0.9999,
        log_every=100, checkpoint_every=10_000, sample_every=10_000, sample_steps=100,
    ),
    "folder64": _folder_preset("folder64", schedule="cosine", steps=500_000, batch_size=128, lr=1e-4),
    "folder128": _folder_preset("folder128", steps=500_000, batch_size=128, lr=1e-4),
    "lsun256": _folder_preset("lsun256", steps=1_200_000, batch_size=64, lr=2e-5),
    "celebahq256": _folder_preset("celebahq256", steps=500_000, batch_size=64, lr=2e-5),
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
    elif values.get("variance") == "learned" and overrides.get("variance") is None:
        # --no-learn-sigma on a preset that learns it (folder64): the field's default variance
        values["variance"] = TrainConfig.__dataclass_fields__["variance"].default
    if values.get("precond") == "edm" and overrides.get("objective") is None:
        values["objective"] = "x0"  # EDM's D predicts the clean image
    for f in dataclasses.fields(TrainConfig):
        if isinstance(f.default, tuple):
            values[f.name] = tuple(values.get(f.name, f.default))
    return TrainConfig(**values)


def resume_locked() -> tuple[str, ...]:
    """The settings whose change makes a resumed run a different run; everything else may change on resume."""
    return locked_settings(TrainConfig)


# ------------------------------------------------------------------------------ derived views of the fields
def settings() -> list[tuple[dataclasses.Field, type]]:
    """Every diffusion training setting but ``preset``, with the type of its values (:func:`.settings.settings`)."""
    return settings_of(TrainConfig)


def preset_value(preset: str, name: str):
    """The value of setting ``name`` in ``preset``."""
    return PRESETS[preset].get(name, TrainConfig.__dataclass_fields__[name].default)


def changed_settings(cfg: TrainConfig) -> list[str]:
    """The settings of ``cfg`` whose value differs from its preset's, in field order."""
    return changed_names(cfg, partial(preset_value, cfg.preset))


def train_arguments(cfg: TrainConfig) -> list[str]:
    """The ``ddpmkit train`` arguments that give ``cfg`` again: ``--preset P`` and one flag per changed setting
    (:func:`.settings.changed_arguments`)."""
    return ["--preset", cfg.preset] + changed_arguments(cfg, partial(preset_value, cfg.preset))


def describe_default(name: str) -> str:
    """``default: X``, or ``default: digits X, cifar10 Y`` when the presets differ."""
    values = {p: show_value(preset_value(p, name)) for p in PRESETS}
    if len(set(values.values())) == 1:
        return f"default: {next(iter(values.values()))}"
    return "default: " + ", ".join(f"{p} {v}" for p, v in values.items())


def settings_table() -> str:
    """docs/training.md's table of the training settings: one row per setting, a column per preset."""
    return table_of(TrainConfig, {f"`{p}`": partial(preset_value, p) for p in PRESETS})
