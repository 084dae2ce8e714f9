"""The diffusers pipelines of ddpmkit exports that diffusers' own pipelines cannot run.

``ddpmkit export-diffusers`` copies this file into the export folder as ``pipeline.py`` and names one of its classes
in ``model_index.json`` (``"_class_name": ["pipeline", "ClassConditionalDDPMPipeline"]``, diffusers' convention for
a pipeline defined beside its weights), so that diffusers loads it with the folder::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)  # runs FOLDER/pipeline.py
    images = pipe(class_labels=[3, 7], guidance=0.5).images

- ``ClassConditionalDDPMPipeline``: a class-conditional run, pixel or latent (``DDPMPipeline`` and ``LDMPipeline``
  pass no labels);
- ``UnconditionalDDPMPipeline``: an unconditional run that diffusers' own pipelines cannot run: one trained with
  EDM's preconditioning, or a latent run whose latent map ``LDMPipeline`` cannot apply (a per-channel scale, or a
  shift: ``LDMPipeline`` divides by one ``scaling_factor`` and shifts nothing). Called as ``pipe(batch_size=4).images``.
  An unconditional latent run's export names it ``LatentDDPMPipeline``, the same pipeline.

A latent run's export has a ``vae`` (an ``AutoencoderKL``) and its latent map in ``model_index.json``: the U-Net
samples latents z, and the images are ``vae.decode(z / latent_scale + latent_shift)``, per channel, exactly as
ddpmkit decodes them.

A run trained with EDM's preconditioning (Karras et al. 2022, table 1; ``ddpmkit train --precond edm``) has its
``precond_sigma_data`` in ``model_index.json``. Its U-Net is the network F inside EDM's denoiser: at the scheduler's
sample x_t and timestep t, with alpha_bar_t the scheduler's ``alphas_cumprod[t]``, it is called on (c_in x, c_noise)
with x = x_t / sqrt(alpha_bar_t) and EDM's noise level sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t), and
D = c_skip x + c_out F is the clean image's estimate, handed to the scheduler as its ``"sample"`` prediction. Every
scheduler of the DDPM process (one with ``alphas_cumprod``) steps it.

It needs torch and diffusers only; ddpmkit never imports it (ddpmkit itself does not need diffusers).
"""

import math

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """A class-conditional ``UNet2DModel`` (``num_class_embeds`` rows: K classes, then the null class) stepped by
    any diffusers scheduler, with classifier-free guidance. ``null_class`` is the label that means "no class"
    (K; ``unet/class_names.json`` has it too, with the class names), or None for a model that cannot be guided.

    With a ``vae`` the U-Net works on latents, decoded as ``vae.decode(z / latent_scale + latent_shift)``;
    ``latent_scale`` and ``latent_shift`` are one number or one per latent channel (default: the vae's
    ``scaling_factor`` and ``shift_factor``, diffusers' convention).

    With ``precond_sigma_data`` (EDM's sigma_data) the U-Net is read through EDM's preconditioning
    (:meth:`denoised`); None: its output goes to the scheduler as it is."""

    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, vae: AutoencoderKL | None = None,
                 null_class: int | None = None, latent_scale=None, latent_shift=None,
                 precond_sigma_data: float | None = None):
        super().__init__()
        if precond_sigma_data is not None and not (math.isfinite(precond_sigma_data) and precond_sigma_data > 0):
            raise ValueError(f"precond_sigma_data is EDM's sigma_data, a positive number, got {precond_sigma_data!r}")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(null_class=null_class, latent_scale=latent_scale, latent_shift=latent_shift,
                                precond_sigma_data=precond_sigma_data)

    @torch.no_grad()
    def __call__(self, class_labels, guidance: float = 0.0, num_inference_steps: int | None = None,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **step_kwargs):
        """One image per label of ``class_labels`` (a list of ints, one int, or a tensor).

        guidance: ddpmkit's classifier-free guidance weight w, eps = (1 + w) eps(x, c) - w eps(x, null) (Ho &
            Salimans 2022 eq. 6; the same weights on EDM's D for a preconditioned U-Net), from one doubled batch;
            w = 0 is the conditional model alone, in one undoubled call. diffusers' ``guidance_scale`` s is 1 + w
            (s = 1.5 is w = 0.5).
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
        pred = getattr(self.scheduler.config, "prediction_type", None)
        if self.config.precond_sigma_data is not None and pred != "sample":
            raise ValueError("an EDM-preconditioned U-Net gives the clean image D: its scheduler's prediction_type "
                             f"must be 'sample', not {pred!r}")
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            out = self.denoised(torch.cat([x_in, x_in]) if guidance else x_in, t, y)
            if guidance:
                out_c, out_u = out.chunk(2)
                # Ho & Salimans 2022 eq. 6 on the raw output: eps, x0 (EDM's D among them) and v are all affine in
                # eps with the same coefficients at (x_t, t). A learned variance (channels C..2C) stays the
                # conditional one (GLIDE).
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

    def denoised(self, x_t: torch.Tensor, t, class_labels=None) -> torch.Tensor:
        """What the scheduler reads at its sample ``x_t`` and timestep ``t``: the U-Net's output, or with
        ``precond_sigma_data`` EDM's D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (EDM eq. 7), the clean
        image's estimate, at the noise level of the scheduler's alpha_bar at t (float64 inside; x_t's dtype out)."""
        sigma_data = self.config.precond_sigma_data
        if sigma_data is None:
            return self.unet(x_t, t, class_labels=class_labels).sample
        ab = self.alpha_bar(t)
        sigma = ((1.0 - ab) / ab).sqrt()  # EDM sec. 2: x_t = sqrt(alpha_bar) (y + sigma n)
        sd = float(sigma_data)
        total = sigma * sigma + sd ** 2
        c_skip = sd ** 2 / total  # EDM table 1: sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out = sigma * sd / total.sqrt()  # EDM table 1: sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in = 1.0 / total.sqrt()  # EDM table 1: 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = sigma.log() / 4.0  # EDM table 1: ln(sigma) / 4, the U-Net's (real-valued) timestep
        wide = torch.float32 if x_t.device.type == "mps" else torch.float64  # MPS has no float64
        x = x_t.to(wide) / ab.sqrt().item()  # EDM sec. 2: the VP sample as EDM's x = y + sigma n
        noise_label = c_noise.to(x_t.dtype).to(x_t.device).expand(x_t.shape[0])
        F = self.unet((c_in.item() * x).to(x_t.dtype), noise_label, class_labels=class_labels).sample
        D = c_skip.item() * x + c_out.item() * F.to(wide)  # EDM eq. 7: D = c_skip x + c_out F(c_in x; c_noise)
        return D.to(x_t.dtype)

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar at the scheduler's timestep ``t``, float64 on the CPU: its ``alphas_cumprod[t]``; between two
        integer timesteps log alpha_bar is linear in t."""
        table = getattr(self.scheduler, "alphas_cumprod", None)
        if table is None:
            raise ValueError(f"{type(self.scheduler).__name__} has no alphas_cumprod: an EDM-preconditioned U-Net "
                             "needs a scheduler of the DDPM process, whose alpha_bar gives its noise levels")
        ab = torch.as_tensor(table).detach().to("cpu", torch.float64)
        t = float(t)
        lo = min(max(math.floor(t), 0), ab.numel() - 1)
        w = t - lo
        if w <= 0 or lo == ab.numel() - 1:
            return ab[lo]
        return torch.exp((1.0 - w) * ab[lo].log() + w * ab[lo + 1].log())

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


class UnconditionalDDPMPipeline(ClassConditionalDDPMPipeline):
    """An unconditional ``UNet2DModel``, on pixels or on the latents of a ``vae``, that diffusers' own pipelines
    cannot run: read through EDM's preconditioning (``precond_sigma_data``), or decoded with the exact latent map
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


class LatentDDPMPipeline(UnconditionalDDPMPipeline):
    """:class:`UnconditionalDDPMPipeline` under the name that an unconditional latent run's export carries."""
