"""The networks: the DDPM U-Net."""

from .unet import UNET_PRESETS, UNet, timestep_embedding, unet_from_preset

__all__ = ["UNet", "UNET_PRESETS", "unet_from_preset", "timestep_embedding"]
