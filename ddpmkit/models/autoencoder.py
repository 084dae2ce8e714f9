"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "LDM", section 3 and appendix G).

An image x [B, C, H, W] is encoded to a diagonal Gaussian over latents z [B, z, H/f, W/f], with
f = 2^(len(block_out_channels) - 1), and a latent is decoded back to an image::

    encoder: conv_in -> [ResNet x layers_per_block, downsample] per level (none after the last)
             -> middle: ResNet, self-attention, ResNet -> GroupNorm, SiLU, conv_out (2z channels: mean, log-variance)
    quant_conv (1x1, 2z -> 2z)                     the moments of the posterior q(z | x)
    post_quant_conv (1x1, z -> z)
    decoder: conv_in -> middle: ResNet, self-attention, ResNet
             -> [ResNet x (layers_per_block + 1), upsample] per level, widest first (none after the last)
             -> GroupNorm, SiLU, conv_out

Every submodule carries the name that diffusers' ``AutoencoderKL`` gives it (``encoder.down_blocks.0.resnets.1``,
``decoder.mid_block.attentions.0.to_q``, ...), so the two state dicts map one to one and the Stable Diffusion
VAE loads without renaming. The model works in either memory format (a ``channels_last`` input and module stay
channels_last); its arithmetic is float32.
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["AutoencoderKL", "DiagonalGaussian", "AUTOENCODER_PRESETS", "autoencoder_from_preset"]

# LDM (taming-transformers' Normalize): GroupNorm with epsilon 1e-6, as in the DDPM code it descends from.
_GN_EPS = 1e-6
# LDM's DiagonalGaussianDistribution clamps the log-variance to this range before exponentiating it.
_LOGVAR_RANGE = (-30.0, 20.0)


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(var)) from the encoder's ``moments`` [B, 2C, h, w].

    The first C channels are the mean, the last C the log-variance (clamped to [-30, 20] as LDM does).
    """

    def __init__(self, moments: torch.Tensor):
        if moments.ndim < 2 or moments.shape[1] % 2:
            raise ValueError(f"moments must have an even number of channels (mean, log-variance), got "
                             f"shape {list(moments.shape)}")
        self.moments = moments
        mean, logvar = moments.chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(*_LOGVAR_RANGE)  # LDM: DiagonalGaussianDistribution's clamp
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw z = mean + std * eps, eps ~ N(0, I) from ``generator`` (Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per sample [B], summed over channels and positions."""
        dims = tuple(range(1, self.mean.ndim))
        # Kingma & Welling 2014, appendix B: -KL = 0.5 * sum(1 + log var - mean^2 - var)
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)

    def __repr__(self) -> str:
        return f"DiagonalGaussian(shape={list(self.mean.shape)})"


def _group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=_GN_EPS)  # LDM: Normalize, GroupNorm(eps=1e-6, affine)


class _ResnetBlock(nn.Module):
    """LDM's ResnetBlock without a time embedding: GroupNorm, SiLU, conv3x3, GroupNorm, SiLU, conv3x3, + skip
    (a 1x1 conv on the skip path when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _SelfAttention(nn.Module):
    """LDM's AttnBlock: one head over the h*w positions. GroupNorm; q, k, v projections;
    softmax(q k^T / sqrt(C)) v; output projection; + residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(ch, groups)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(B, 1, H * W, C)  # a view when channels_last
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(C))  # LDM AttnBlock: scale C^-1/2
        out = self.to_out[0](out).view(B, H, W, C).permute(0, 3, 1, 2)
        return x + out


class _MidBlock(nn.Module):
    """ResNet, self-attention (optional), ResNet at the lowest resolution (LDM's ``mid``)."""

    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_ResnetBlock(ch, ch, groups), _ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([_SelfAttention(ch, groups)] if attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and the bottom only (LDM's Downsample)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM Downsample: pad (left 0, right 1, top 0, bottom 1)


class _Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (LDM's Upsample)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution of the encoder (``resnets`` then ``downsamplers``) or decoder (``resnets`` then
    ``upsamplers``)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([_ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(n)])
        self.downsamplers = nn.ModuleList([_Downsample(out_ch)]) if resample == "down" else None
        self.upsamplers = nn.ModuleList([_Upsample(out_ch)]) if resample == "up" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        for resample in (self.downsamplers or ()):
            x = resample(x)
        for resample in (self.upsamplers or ()):
            x = resample(x)
        return x


class _Encoder(nn.Module):
    def __init__(self, in_ch: int, widths: list[int], layers: int, z2: int, groups: int, attention: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        last = len(widths) - 1
        self.down_blocks = nn.ModuleList([
            _Level(widths[max(i - 1, 0)], w, layers, groups, "down" if i < last else None)
            for i, w in enumerate(widths)])
        self.mid_block = _MidBlock(widths[-1], groups, attention)
        self.conv_norm_out = _group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], z2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, z: int, widths: list[int], layers: int, out_ch: int, groups: int, attention: bool):
        super().__init__()
        rev = widths[::-1]
        self.conv_in = nn.Conv2d(z, rev[0], 3, padding=1)
        self.mid_block = _MidBlock(rev[0], groups, attention)
        last = len(rev) - 1
        self.up_blocks = nn.ModuleList([
            _Level(rev[max(i - 1, 0)], w, layers + 1, groups, "up" if i < last else None)
            for i, w in enumerate(rev)])
        self.conv_norm_out = _group_norm(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """LDM's KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> images``.

    Args:
        in_channels: image channels (3 for RGB).
        out_channels: channels of the reconstruction (None: ``in_channels``).
        block_out_channels: the width of each resolution level, finest first; f = 2^(levels - 1).
        layers_per_block: ResNet blocks per level in the encoder (the decoder has one more per level).
        latent_channels: channels z of a latent.
        norm_num_groups: GroupNorm groups; every width must be divisible by it.
        mid_attention: self-attention between the two middle ResNet blocks of the encoder and of the decoder.
        use_quant_conv: the 1x1 conv after the encoder.
        use_post_quant_conv: the 1x1 conv before the decoder.
        image_size: the side the model was trained at (informative; latent_shape's default).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block: int = 2,
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        image_size: int | None = None,
    ):
        super().__init__()
        cfg = _validate(in_channels=in_channels, out_channels=out_channels, block_out_channels=block_out_channels,
                        layers_per_block=layers_per_block, latent_channels=latent_channels,
                        norm_num_groups=norm_num_groups, mid_attention=mid_attention, use_quant_conv=use_quant_conv,
                        use_post_quant_conv=use_post_quant_conv, image_size=image_size)
        self._config = cfg
        widths, groups, z = cfg["block_out_channels"], cfg["norm_num_groups"], cfg["latent_channels"]
        layers, attention = cfg["layers_per_block"], cfg["mid_attention"]
        self.encoder = _Encoder(cfg["in_channels"], widths, layers, 2 * z, groups, attention)
        self.decoder = _Decoder(z, widths, layers, cfg["out_channels"], groups, attention)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if cfg["use_quant_conv"] else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg["use_post_quant_conv"] else None

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict:
        """The constructor's arguments as JSON (lists, out_channels set): config.json's ``model`` section."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: dict) -> AutoencoderKL:
        """Rebuild an autoencoder from ``model.config`` (as read back from JSON). Unknown keys are an error."""
        if not isinstance(config, dict):
            raise ConfigError(f"AutoencoderKL config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_ARGS), key=str)
        if unknown:
            raise ConfigError(f"unknown AutoencoderKL config key(s): {', '.join(map(str, unknown))}")
        return cls(**config)

    @property
    def factor(self) -> int:
        """The downsampling factor f: a latent is f times smaller than its image on each side."""
        return 2 ** (len(self._config["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self._config["latent_channels"]

    def latent_shape(self, image_size=None) -> tuple[int, int, int]:
        """(C, h, w) of the latent of an image of side ``image_size`` (an int, or (H, W); default: the model's)."""
        size = self._config["image_size"] if image_size is None else image_size
        if size is None:
            raise ConfigError("AutoencoderKL.latent_shape needs an image size: this model has no image_size")
        H, W = (size, size) if isinstance(size, Integral) else tuple(size)
        f = self.factor
        if H % f or W % f or H < 1 or W < 1:
            raise ConfigError(f"an image of {H}x{W} pixels does not divide into this autoencoder's "
                              f"{f}x{f} latent cells; use a side divisible by {f}")
        return (self.latent_channels, H // f, W // f)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight: LDM's adaptive GAN weight is a ratio of gradients with respect to it."""
        return self.decoder.conv_out.weight

    # ------------------------------------------------------------------ the model
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) of images x [B, C, H, W] (in [-1, 1])."""
        h = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [B, out_channels, h f, w f] from latents z [B, latent_channels, h, w] (not clamped)."""
        z = z.to(self.decoder.conv_in.weight.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): x encoded, a latent drawn (``sample_posterior``; or mean + std * ``noise``,
        the reparameterisation with noise drawn by the caller) or the mean taken, and decoded."""
        posterior = self.encode(x)
        if noise is not None:
            z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)  # Kingma & Welling 2014 eq. 10
        else:
            z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# ---------------------------------------------------------------------------------------------- settings

_ARGS = tuple(name for name in inspect.signature(AutoencoderKL.__init__).parameters if name != "self")


def _int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ConfigError(f"AutoencoderKL {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"AutoencoderKL {name} must be true or false, got {v!r}")
    return v


def _validate(**kw) -> dict:
    """Check every constructor argument; return them as a JSON-serialisable dict (lists, out_channels set)."""
    in_ch = _int("in_channels", kw["in_channels"], 1)
    out_ch = in_ch if kw["out_channels"] is None else _int("out_channels", kw["out_channels"], 1)
    widths = kw["block_out_channels"]
    if isinstance(widths, (str, bytes)) or not hasattr(widths, "__iter__"):
        raise ConfigError(f"AutoencoderKL block_out_channels must be a list of integers, got {widths!r}")
    widths = [_int("block_out_channels entry", w, 1) for w in widths]
    if not widths:
        raise ConfigError("AutoencoderKL block_out_channels must not be empty")
    layers = _int("layers_per_block", kw["layers_per_block"], 1)
    z = _int("latent_channels", kw["latent_channels"], 1)
    groups = _int("norm_num_groups", kw["norm_num_groups"], 1)
    for w in widths:
        if w % groups:
            raise ConfigError(f"AutoencoderKL width {w} is not divisible by norm_num_groups={groups}")
    size = kw["image_size"]
    if size is not None:
        size = _int("image_size", size, 1)
    return {
        "in_channels": in_ch,
        "out_channels": out_ch,
        "block_out_channels": widths,
        "layers_per_block": layers,
        "latent_channels": z,
        "norm_num_groups": groups,
        "mid_attention": _bool("mid_attention", kw["mid_attention"]),
        "use_quant_conv": _bool("use_quant_conv", kw["use_quant_conv"]),
        "use_post_quant_conv": _bool("use_post_quant_conv", kw["use_post_quant_conv"]),
        "image_size": size,
    }


_DEFAULTS = {name: p.default for name, p in inspect.signature(AutoencoderKL.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}


def _preset(**overrides) -> dict:
    return _validate(**{**_DEFAULTS, **overrides})


AUTOENCODER_PRESETS: dict[str, dict] = {
    # The Stable Diffusion 1.x/2.x VAE (LDM's KL-f8 with 4 latent channels): 83,653,863 parameters.
    "sd": _preset(image_size=512),
    # A small f = 4 autoencoder for the 1-channel digits at 32x32: latents of 4 x 8 x 8 (`ddpmkit autoencoder train`'s
    # defaults; in 120 s on one CPU thread it reaches a held-out PSNR of 37 dB, bench/bench_latent.py)
    "digits": _preset(in_channels=1, block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, image_size=32),
}


def autoencoder_from_preset(name: str, **overrides) -> AutoencoderKL:
    """An AutoencoderKL from ``AUTOENCODER_PRESETS[name]``, with any constructor argument overridden by keyword."""
    if name not in AUTOENCODER_PRESETS:
        raise ConfigError(f"unknown autoencoder preset {name!r}: choose from {', '.join(sorted(AUTOENCODER_PRESETS))}")
    return AutoencoderKL.from_config({**AUTOENCODER_PRESETS[name], **overrides})
