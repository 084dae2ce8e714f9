"""Gamma_t of the analytic variance (Analytic-DPM) measured on a run's own training images.

``Run`` stores Gamma_t (``Run.gamma``, ``Run.save_gamma``) and asks this module to measure it when a command wants
the analytic variance of a run that has none. Measuring loads the run's data set and runs its Denoiser over it; the
run is passed in, so this module sits beside ``run.py`` and below nothing it calls. A latent run's network denoises
latents, so its images are encoded by its autoencoder (batch by batch, on the network's device) before Gamma_t is
measured on them.
"""

from __future__ import annotations

import torch

from .errors import CheckpointError

__all__ = ["estimate_run_gamma", "GAMMA_FILE"]

GAMMA_FILE = "analytic_gamma.safetensors"  # Gamma_t of the analytic variance, written by `ddpmkit eval variance`


def estimate_run_gamma(run, *, n: int = 256, batch_size: int = 32, seed: int = 0, ema: bool = True, data=None,
                       progress=None) -> tuple[torch.Tensor, dict]:
    """Gamma_t = E||eps_theta(x_t, t)||^2 / d for every t (Analytic-DPM), over ``n`` training images of the run's
    data (or of ``data``), a latent run's encoded into its latents; returns (gamma [T], the note that
    ``Run.save_gamma`` records)."""
    from .data import load_dataset
    from .diffusion.variance import estimate_gamma
    from .images import from_uint8

    train = run.config.get("train") or {}
    source = data if data is not None else train.get("data", "digits")
    image_size, channels = train.get("image_size"), train.get("channels")
    if run.is_latent:  # the images the autoencoder encodes, not the latents' shape
        channels, image_size, _ = run.pixel_shape
    ds = load_dataset(source, image_size=image_size, channels=channels,
                      data_dir=train.get("data_dir"), download=False, split="train", progress=False)
    images = ds.images[:n]
    labels = ds.labels[:n] if run.class_cond and ds.labels is not None else None
    if run.class_cond and labels is None:
        raise CheckpointError(f"{run.dir} is class-conditional, and {source} has no labels to estimate Gamma_t")
    den = run.denoiser(ema=ema, variance="small")
    space = run.latent_space().to(den.device) if run.is_latent else None

    def batch(i):
        x = images[i:i + batch_size]
        x = from_uint8(x) if x.dtype == torch.uint8 else x.float()
        if space is not None:  # the network's data: the scaled latents
            x = space.encode(x.to(den.device))
        return x if labels is None else (x, labels[i:i + batch_size])

    batches = (batch(i) for i in range(0, images.shape[0], batch_size))
    gamma, used = estimate_gamma(den, batches, seed=seed, progress=progress)
    ck = run.checkpoint(verify=False, parts=("train",))  # the one read already made by the denoiser
    note = {"file": GAMMA_FILE, "n": used, "seed": seed, "ema": ema, "step": ck.step, "source": str(source)}
    if space is not None:
        note["space"] = "latent"
    return gamma, note
