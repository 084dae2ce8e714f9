"""The diffusers pipelines of ddpmkit exports that diffusers' own pipelines cannot run.

``ddpmkit export-diffusers`` copies this file into the export folder as ``pipeline.py`` and names one of its classes
in ``model_index.json`` (``"_class_name": ["pipeline", "ClassConditionalDDPMPipeline"]``, diffusers' convention for
a pipeline defined beside its weights), so that diffusers loads it with the folder::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)  # runs FOLDER/pipeline.py
    images = pipe(class_labels=[3, 7], guidance=0.5).images

- ``ClassConditionalDDPMPipeline``: a class-conditional run, pixel or latent (``DDPMPipeline`` and ``LDMPipeline``
  pass no labels);
- ``LatentDDPMPipeline``: an unconditional latent run whose latent map ``LDMPipeline`` cannot apply (a per-channel
  scale, or a shift: ``LDMPipeline`` divides by one ``scaling_factor`` and shifts nothing). Called as
  ``pipe(batch_size=4).images``.

A latent run's export has a ``vae`` (an ``AutoencoderKL``) and its latent map in ``model_index.json``: the U-Net
samples latents z, and the images are ``vae.decode(z / latent_scale + latent_shift)``, per channel, exactly as
ddpmkit decodes them. It needs torch and diffusers only; ddpmkit never imports it (ddpmkit itself does not need
diffusers).
"""

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """A class-conditional ``UNet2DModel`` (``num_class_embeds`` rows: K classes, then the null class) stepped by
    any diffusers scheduler, with classifier-free guidance. ``null_class`` is the label that means "no class"
    (K; ``unet/class_names.json`` has it too, with the class names), or None for a model that cannot be guided.

    With a ``vae`` the U-Net works on latents, decoded as ``vae.decode(z / latent_scale + latent_shift)``;
    ``latent_scale`` and ``latent_shift`` are one number or one per latent channel (default: the vae's
    ``scaling_factor`` and ``shift_factor``, diffusers' convention)."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 null_class: int | None = None, latent_scale=None, latent_shift=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(null_class=null_class, latent_scale=latent_scale, latent_shift=latent_shift)

    @torch.no_grad()
    def __call__(self, class_labels, guidance: float = 0.0, num_inference_steps: int | None = None,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **step_kwargs):
        """One image per label of ``class_labels`` (a list of ints, one int, or a tensor).

        guidance: ddpmkit's classifier-free guidance weight w, eps = (1 + w) eps(x, c) - w eps(x, null) (Ho &
            Salimans 2022 eq. 6), from one doubled batch; w = 0 is the conditional model alone, in one undoubled
            call. diffusers' ``guidance_scale`` s is 1 + w (s = 1.5 is w = 0.5).
        num_inference_steps: the scheduler's number of steps (default: all of its ``num_train_timesteps``).
        generator, latents: x_T (the initial noise, latents of a latent model) is drawn from ``generator`` unless
            given as ``latents`` [B, C, H, W].
        output_type: "pil", "np" (float [B, H, W, C] in [0, 1]) or "pt" (float [B, C, H, W] in [0, 1]).
        step_kwargs: passed to ``scheduler.step``, e.g. ``eta=0.0, use_clipped_model_output=True`` for a
            DDIMScheduler (ddpmkit's own DDIM always re-derives eps from the clipped x0).
        """
        y = torch.as_tensor(class_labels, dtype=torch.long, device=self.device).reshape(-1)
        n_embeds, null = self.unet.config.num_class_embeds, self.config.null_class
        if n_embeds is None:
            raise ValueError("this U-Net takes no class labels")
        if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= n_embeds:
            raise ValueError(f"class_labels must be labels in 0..{n_embeds - 1}, got {class_labels!r}")
        if guidance and null is None:
            raise ValueError("this model has no null class, so it cannot be guided: use guidance=0")
        return self._generate(y.numel(), y, guidance, num_inference_steps, generator, latents, output_type,
                              return_dict, step_kwargs)

    def _generate(self, batch, y, guidance, num_inference_steps, generator, latents, output_type, return_dict,
                  step_kwargs):
        device, dtype = self.device, self.unet.dtype
        size = self.unet.config.sample_size
        shape = (batch, self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one per sample), got {tuple(latents.shape)}")
        x = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        if guidance:  # the doubled batch: each label, then the null class in its place
            y = torch.cat([y, torch.full_like(y, self.config.null_class)])
        C = self.unet.config.in_channels
        self.scheduler.set_timesteps(num_inference_steps or self.scheduler.config.num_train_timesteps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            out = self.unet(torch.cat([x_in, x_in]) if guidance else x_in, t, class_labels=y).sample
            if guidance:
                out_c, out_u = out.chunk(2)
                # Ho & Salimans 2022 eq. 6 on the raw output: eps, x0 and v are all affine in eps with the same
                # coefficients at (x_t, t). A learned variance (channels C..2C) stays the conditional one (GLIDE).
                out = torch.cat([(1.0 + guidance) * out_c[:, :C] - guidance * out_u[:, :C], out_c[:, C:]], dim=1)
            x = self.scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        if self.vae is not None:
            x = self.decode_latents(x)
        image = (x / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)

    def latent_map(self):
        """(scale, shift), float32 [1, C, 1, 1] each: diffusion latents z are ``(vae mean - shift) * scale``."""
        cfg, vcfg = self.config, self.vae.config
        scale = cfg.latent_scale if cfg.latent_scale is not None else vcfg.scaling_factor
        shift = cfg.latent_shift if cfg.latent_shift is not None else (getattr(vcfg, "shift_factor", None) or 0.0)
        C = vcfg.latent_channels
        scale, shift = (torch.as_tensor(v, dtype=torch.float32, device=self.device).reshape(-1).expand(C)
                        .reshape(1, C, 1, 1) for v in (scale, shift))
        return scale, shift

    @torch.no_grad()
    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] (not clamped) of diffusion latents z: ``vae.decode(z / scale + shift)``."""
        scale, shift = self.latent_map()
        z = z.float() / scale + shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float()


class LatentDDPMPipeline(ClassConditionalDDPMPipeline):
    """An unconditional ``UNet2DModel`` on the latents of a ``vae``, decoded with the exact latent map
    ``vae.decode(z / latent_scale + latent_shift)`` (per channel), which ``LDMPipeline`` cannot express."""

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, num_inference_steps: int | None = None, generator=None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
                 **step_kwargs):
        """``batch_size`` images (the number of ``latents`` when they are given); the other arguments are
        :meth:`ClassConditionalDDPMPipeline.__call__`'s."""
        if self.unet.config.num_class_embeds is not None:
            raise ValueError("this U-Net is class-conditional: use ClassConditionalDDPMPipeline")
        batch = latents.shape[0] if latents is not None else int(batch_size)
        return self._generate(batch, None, 0.0, num_inference_steps, generator, latents, output_type, return_dict,
                              step_kwargs)
