"""LDM's KL autoencoder as a training task (Rombach et al. 2022, sec. 3; its ``contperceptual.py`` loss).

Two optimizers, in this order within a step:

* ``autoencoder``: L1 reconstruction (+ a user's perceptual distance) + ``kl_weight`` * KL of the posterior, and
  from ``disc_start`` on the generator's adversarial loss, weighted by ``disc_weight`` times LDM's adaptive weight
  (the ratio of the two losses' gradient norms at the decoder's last layer);
* ``discriminator`` (with ``disc_weight > 0``, from ``disc_start``): the hinge loss of a PatchGAN on the real
  images and on the autoencoder's reconstructions of this step, detached.

The posterior's noise of every step is drawn for the whole global batch from the task's generator, identically on
every rank, so a run is the same on any number of processes and a resume repeats it bit for bit.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...data import Batcher, load_dataset
from ...data.holdout import split_for_training
from ...errors import ConfigError
from ...models.autoencoder import AutoencoderKL
from ...models.autoencoder_loss import (adaptive_weight, generator_loss, hinge_d_loss_per_sample, kl_per_pixel,
                                        load_perceptual, reconstruction_l1)
from ...models.discriminator import PatchDiscriminator
from ..task import LossOut, Meter, OptimizerSpec, Task, TaskContext

__all__ = ["AutoencoderTask", "AUTOENCODER_COLUMNS"]

# metrics.csv's columns of an autoencoder run: the loss's parts, the discriminator's loss, --eval-every's PSNR
AUTOENCODER_COLUMNS = ["rec", "kl", "g_loss", "d_weight", "d_loss", "psnr"]


class AutoencoderMeter(Meter):
    """The mean of each part of the loss over the steps since the last row."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def put(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def add(self, per_sample, info, scalars) -> None:
        for k, v in scalars.items():
            self.put(k, float(v))

    def row(self) -> dict:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        self.sums, self.counts = {}, {}
        return out


class AutoencoderTask(Task):
    """An :class:`~ddpmkit.models.autoencoder.AutoencoderKL` (and a PatchGAN) trained on LDM's loss."""

    def __init__(self, cfg, ctx: TaskContext):
        self.cfg, self.ctx = cfg, ctx
        data = ctx.dist.main_first(lambda: load_dataset(
            cfg.data, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
            download=cfg.download, split="train", strict=cfg.strict, progress=not ctx.quiet))
        if data.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ConfigError(f"the data has shape {tuple(data.images.shape[1:])}, the autoencoder expects "
                              f"{(cfg.channels, cfg.image_size, cfg.image_size)}")
        data, self.held = split_for_training(data, cfg, progress=not ctx.quiet)
        self.num_images = data.num_images
        self.batcher = Batcher(data.images, cfg.batch_size, device=ctx.device, flip=cfg.flip, seed=cfg.seed)
        del data
        self.latent_shape: tuple[int, int, int] | None = None  # the posterior's shape, known in build()
        self.gen = torch.Generator(device=ctx.device)  # the posterior's noise of the training batches
        self.gen.manual_seed(cfg.seed + 1)
        self.perceptual = None
        if cfg.perceptual:
            shape = (cfg.channels, cfg.image_size, cfg.image_size)
            self.perceptual = load_perceptual(cfg.perceptual, image_shape=shape).to(ctx.device)
        self._recon: dict[int, torch.Tensor] = {}  # this step's reconstructions, by micro-batch, for the discriminator
        self._meter: AutoencoderMeter | None = None
        self._features = False  # --eval-every's feature network, chosen at its first use

    # ------------------------------------------------------------------ the networks
    def build(self) -> dict[str, torch.nn.Module]:
        cfg = self.cfg
        ae = AutoencoderKL.from_config(cfg.model_config()).to(self.ctx.device)
        self.autoencoder = ae  # unwrapped: the adaptive weight differentiates at its last layer
        self.latent_shape = ae.latent_shape(cfg.image_size)
        nets = {"autoencoder": ae}
        if cfg.gan:
            nets["discriminator"] = PatchDiscriminator(**cfg.discriminator_config()).to(self.ctx.device)
        return nets

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        specs = {"autoencoder": OptimizerSpec(models["autoencoder"].parameters())}
        if self.cfg.gan:
            specs["discriminator"] = OptimizerSpec(models["discriminator"].parameters(),
                                                   lr_scale=self.cfg.disc_lr_scale, start_step=self.cfg.disc_start)
        return specs

    # ------------------------------------------------------------------ one step
    def batch(self, step: int):
        """(x, the posterior's noise, step) of this rank's share of the global batch of ``step``."""
        dctx = self.ctx.dist
        x = self.batcher.next_batch(False, rank=dctx.rank, world_size=dctx.world_size)
        B, per = self.cfg.batch_size, x.shape[0]
        lo = dctx.rank * per
        noise = torch.randn((B,) + tuple(self.latent_shape), generator=self.gen, device=self.gen.device)
        self._recon.clear()
        return x, noise[lo:lo + per].to(x.device), step

    def loss(self, name, batch, part: slice, nets) -> LossOut:
        x_all, noise, step = batch
        x = x_all[part]
        cfg = self.cfg
        if name == "discriminator":  # the hinge loss on real images and this step's reconstructions
            fake = self._recon.pop(part.start)
            d = hinge_d_loss_per_sample(nets["discriminator"](x), nets["discriminator"](fake))
            return LossOut(d.mean(), d.detach())
        recon, posterior = nets["autoencoder"](x, noise=noise[part])
        rec = reconstruction_l1(x, recon)
        if self.perceptual is not None:
            rec = rec + cfg.perceptual_weight * self.perceptual(x, recon).reshape(-1)
        kl = kl_per_pixel(posterior.kl(), x[0].numel())
        per_sample = rec + cfg.kl_weight * kl
        total = per_sample.mean()
        scalars = {"rec": rec.detach().mean(), "kl": kl.detach().mean()}
        if cfg.gan and step >= cfg.disc_start:
            g = generator_loss(nets["discriminator"](recon))
            # LDM's adaptive weight, with the reconstruction loss as LDM's nll_loss (it has no KL term); of the global
            # batch's gradients, so that it is the same on any number of processes
            w = cfg.disc_weight * adaptive_weight(rec.mean(), g, self.autoencoder.last_layer,
                                                  reduce=self._mean_over_ranks)
            total = total + w * g
            scalars.update(g_loss=g.detach(), d_weight=w)  # adaptive_weight is detached
            self._recon[part.start] = recon.detach()
        return LossOut(total, per_sample.detach(), None, scalars)

    def _mean_over_ranks(self, grad: torch.Tensor) -> torch.Tensor:
        """The mean of a gradient over the processes (itself on one process)."""
        dctx = self.ctx.dist
        if not dctx.enabled:
            return grad
        return dctx.all_reduce_(grad.detach().clone()) / dctx.world_size

    def updated(self, name, per_sample, info) -> None:
        if name == "discriminator" and self._meter is not None:
            self._meter.put("d_loss", float(per_sample.mean()))

    def meter(self) -> Meter:
        self._meter = AutoencoderMeter()
        return self._meter

    def metrics_columns(self) -> list[str]:
        return list(AUTOENCODER_COLUMNS)

    # ------------------------------------------------------------------ the run's files
    def config_json(self) -> dict:
        return self.cfg.to_json()

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "batcher": self.batcher.state_dict(), "num_images": self.num_images}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"].cpu().to(torch.uint8))
        self.batcher.load_state_dict(state["batcher"])

    # ------------------------------------------------------------------ pictures and quality
    def sample_grid(self, ema, path: Path) -> Path | None:
        """Held-out originals beside their reconstructions by the EMA weights."""
        from ...metrics.reconstruction import reconstruct, save_reconstruction_figure

        if self.cfg.num_samples <= 0 or self.held is None:
            return None
        originals = self.held[:self.cfg.num_samples]  # uint8, as save_reconstruction_figure takes them
        recon = reconstruct(ema(), originals, device=self.ctx.device)
        return save_reconstruction_figure(originals, recon.cpu(), path, n=len(originals))

    def evaluate(self, ema) -> dict | None:
        """--eval-every: the held-out PSNR and the Frechet distance of the reconstructions to the originals."""
        from ...metrics.reconstruction import evaluate_reconstruction

        if self.held is None:
            return None
        t0 = time.perf_counter()
        if self._features is False:  # chosen once: the digits classifier, Inception, or none
            from ...metrics.reconstruction import feature_network

            self._features = feature_network(self.cfg.data, log=self.ctx.log)
        r = evaluate_reconstruction(ema(), self.held[:self.cfg.eval_n], features=self._features,
                                    device=self.ctx.device)
        # without a feature network fd is None: the bar shows the PSNR alone (progress.fd_text)
        return {"psnr": r.psnr, "fd": r.fd, "fd_stderr": r.fd_stderr, "seconds": time.perf_counter() - t0}
