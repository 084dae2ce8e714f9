"""Conversions between the library's float images in [-1, 1] and files' uint8 pixels."""

from __future__ import annotations

import torch


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 [.., C, H, W] in 0..255 -> float32 in [-1, 1] (the DDPM data scaling)."""
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> uint8 0..255, rounded to the nearest level and clipped (the FID protocol)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
