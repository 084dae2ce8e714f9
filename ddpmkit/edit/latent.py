"""Editing a latent diffusion run (Rombach et al. 2022): the commands work in pixels at their edges.

The image to edit is read at the run's pixel size and encoded once, ``z = LatentSpace.encode(x)``; the chain runs on
the latents; its result is decoded (``Denoiser.to_pixels``).

Inpainting (:func:`repaint_latent`): the pixel mask is reduced to the latent grid, where a cell counts as known only
when every pixel of its f x f block is known (:func:`latent_mask`). RePaint (``repaint.py``) runs on the latents with
that mask and the encoded image; the result is decoded and the known pixels are pasted back over it exactly,
``out = m * x + (1 - m) * decoded`` (:func:`paste_known`). What that costs:

- the seam at the mask's edge is the decoder's: the diffusion harmonises the two parts in latent space only, so the
  decoded completion and the pasted pixels may disagree along the edge by about the autoencoder's reconstruction
  error, and nothing at pixel level smooths that step;
- the autoencoder's reconstruction error on the known part is gone, removed by the paste (it would otherwise blur or
  shift every known pixel);
- a known pixel inside a partly-known latent cell is generated afresh with its cell and then overwritten by the
  paste: the completion around it did not see it, only the paste restores it.

SDEdit (:func:`sdedit_latent`): encode, noise the latent to the strength's t0, denoise, decode. Strength 0 then
returns the autoencoder's reconstruction of the image, not the image itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import EditError
from .repaint import repaint
from .sdedit import sdedit

__all__ = ["latent_factor", "latent_mask", "upsample_mask", "paste_known", "repaint_latent", "sdedit_latent",
           "encode_images", "PasteStats"]


def latent_factor(pixel_shape, latent_shape) -> int:
    """f, the side of the pixel block behind one latent cell: (C, H, W) pixels over (c, h, w) latents."""
    H, W = int(pixel_shape[-2]), int(pixel_shape[-1])
    h, w = int(latent_shape[-2]), int(latent_shape[-1])
    f = H // h if h > 0 else 0
    if f < 1 or H != f * h or W != f * w:
        raise EditError(f"the run's {H}x{W} images and its {h}x{w} latents are not related by one whole factor")
    return f


def latent_mask(known: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixel mask ``known`` (bool [B or 1, C or 1, H, W], True = known) on the latent grid: bool [B or 1, 1,
    H / f, W / f], True where every pixel of the cell's f x f block (in every channel) is known."""
    f = int(factor)
    m = torch.as_tensor(known).to(torch.bool)
    if m.dim() != 4:
        raise EditError(f"a mask is [B, C, H, W], got shape {tuple(m.shape)}")
    H, W = m.shape[-2:]
    if f < 1 or H % f or W % f:
        raise EditError(f"a {W}x{H} mask does not divide into {f}x{f} blocks (f = {f}, the autoencoder's factor)")
    m = m.all(dim=1, keepdim=True)  # one mask for the latent channels: a pixel is known in every channel or not
    if f == 1:
        return m
    # max-pool of the unknown mask: a cell is known only when none of its pixels is unknown. A cell that saw an
    # unknown pixel would be replaced at every step by the encoding of the image there, which encodes whatever the
    # hole held, and would pin the hole's border to it
    return F.max_pool2d((~m).float(), kernel_size=f, stride=f) == 0


def upsample_mask(latent_known: torch.Tensor, factor: int) -> torch.Tensor:
    """A latent-grid mask back on the pixels: each cell's value over its f x f block."""
    f = int(factor)
    return latent_known.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)


def paste_known(image: torch.Tensor, known: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
    """``out = m * x + (1 - m) * decoded``: the input's own values where the mask is known, the decoded completion
    elsewhere; a selection, so the known pixels are the input's bit for bit."""
    m = torch.as_tensor(known, device=decoded.device).to(torch.bool).expand_as(decoded)
    return torch.where(m, image.to(device=decoded.device, dtype=decoded.dtype), decoded)


@torch.no_grad()
def encode_images(space, images: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """``space.encode`` of images [N, C, H, W] in [-1, 1], ``batch_size`` at a time, on ``device``."""
    parts = [space.encode(images[i:i + batch_size].to(device)).to(device)
             for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts)


def repaint_latent(denoiser, image: torch.Tensor, known: torch.Tensor, z_known: torch.Tensor, *, factor: int,
                   **repaint_options) -> tuple[torch.Tensor, torch.Tensor]:
    """RePaint of a latent run: ``(out, decoded)``, both float [B, C, H, W] pixels.

    ``denoiser`` works on latents and decodes (``to_pixels``); ``image`` is the input in pixels, ``known`` its pixel
    mask (True = known), ``z_known`` the input's latents (``LatentSpace.encode(image)``), ``factor`` the pixels per
    latent cell along a side. RePaint runs on the latents with the :func:`latent_mask`; ``decoded`` is its decoded
    result and ``out`` that with the known pixels pasted back (:func:`paste_known`). ``repaint_options`` are
    :func:`~ddpmkit.edit.repaint`'s.
    """
    z = repaint(denoiser, z_known, latent_mask(known, factor), **repaint_options)
    decoded = denoiser.to_pixels(z)
    return paste_known(image, known, decoded), decoded


def sdedit_latent(denoiser, z: torch.Tensor, strength: float, **sdedit_options) -> torch.Tensor:
    """SDEdit of a latent run: the input's latents ``z`` noised to t0, denoised (:func:`~ddpmkit.edit.sdedit`),
    decoded to pixels. Strength 0 gives the decoding of ``z``, the autoencoder's reconstruction of the input."""
    return denoiser.to_pixels(sdedit(denoiser, z, strength, **sdedit_options))


class PasteStats:
    """What the paste of latent inpainting changed, in 8-bit levels: the decoded known pixels against the input's
    (RMS), and the same on the mask's edge (the known pixels next to an unknown one, mean absolute difference): the
    step the decoder leaves at the seam."""

    def __init__(self, known: torch.Tensor):
        k = torch.as_tensor(known).to(torch.bool).all(dim=1, keepdim=True).cpu()
        hole = F.max_pool2d((~k).float(), kernel_size=3, stride=1, padding=1) > 0  # 8-neighbours of the hole
        self.known, self.edge = k, k & hole
        self.sq = self.n = self.abs_edge = self.n_edge = 0.0

    def add(self, image: torch.Tensor, decoded: torch.Tensor) -> None:
        from ..images import to_uint8

        d = to_uint8(decoded.cpu()).float() - to_uint8(image.cpu()).float()
        k, e = self.known.expand_as(d), self.edge.expand_as(d)
        self.sq += float((d[k] ** 2).sum())
        self.n += int(k.sum())
        self.abs_edge += float(d[e].abs().sum())
        self.n_edge += int(e.sum())

    @property
    def rms(self) -> float:
        return (self.sq / self.n) ** 0.5 if self.n else 0.0

    @property
    def edge_mean(self) -> float:
        return self.abs_edge / self.n_edge if self.n_edge else 0.0
