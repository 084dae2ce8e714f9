"""ddpmkit: denoising diffusion probabilistic models (DDPM, DDIM) for images."""

__version__ = "0.1.0"
