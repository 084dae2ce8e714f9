"""The settings of an autoencoder training run (``ddpmkit autoencoder train``), each declared once.

LDM's KL autoencoder (Rombach et al. 2022, sec. 3 and appendix G): an L1 reconstruction loss, a KL term with a
small weight, and an optional PatchGAN discriminator whose loss joins at a start step with LDM's adaptive weight.
The defaults are a small f = 4 autoencoder for the digits at 32x32 that trains in minutes on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .. import __version__
from ..errors import ConfigError
from ..limits import MAX_GRID, check_autoencoder_config, check_float, check_int
from ..models.autoencoder import AUTOENCODER_PRESETS
from .settings import DataSettings, LoopSettings, default_of, positive_int, setting, settings_from_json

__all__ = ["AutoencoderConfig", "autoencoder_channels", "settings_table"]

MAX_FACTOR = 64
_NET = AUTOENCODER_PRESETS["digits"]  # the default network


def autoencoder_channels(base: int, factor: int) -> list[int]:
    """The width of each level of an autoencoder with downsampling factor ``factor`` (a power of two): one level
    per halving and a last one, level i of width ``base * min(2^i, 4)`` (LDM's f = 4 and f = 8 widths: 1,2,4 and
    1,2,4,4 times 128)."""
    levels = int(math.log2(factor)) + 1
    return [base * min(2 ** i, 4) for i in range(levels)]


@dataclass
class AutoencoderConfig(DataSettings, LoopSettings):
    """Every setting of an autoencoder training run; its ``config.json`` holds all of it."""

    # data (the rest in DataSettings)
    image_size: int = default_of(DataSettings, "image_size", _NET["image_size"])
    holdout: float = setting(0.1, "fraction of the images held out of training, for --eval-every and "
                                  "`autoencoder eval` (a fixed choice; CIFAR-10 uses its test split instead)",
                             locked=True)
    # the network (models/autoencoder.py)
    factor: int = setting(2 ** (len(_NET["block_out_channels"]) - 1),
                          "downsampling factor f: the latent grid is the image side / f (1, 2, 4, 8...)", locked=True)
    latent_channels: int = setting(_NET["latent_channels"], "channels of the latent", locked=True)
    base_channels: int = setting(_NET["block_out_channels"][0],
                                 "width of the first level; level i has base * min(2^i, 4)", locked=True)
    layers_per_block: int = setting(_NET["layers_per_block"],
                                    "ResNet blocks per level in the encoder (the decoder has one more)", locked=True)
    num_groups: int = setting(_NET["norm_num_groups"], "GroupNorm groups", locked=True)
    mid_attention: bool = setting(_NET["mid_attention"],
                                  "self-attention in the middle blocks of the encoder and the decoder", locked=True)
    # the loss
    kl_weight: float = setting(1e-6, "weight of the KL term against the reconstruction loss, in LDM's units (KL "
                                     "summed over the latent, L1 summed over the pixels)")
    perceptual: str | None = setting(None, "a perceptual loss of your own: module:factory, a function that returns "
                                           "an nn.Module taking (x, x_hat) in [-1, 1] to a distance per image "
                                           "(an LPIPS-style network; none ships: nothing is downloaded)",
                                     metavar="MODULE:FACTORY")
    perceptual_weight: float = setting(1.0, "weight of --perceptual's distance, added to the L1 loss")
    disc_weight: float = setting(0.0, "weight of the PatchGAN discriminator's adversarial loss, scaled by LDM's "
                                      "adaptive weight (0: no discriminator; LDM uses 0.5)", locked=True)
    disc_start: int = setting(0, "step from which the discriminator trains and its loss counts (LDM: 50001)")
    disc_layers: int = setting(2, "stride-2 layers of the discriminator (its patch grows with them)", locked=True)
    disc_channels: int = setting(64, "width of the discriminator's first layer", locked=True)
    disc_lr_scale: float = setting(1.0, "the discriminator's learning rate, relative to --lr")
    # pictures and --eval-every (when: LoopSettings' sample_every and eval_every)
    num_samples: int = setting(16, "held-out images in each picture of originals beside reconstructions")
    eval_n: int = setting(500, "held-out images of each --eval-every measurement (PSNR, Frechet distance)")
    # the loop's defaults for this task
    steps: int = default_of(LoopSettings, "steps", 2000)
    batch_size: int = default_of(LoopSettings, "batch_size", 16)
    lr: float = default_of(LoopSettings, "lr", 2e-3)
    warmup: int = default_of(LoopSettings, "warmup", 50)
    ema_decay: float = default_of(LoopSettings, "ema_decay", 0.99)
    log_every: int = default_of(LoopSettings, "log_every", 25)
    sample_every: int = default_of(LoopSettings, "sample_every", 1000, help="save a picture of held-out originals "
                                   "beside their reconstructions by the EMA weights every N steps (and at the end)")
    eval_every: int = default_of(LoopSettings, "eval_every", 0, help="every N steps (and at the end) measure the "
                                 "held-out PSNR and the Frechet distance of --eval-n reconstructions (0: never)")

    @property
    def gan(self) -> bool:
        """Whether the run trains a discriminator."""
        return self.disc_weight > 0

    def model_config(self) -> dict:
        """The autoencoder's constructor arguments (config.json's ``model`` section)."""
        return {"in_channels": self.channels, "out_channels": None,
                "block_out_channels": autoencoder_channels(self.base_channels, self.factor),
                "layers_per_block": self.layers_per_block, "latent_channels": self.latent_channels,
                "norm_num_groups": self.num_groups, "mid_attention": self.mid_attention,
                "use_quant_conv": True, "use_post_quant_conv": True, "image_size": self.image_size}

    def discriminator_config(self) -> dict:
        return {"in_channels": self.channels, "channels": self.disc_channels, "layers": self.disc_layers}

    def to_json(self) -> dict:
        """The run's config.json: the flat settings plus the sections that loaders read. ``latent``'s scale is
        the latent diffusion run's to measure (None here)."""
        return {
            "format": "ddpmkit-run",
            "version": 1,
            "ddpmkit_version": __version__,
            "kind": "autoencoder",
            "train": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()},
            "model": self.model_config(),
            "discriminator": self.discriminator_config() if self.gan else None,
            "latent": {"scaling_factor": None, "shift_factor": None, "latents_mean": None, "latents_std": None},
            "data": {"source": self.data, "image_size": self.image_size, "channels": self.channels},
        }

    @classmethod
    def from_json(cls, cfg: dict) -> "AutoencoderConfig":
        return settings_from_json(cls, cfg)

    def validate(self) -> None:
        self.validate_data()
        self.validate_loop()
        for name in ["latent_channels", "base_channels", "layers_per_block", "num_groups", "disc_layers",
                     "disc_channels"]:
            positive_int(self, name)
        f = check_int("--factor", self.factor, 1, MAX_FACTOR)
        if f & (f - 1):
            raise ConfigError(f"--factor must be a power of two (1, 2, 4, 8...), got {f}")
        if self.image_size % f:
            raise ConfigError(f"--image-size {self.image_size} is not divisible by --factor {f}")
        check_float("--holdout", self.holdout, 0, 1, hi_open=True)
        check_float("--kl-weight", self.kl_weight, 0, 1e6)
        check_float("--perceptual-weight", self.perceptual_weight, 0, 1e6)
        check_float("--disc-weight", self.disc_weight, 0, 1e6)
        if check_float("--disc-lr-scale", self.disc_lr_scale, 0, 1e6) == 0:
            raise ConfigError("--disc-lr-scale must be positive, got 0")
        check_int("--disc-start", self.disc_start, 0, 10**12)
        check_int("--num-samples", self.num_samples, 0, MAX_GRID)
        check_int("--eval-n", self.eval_n, 2, MAX_GRID)
        if self.perceptual is not None and ":" not in str(self.perceptual):
            raise ConfigError(f"--perceptual must name module:factory, got {self.perceptual!r}")
        check_autoencoder_config(self.model_config(), "the autoencoder of these settings")
        if self.gan:
            from ..models.discriminator import min_size

            if self.image_size < min_size(self.disc_layers):
                raise ConfigError(f"--disc-layers {self.disc_layers} needs images of at least "
                                  f"{min_size(self.disc_layers)} pixels on a side, got --image-size {self.image_size}")


def settings_table() -> str:
    """docs/latent.md's table of the autoencoder's training settings: one row per setting, with its default."""
    from .settings import class_default
    from .settings import settings_table as table_of

    return table_of(AutoencoderConfig, {"default": class_default(AutoencoderConfig)})
