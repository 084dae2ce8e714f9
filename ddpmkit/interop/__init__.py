"""Interop with other libraries' file formats. Today: diffusers (``UNet2DModel`` + its scheduler config,
``AutoencoderKL``, and latent diffusion pipelines of the two)."""

from .diffusers import (diffusers_config_from_unet, diffusion_from_scheduler, export_diffusers, import_diffusers,
                        scheduler_from_diffusion, state_from_diffusers, state_to_diffusers,
                        unet_config_from_diffusers)

__all__ = ["import_diffusers", "export_diffusers", "unet_config_from_diffusers", "diffusers_config_from_unet",
           "state_from_diffusers", "state_to_diffusers", "diffusion_from_scheduler", "scheduler_from_diffusion"]
