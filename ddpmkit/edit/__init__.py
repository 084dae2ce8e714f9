"""Editing with a trained unconditional model: inpainting (RePaint) and image-to-image (SDEdit).

Both are plain functions over a :class:`~ddpmkit.diffusion.Denoiser`, next to the samplers:

- :func:`repaint` (``repaint.py``): fill in the unknown pixels of an image given a mask, Lugmayr et al. 2022;
- :func:`sdedit` (``sdedit.py``): noise an image to t0 = strength x T and run any registered sampler from there,
  Meng et al. 2022;
- ``latent.py``: both on a latent diffusion run, in pixels at the edges (encode, edit the latents, decode; the
  pixel mask reduced to the latent grid and the known pixels pasted back);
- ``masks.py``: masks (files, shortcuts) and input images (files, ``digits:I``).

The command-line glue (``ddpmkit inpaint``, ``ddpmkit edit``) is :mod:`ddpmkit.edit.commands`.
"""

from .latent import latent_factor, latent_mask, paste_known, repaint_latent, sdedit_latent
from .masks import MASK_SHORTCUTS, EditError, check_mask, load_images, load_mask, make_mask, masked_view, parse_mask
from .repaint import DEFAULT_JUMP, DEFAULT_RESAMPLE, repaint, repaint_levels, repaint_model_calls
from .sdedit import check_strength, sdedit, sdedit_timesteps

__all__ = ["EditError", "MASK_SHORTCUTS", "make_mask", "load_mask", "parse_mask", "check_mask", "load_images",
           "masked_view", "repaint", "repaint_levels", "repaint_model_calls", "DEFAULT_JUMP", "DEFAULT_RESAMPLE",
           "sdedit", "sdedit_timesteps", "check_strength", "latent_factor", "latent_mask", "paste_known",
           "repaint_latent", "sdedit_latent"]
