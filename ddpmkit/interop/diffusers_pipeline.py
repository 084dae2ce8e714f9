"""The diffusers pipeline of a class-conditional ddpmkit export.

``ddpmkit export-diffusers`` copies this file into the export folder as ``pipeline.py`` and names it in
``model_index.json`` (``"_class_name": ["pipeline", "ClassConditionalDDPMPipeline"]``, diffusers' convention for a
pipeline defined beside its weights), so that diffusers loads it with the folder::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("FOLDER", trust_remote_code=True)  # runs FOLDER/pipeline.py
    images = pipe(class_labels=[3, 7], guidance=0.5).images

It needs torch and diffusers only; ddpmkit never imports it (ddpmkit itself does not need diffusers).
"""

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, SchedulerMixin, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor


class ClassConditionalDDPMPipeline(DiffusionPipeline):
    """A class-conditional ``UNet2DModel`` (``num_class_embeds`` rows: K classes, then the null class) stepped by
    any diffusers scheduler, with classifier-free guidance. ``null_class`` is the label that means "no class"
    (K; ``unet/class_names.json`` has it too, with the class names), or None for a model that cannot be guided."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin, null_class: int | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(null_class=null_class)

    @torch.no_grad()
    def __call__(self, class_labels, guidance: float = 0.0, num_inference_steps: int | None = None,
                 generator=None, latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True, **step_kwargs):
        """One image per label of ``class_labels`` (a list of ints, one int, or a tensor).

        guidance: ddpmkit's classifier-free guidance weight w, eps = (1 + w) eps(x, c) - w eps(x, null) (Ho &
            Salimans 2022 eq. 6), from one doubled batch; w = 0 is the conditional model alone, in one undoubled
            call. diffusers' ``guidance_scale`` s is 1 + w (s = 1.5 is w = 0.5).
        num_inference_steps: the scheduler's number of steps (default: all of its ``num_train_timesteps``).
        generator, latents: x_T is drawn from ``generator`` unless given as ``latents`` [B, C, H, W].
        output_type: "pil", "np" (float [B, H, W, C] in [0, 1]) or "pt" (float [B, C, H, W] in [0, 1]).
        step_kwargs: passed to ``scheduler.step``, e.g. ``eta=0.0, use_clipped_model_output=True`` for a
            DDIMScheduler (ddpmkit's own DDIM always re-derives eps from the clipped x0).
        """
        device, dtype = self.device, self.unet.dtype
        y = torch.as_tensor(class_labels, dtype=torch.long, device=device).reshape(-1)
        n_embeds, null = self.unet.config.num_class_embeds, self.config.null_class
        if y.numel() == 0 or int(y.min()) < 0 or int(y.max()) >= n_embeds:
            raise ValueError(f"class_labels must be labels in 0..{n_embeds - 1}, got {class_labels!r}")
        if guidance and null is None:
            raise ValueError("this model has no null class, so it cannot be guided: use guidance=0")
        size = self.unet.config.sample_size
        shape = (y.numel(), self.unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (one per label), got {tuple(latents.shape)}")
        x = latents.to(device, dtype) * self.scheduler.init_noise_sigma
        if guidance:  # the doubled batch: each label, then the null class in its place
            y = torch.cat([y, torch.full_like(y, null)])
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
        image = (x / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> [0, 1]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=image) if return_dict else (image,)
