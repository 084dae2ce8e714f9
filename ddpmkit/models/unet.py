"""The U-Net of the DDPM paper (Ho et al. 2020, appendix B), built the way their official code builds it.

Layout, for ``channel_mults=(1, 2, 2, 2)`` at 32x32 (the CIFAR-10 model, 35,746,307 parameters)::

    conv_in -> [ResBlock (+attn)] x num_res_blocks, Downsample   at 32, 16, 8, then 4 without Downsample
            -> middle: ResBlock, attention, ResBlock
            -> [ResBlock (+attn)] x (num_res_blocks + 1), Upsample  at 4, 8, 16, then 32 without Upsample
            -> GroupNorm, SiLU, conv_out

Every output of conv_in, of each down ResBlock and of each Downsample is kept as a skip connection; each
up ResBlock concatenates one of them (last in, first out) to its input.

The model works in either memory format: give it a ``channels_last`` input (and convert the module with
``model.to(memory_format=torch.channels_last)``) and every layer stays in that format. On an AVX2 CPU that
made the no-grad forward (sampling) of the CIFAR-10 model 10-20% faster; a training step, whose time is
over 80% convolutions either way, gained little (within the noise of the measurement).
"""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["UNet", "timestep_embedding", "UNET_PRESETS", "DOWNSAMPLE_PADDINGS", "unet_from_preset"]

# The official code normalises with tf.contrib group_norm, whose epsilon is 1e-6 (PyTorch's default is 1e-5).
_GN_EPS = 1e-6

DOWNSAMPLE_PADDINGS = ("symmetric", "asymmetric")

def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` [B] (integer or float) -> float32 [B, dim].

    DDPM appendix B / official ``get_timestep_embedding``: with ``half = dim // 2``,
    ``freq_k = exp(-ln(10000) * k / (half - freq_shift))`` for k = 0..half-1 (``freq_shift = 1`` in DDPM), the
    embedding is ``[sin(t * freq), cos(t * freq)]`` (sines first; cosines first with ``flip_sin_to_cos``),
    zero-padded by one column when ``dim`` is odd. The two options exist to load models trained with the other
    conventions (``freq_shift = 0`` and cosines first are common in later models).
    """
    if dim < 4:
        raise ValueError(f"timestep embedding dim must be >= 4, got {dim}")
    half = dim // 2
    if not half - freq_shift > 0:
        raise ValueError(f"timestep embedding freq_shift must be below dim // 2 = {half}, got {freq_shift}")
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    # Transformer positional encoding, as in DDPM
    freqs = torch.exp(k * (-math.log(10000.0) / (half - freq_shift)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # official code: zero-pad an odd width
    return emb


def _group_norm(channels: int, num_groups: int, eps: float = _GN_EPS) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=eps)  # DDPM appendix B: group normalisation


class ResBlock(nn.Module):
    """The DDPM residual block (Wide ResNet style, official ``resnet_block``).

    GroupNorm, SiLU, conv3x3; + Linear(SiLU(temb)); GroupNorm, SiLU, dropout, conv3x3; + skip.
    The caller passes ``SiLU(temb)`` already computed, since every block applies the same SiLU.
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int,
                 eps: float = _GN_EPS):
        super().__init__()
        self.norm1 = _group_norm(in_ch, num_groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _group_norm(out_ch, num_groups, eps)
        self.dropout = dropout
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # official code: a 1x1 conv ("nin") on the skip path only when the channel count changes
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(temb_act)[:, :, None, None]  # official code: timestep bias, broadcast over H, W
        h = F.silu(self.norm2(h))
        if self.dropout > 0 and self.training:
            h = F.dropout(h, self.dropout, training=True)  # DDPM appendix B: dropout in every ResBlock
        h = self.conv2(h)
        return h + (x if self.skip is None else self.skip(x))


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions (official ``attn_block``, multi-head when ``num_heads > 1``).

    GroupNorm; fused q, k, v projection; softmax(q k^T / sqrt(d)) v; output projection; + residual.
    Works on the [B, H*W, C] token view, which costs no copy when the input is channels_last.
    """

    def __init__(self, ch: int, num_heads: int, num_groups: int, eps: float = _GN_EPS):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(ch, num_groups, eps)
        self.qkv = nn.Linear(ch, 3 * ch)  # the three 1x1 convs ("nin") of the official code, fused
        self.proj = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        heads = self.num_heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)
        q, k, v = self.qkv(tokens).view(B, H * W, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # DDPM appendix B: self-attention, scale 1/sqrt(d)
        out = out.transpose(1, 2).reshape(B, H * W, C)
        return x + self.proj(out).view(B, H, W, C).permute(0, 3, 1, 2)


class ResAttnBlock(nn.Module):
    """A ResBlock, followed by self-attention at the resolutions that have it (official ``model``)."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor) -> torch.Tensor:
        h = self.res(x, temb_act)
        return h if self.attn is None else self.attn(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (official ``downsample`` with_conv=True).

    ``padding="symmetric"`` pads one pixel on every side. ``"asymmetric"`` pads one pixel on the bottom and the
    right only, which is what the official TF code's 'SAME' padding does for a stride-2 3x3 conv on an even side,
    and what the published DDPM checkpoints were trained with. Both give the same shapes and parameters.
    """

    def __init__(self, ch: int, padding: str = "symmetric"):
        super().__init__()
        self.asymmetric = padding == "asymmetric"
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if self.asymmetric else 1)

    def forward(self, x: torch.Tensor, temb_act: torch.Tensor | None = None) -> torch.Tensor:
        if self.asymmetric:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then 3x3 conv (official ``upsample`` with_conv=True)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net: ``model(x, t)`` with x float [B, C, H, W] and t [B] -> eps prediction [B, out, H, W].

    The keyword defaults below are the paper's CIFAR-10 model and the one declaration of the U-Net's settings:
    :data:`UNET_PRESETS` and the training presets of :mod:`ddpmkit.train` are derived from them.

    Args:
        image_size: side of the (square) training images; must be divisible by 2^(len(channel_mults)-1).
            Other sizes divisible by that factor also run; attention stays at the same levels.
        in_channels: image channels in.
        out_channels: image channels out (None: ``in_channels``).
        base_channels: width of the first level ("ch" in the official code); the time embedding is 4x this.
        channel_mults: width multiplier per resolution level, one level per entry.
        num_res_blocks: ResBlocks per level on the way down (the way up has one more).
        attention_resolutions: feature-map sides at which self-attention follows each ResBlock.
        dropout: dropout rate inside every ResBlock, in [0, 1).
        num_groups: GroupNorm groups; every width must be divisible by it.
        num_heads: attention heads; every attention width must be divisible by it.
        norm_eps: GroupNorm epsilon (1e-6, the official code's).
        downsample_padding: ``symmetric`` (the default) or ``asymmetric`` (bottom/right, the official code's
            'SAME'); see :class:`Downsample`.
        flip_sin_to_cos: a time-embedding convention (DDPM's: False); see :func:`timestep_embedding`.
        freq_shift: a time-embedding convention (DDPM's: 1); see :func:`timestep_embedding`.
        num_class_embeds: rows of a learned class embedding added to the time embedding (Dhariwal & Nichol 2021,
            the ADM way; diffusers' ``num_class_embeds``), or None for an unconditional network. A class-conditional
            ddpmkit run has K + 1 rows: its K classes and, last, the "null" class of classifier-free guidance.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions=(16,),
        dropout: float = 0.1,
        num_groups: int = 32,
        num_heads: int = 1,
        norm_eps: float = _GN_EPS,
        downsample_padding: str = "symmetric",
        flip_sin_to_cos: bool = False,
        freq_shift: float = 1.0,
        num_class_embeds: int | None = None,
    ):
        super().__init__()
        cfg = _validate(
            image_size=image_size, in_channels=in_channels, out_channels=out_channels,
            base_channels=base_channels, channel_mults=channel_mults, num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions, dropout=dropout, num_groups=num_groups,
            num_heads=num_heads, norm_eps=norm_eps, downsample_padding=downsample_padding,
            flip_sin_to_cos=flip_sin_to_cos, freq_shift=freq_shift, num_class_embeds=num_class_embeds,
        )
        self.config = cfg  # plain JSON-serialisable constructor arguments; UNet.from_config(cfg) rebuilds
        ch, mults, groups = cfg["base_channels"], cfg["channel_mults"], cfg["num_groups"]
        attn_res, heads, p = set(cfg["attention_resolutions"]), cfg["num_heads"], cfg["dropout"]
        eps = cfg["norm_eps"]
        temb_ch = 4 * ch  # DDPM appendix B / official code: time embedding width 4 * ch
        self.num_levels = len(mults)
        self.base_channels = ch
        self._temb_kw = {"flip_sin_to_cos": cfg["flip_sin_to_cos"], "freq_shift": cfg["freq_shift"]}

        # official code: dense(ch -> 4ch), nonlinearity, dense(4ch -> 4ch)
        self.time_embed = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        # ADM (Dhariwal & Nichol 2021, guided-diffusion unet.py label_emb): a learned embedding of the class, added
        # to the time embedding before the shared SiLU; created only for a class-conditional network, so the
        # parameters (and checkpoints) of an unconditional one are unchanged
        n_cls = cfg.get("num_class_embeds")
        self.class_embed = nn.Embedding(n_cls, temb_ch) if n_cls is not None else None
        self.conv_in = nn.Conv2d(cfg["in_channels"], ch, 3, padding=1)

        # Down path; skip_chs tracks the width of every tensor pushed as a skip connection.
        self.down = nn.ModuleList()
        skip_chs = [ch]
        cur, res = ch, cfg["image_size"]
        for level, mult in enumerate(mults):
            out = ch * mult
            for _ in range(cfg["num_res_blocks"]):
                attn = AttnBlock(out, heads, groups, eps) if res in attn_res else None
                self.down.append(ResAttnBlock(ResBlock(cur, out, temb_ch, p, groups, eps), attn))
                cur = out
                skip_chs.append(cur)
            if level != len(mults) - 1:
                self.down.append(Downsample(cur, cfg["downsample_padding"]))
                skip_chs.append(cur)
                res //= 2

        # Middle: ResBlock, attention, ResBlock (official code; attention here at every configuration).
        self.mid_res1 = ResBlock(cur, cur, temb_ch, p, groups, eps)
        self.mid_attn = AttnBlock(cur, heads, groups, eps)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, p, groups, eps)

        # Up path: num_res_blocks + 1 ResBlocks per level, each eating one skip connection.
        self.up = nn.ModuleList()
        for level in reversed(range(len(mults))):
            out = ch * mults[level]
            for _ in range(cfg["num_res_blocks"] + 1):
                attn = AttnBlock(out, heads, groups, eps) if res in attn_res else None
                self.up.append(ResAttnBlock(ResBlock(cur + skip_chs.pop(), out, temb_ch, p, groups, eps), attn))
                cur = out
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skip_chs

        self.norm_out = _group_norm(cur, groups, eps)
        self.conv_out = nn.Conv2d(cur, cfg["out_channels"], 3, padding=1)
        # Which up modules take a skip connection, precomputed to keep forward free of type checks.
        self._up_takes_skip = tuple(isinstance(m, ResAttnBlock) for m in self.up)
        self._init_weights()

    def _init_weights(self) -> None:
        # official code: variance_scaling(1, 'fan_avg', 'uniform') = Xavier uniform, zero biases ...
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # ... and init_scale=0 for each ResBlock's last conv, each attention output and the output conv.
        zero = [self.conv_out] + [m.conv2 for m in self.modules() if isinstance(m, ResBlock)]
        zero += [m.proj for m in self.modules() if isinstance(m, AttnBlock)]
        for m in zero:
            nn.init.zeros_(m.weight)

    def forward(self, x: torch.Tensor, t, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise in ``x`` [B, C, H, W] at timesteps ``t`` ([B] or scalar, integer or float).

        ``y``: class labels [B] (integers in 0..num_class_embeds-1) for a class-conditional network, which needs
        them; an unconditional one takes none.
        """
        if (y is None) != (self.class_embed is None):
            raise ValueError("this UNet is unconditional: it takes no class labels (y must be None)" if y is not None
                             else "this UNet is class-conditional: it needs class labels y [B]")
        B, C, H, W = x.shape
        factor = 1 << (self.num_levels - 1)
        if C != self.config["in_channels"] or H % factor or W % factor:
            raise ValueError(f"UNet expects [B, {self.config['in_channels']}, H, W] with H and W divisible by "
                             f"{factor}, got {list(x.shape)}")
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        elif t.shape != (B,):
            raise ValueError(f"t must be a scalar or have shape [{B}], got {list(t.shape)}")

        emb = timestep_embedding(t, self.base_channels, **self._temb_kw).to(self.conv_in.weight.dtype)
        temb = self.time_embed(emb)
        if y is not None:
            y = torch.as_tensor(y, device=x.device)
            y = y.expand(B) if y.ndim == 0 else y
            if y.shape != (B,) or y.dtype.is_floating_point:
                raise ValueError(f"y must be integer class labels of shape [{B}], got {y.dtype} {list(y.shape)}")
            temb = temb + self.class_embed(y.long()).to(temb.dtype)  # ADM: emb = emb + label_emb(y)
        temb_act = F.silu(temb)  # SiLU(temb), shared by every ResBlock's projection

        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, temb_act)
            hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb_act)), temb_act)

        for m, takes_skip in zip(self.up, self._up_takes_skip):
            h = m(torch.cat([h, hs.pop()], dim=1), temb_act) if takes_skip else m(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    @classmethod
    def from_config(cls, config: dict) -> "UNet":
        """Rebuild a UNet from ``model.config`` (as read back from JSON). Unknown keys are an error."""
        if not isinstance(config, dict):
            raise ConfigError(f"UNet config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - set(_DEFAULTS) - {"image_size"})
        if unknown:
            raise ConfigError(f"unknown UNet config key(s): {', '.join(map(str, unknown))}")
        if "image_size" not in config:
            raise ConfigError("UNet config lacks 'image_size'")
        return cls(**config)

    @property
    def needs_cond(self) -> bool:
        """Whether the network takes class labels (a Denoiser refuses to call it without)."""
        return self.class_embed is not None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ConfigError(f"UNet {name} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _int_list(name: str, v, minimum: int, allow_empty: bool) -> list[int]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ConfigError(f"UNet {name} must be a list of integers, got {v!r}")
    out = [_int(f"{name} entry", x, minimum) for x in v]
    if not out and not allow_empty:
        raise ConfigError(f"UNet {name} must not be empty")
    return out


def _validate(**kw) -> dict:
    """Check every constructor argument; return them as a JSON-serialisable dict (lists, out_channels set)."""
    image_size = _int("image_size", kw["image_size"], 1)
    in_ch = _int("in_channels", kw["in_channels"], 1)
    out_ch = in_ch if kw["out_channels"] is None else _int("out_channels", kw["out_channels"], 1)
    ch = _int("base_channels", kw["base_channels"], 4)
    mults = _int_list("channel_mults", kw["channel_mults"], 1, allow_empty=False)
    n_res = _int("num_res_blocks", kw["num_res_blocks"], 1)
    attn = _int_list("attention_resolutions", kw["attention_resolutions"], 1, allow_empty=True)
    groups = _int("num_groups", kw["num_groups"], 1)
    heads = _int("num_heads", kw["num_heads"], 1)
    p = kw["dropout"]
    if isinstance(p, bool) or not isinstance(p, Real) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(f"UNet dropout must be a number in [0, 1), got {p!r}")
    eps = kw["norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0.0 < float(eps) < 1.0:
        raise ConfigError(f"UNet norm_eps must be a number in (0, 1), got {eps!r}")
    pad = kw["downsample_padding"]
    if pad not in DOWNSAMPLE_PADDINGS:
        raise ConfigError(f"UNet downsample_padding must be one of {', '.join(DOWNSAMPLE_PADDINGS)}, got {pad!r}")
    flip = kw["flip_sin_to_cos"]
    if not isinstance(flip, bool):
        raise ConfigError(f"UNet flip_sin_to_cos must be true or false, got {flip!r}")
    n_cls = kw.get("num_class_embeds")
    if n_cls is not None:
        n_cls = _int("num_class_embeds", n_cls, 1)
    shift = kw["freq_shift"]
    if isinstance(shift, bool) or not isinstance(shift, Real) or not math.isfinite(shift) \
            or not float(shift) < ch // 2:
        raise ConfigError(f"UNet freq_shift must be a number below base_channels // 2 = {ch // 2}, got {shift!r}")

    factor = 2 ** (len(mults) - 1)
    if image_size % factor:
        raise ConfigError(f"UNet image_size {image_size} is not divisible by 2^(len(channel_mults)-1) = {factor}")
    resolutions = [image_size // 2**i for i in range(len(mults))]
    for r in attn:
        if r not in resolutions:
            raise ConfigError(f"UNet attention resolution {r} never occurs; the resolutions are {resolutions}")
    for w in sorted({ch} | {ch * m for m in mults}):
        if w % groups:
            raise ConfigError(f"UNet width {w} is not divisible by num_groups={groups}")
    attn_widths = {ch * m for m, r in zip(mults, resolutions) if r in attn} | {ch * mults[-1]}
    for w in sorted(attn_widths):
        if w % heads:
            raise ConfigError(f"UNet attention width {w} is not divisible by num_heads={heads}")
    return {
        "image_size": image_size,
        "in_channels": in_ch,
        "out_channels": out_ch,
        "base_channels": ch,
        "channel_mults": mults,
        "num_res_blocks": n_res,
        "attention_resolutions": attn,
        "dropout": float(p),
        "num_groups": groups,
        "num_heads": heads,
        "norm_eps": float(eps),
        "downsample_padding": pad,
        "flip_sin_to_cos": flip,
        "freq_shift": float(shift),
        **({"num_class_embeds": n_cls} if n_cls is not None else {}),
    }


# The U-Net's settings are declared once, in UNet.__init__'s signature (whose defaults are the paper's CIFAR-10
# model); the defaults and the presets below are read from it, and ddpmkit.train's presets from them.
_DEFAULTS = {name: p.default for name, p in inspect.signature(UNet.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}


def _preset(**overrides) -> dict:
    """Every constructor argument, spelled out as JSON (lists, out_channels set): the defaults, overridden."""
    return _validate(**{**_DEFAULTS, **overrides})


# DDPM appendix B: the 256x256 model of LSUN and CelebA-HQ (official code's unet2d16b2c112244): ch 128,
# ch_mult 1,1,2,2,4,4, two res blocks per level, attention at 16x16, dropout 0 on those datasets.
_DDPM_256 = dict(image_size=256, channel_mults=(1, 1, 2, 2, 4, 4), dropout=0.0)


UNET_PRESETS: dict[str, dict] = {
    # DDPM appendix B: the CIFAR-10 model, 35.7M parameters (the constructor's defaults).
    "cifar10": _preset(image_size=32),
    # The digits at their native 8x8 (pictures show them upscaled), chosen for quality per CPU-second by
    # bench/bench_demo_recipe.py: at equal wall-clock cost it beat the earlier 16x16 width-16 model (docs/demo.md).
    # 917,889 parameters unconditional.
    "digits": _preset(image_size=8, in_channels=1, base_channels=32, channel_mults=(1, 2), num_res_blocks=2,
                      attention_resolutions=(), dropout=0.0, num_groups=8),
    # A folder of images at 64x64: the unconditional ImageNet-64 model of Improved DDPM (Nichol & Dhariwal 2021,
    # its code's image_size 64: channel_mult 1,2,3,4, 3 res blocks, attention at 16 and 8 with 4 heads, learned
    # variance: 6 outputs), with ADM's dropout 0.1 (Dhariwal & Nichol 2021, its 64x64 and LSUN models), since a
    # user's folder is far smaller than ImageNet. Without their scale-shift norm: 115,942,150 parameters.
    "folder64": _preset(image_size=64, out_channels=6, channel_mults=(1, 2, 3, 4), num_res_blocks=3,
                        attention_resolutions=(16, 8), num_heads=4, dropout=0.1),
    # A folder of images at 128x128: ADM's 128x128 layout (channel_mult 1,1,2,3,4, 2 res blocks, attention at 32,
    # 16 and 8 with 4 heads, learned variance) at Improved DDPM's width 128 instead of ADM's 256, dropout 0.1.
    # Without ADM's scale-shift norm and BigGAN up/downsampling blocks: 92,182,790 parameters.
    "folder128": _preset(image_size=128, out_channels=6, channel_mults=(1, 1, 2, 3, 4), num_res_blocks=2,
                         attention_resolutions=(32, 16, 8), num_heads=4, dropout=0.1),
    # DDPM appendix B: the LSUN and CelebA-HQ model, the network of google/ddpm-church-256: 113,673,219 parameters.
    "lsun256": _preset(**_DDPM_256),
    "celebahq256": _preset(**_DDPM_256),
}

def unet_from_preset(name: str, **overrides) -> UNet:
    """A UNet from ``UNET_PRESETS[name]``, with any constructor argument overridden by keyword."""
    if name not in UNET_PRESETS:
        raise ConfigError(f"unknown UNet preset {name!r}: choose from {', '.join(sorted(UNET_PRESETS))}")
    return UNet.from_config({**UNET_PRESETS[name], **overrides})
