"""The PatchGAN discriminator of the KL autoencoder's adversarial loss: a stack of 4x4 convolutions whose output is
a map of logits, each judging one patch of the input (pix2pix's ``NLayerDiscriminator``, Isola et al. 2017, as
latent diffusion trains its autoencoders with it, Rombach et al. 2022).

Shape: conv 4x4 stride 2 + LeakyReLU(0.2); ``layers - 1`` more stride-2 convs with the width doubling (at most 8x
``channels``), a stride-1 conv, each followed by a GroupNorm and LeakyReLU(0.2); last a stride-1 conv to one
channel. Every conv has padding 1, as in pix2pix, so a stride-2 conv maps a side s to floor(s / 2) and a stride-1
conv maps s to s - 1: the output side is floor(s / 2^layers) - 2, and a side needs ``min_size(layers)`` =
3 * 2^layers pixels (24 for the default three layers, 12 for two, 6 for one) to give one logit. Through its
convolutions an output logit sees a patch of ``receptive_field(layers)`` pixels (70 for three layers: pix2pix's
"70x70 PatchGAN"); the GroupNorms' statistics are taken over the whole image, so every logit also depends on the
whole image through them, as with BatchNorm in training mode (over the whole batch).
"""

from __future__ import annotations

import math

from numbers import Integral

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["PatchDiscriminator", "min_size", "output_size", "receptive_field"]

_KERNEL, _PAD = 4, 1  # pix2pix networks.py, NLayerDiscriminator (kw = 4, padw = 1)
_MAX_MULT = 8  # the width stops doubling at 8 x channels (pix2pix)
_GROUPS = 32  # GroupNorm groups, as the U-Net and LDM's autoencoder use; fewer when a width is not divisible
_MAX_LAYERS = 12


def min_size(layers: int) -> int:
    """The smallest image side that gives an output of at least one logit: 3 * 2^layers (see the module note)."""
    return 3 * 2 ** layers


def output_size(size: int, layers: int) -> int:
    """The side of the logit map for an input side ``size``: ``layers`` stride-2 convs (s -> floor(s / 2)), then two
    stride-1 convs (s -> s - 1 each); 0 or less when the input is too small."""
    s = size
    for _ in range(layers):
        s = (s + 2 * _PAD - _KERNEL) // 2 + 1  # conv output size, floor((s + 2p - k) / stride) + 1
        if s <= 0:
            return 0
    return s - 2 * (_KERNEL - 2 * _PAD - 1)


def receptive_field(layers: int) -> int:
    """The side of the input patch one output logit depends on: back from the last conv, r -> (r - 1) * stride + 4."""
    r = 1
    for stride in [1, 1] + [2] * layers:  # the last conv, the stride-1 conv, then the stride-2 convs, outermost last
        r = (r - 1) * stride + _KERNEL
    return r


class PatchDiscriminator(nn.Module):
    """Images [B, in_channels, H, W] in [-1, 1] -> logits [B, 1, h, w], one per patch ("real" is positive).

    Normalisation is GroupNorm, not pix2pix's BatchNorm: BatchNorm's statistics are those of the micro-batch (and of
    the process), so with it the loss of an image would change with the gradient-accumulation split and the number
    of processes, which the training loop promises it does not; GroupNorm normalises each image alone.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        in_channels = _int("in_channels", in_channels, 64)  # the limits of ddpmkit.limits (which imports models/)
        channels = _int("channels", channels, 8192)
        layers = _int("layers", layers, _MAX_LAYERS)
        self.config = {"in_channels": in_channels, "channels": channels, "layers": layers}

        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, _KERNEL, stride=2, padding=_PAD),
                                 nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):  # layers - 1 stride-2 convs, then the stride-1 one (n = layers)
            out = channels * min(2 ** n, _MAX_MULT)
            stride = 2 if n < layers else 1
            # no conv bias before a norm, as pix2pix with BatchNorm: the norm's shift takes its place
            mods += [nn.Conv2d(width, out, _KERNEL, stride=stride, padding=_PAD, bias=False),
                     nn.GroupNorm(math.gcd(_GROUPS, out), out), nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, _KERNEL, stride=1, padding=_PAD))
        self.main = nn.Sequential(*mods)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """pix2pix's init (networks.py, ``init_weights`` "normal"): conv weights N(0, 0.02), norm weights N(1, 0.02),
        biases 0, drawn from the global torch generator."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def min_size(self) -> int:
        return min_size(self.config["layers"])

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.config["layers"])

    def check_input(self, shape) -> None:
        """One ConfigError line when images of ``shape`` [B, C, H, W] give no logit or have the wrong channels."""
        c, layers = self.config["in_channels"], self.config["layers"]
        if len(shape) != 4 or shape[1] != c:
            raise ConfigError(f"PatchDiscriminator reads [B, {c}, H, W] images, got {list(shape)}")
        h, w = int(shape[2]), int(shape[3])
        if min(h, w) < self.min_size:
            fit = max([n for n in range(1, layers) if min(h, w) >= min_size(n)], default=None)
            hint = f" (layers={fit} fits them)" if fit else ""
            raise ConfigError(f"PatchDiscriminator with layers={layers} needs images of at least "
                              f"{self.min_size}x{self.min_size}, got {h}x{w}{hint}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(tuple(x.shape))
        return self.main(x)

    @classmethod
    def from_config(cls, config: dict) -> "PatchDiscriminator":
        """Rebuild from ``.config`` (as read back from JSON). Unknown keys are an error."""
        if not isinstance(config, dict):
            raise ConfigError(f"PatchDiscriminator config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - {"in_channels", "channels", "layers"})
        if unknown:
            raise ConfigError(f"unknown PatchDiscriminator config key(s): {', '.join(map(str, unknown))}")
        return cls(**config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _int(name: str, v, most: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or not 1 <= v <= most:
        raise ConfigError(f"PatchDiscriminator {name} must be an integer in [1, {most}], got {v!r}")
    return int(v)
