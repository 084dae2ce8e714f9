"""The networks: the DDPM U-Net and the KL autoencoder of latent diffusion."""

from .autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, DiagonalGaussian, autoencoder_from_preset
from .unet import UNET_PRESETS, UNet, timestep_embedding, unet_from_preset

__all__ = ["UNet", "UNET_PRESETS", "unet_from_preset", "timestep_embedding", "AutoencoderKL", "DiagonalGaussian",
           "AUTOENCODER_PRESETS", "autoencoder_from_preset"]
