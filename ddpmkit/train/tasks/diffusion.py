"""The diffusion model as a training task: a U-Net trained on DDPM's loss (algorithm 1) and its variants.

Data comes from memory through :class:`ddpmkit.data.Batcher`; each step's timesteps, noise and label dropout are
drawn for the whole global batch from one stream, identically on every rank, so that a run is the same on any
number of processes and a resume repeats it bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...data import Batcher, load_dataset
from ...diffusion import Denoiser, NoiseSchedule, sample_timesteps, training_losses
from ...diffusion.losses import LossSecondMomentSampler, edm_training_losses, sample_edm_timesteps
from ...errors import ConfigError
from ...models.unet import UNet
from ...rng import derive_seed
from ...store.metrics_log import NUM_BUCKETS
from ..task import LossOut, Meter, OptimizerSpec, Task, TaskContext

__all__ = ["DiffusionTask", "uncond_mask", "class_names_of"]

_UNCOND_STREAM = 0x6E756C6C  # "null": tags the stream of the label dropout among the seeds derived from a run's


def uncond_mask(seed: int, step: int, batch_size: int, p_uncond: float) -> torch.Tensor:
    """Which labels of training step ``step``'s global batch become the null class: bool [batch_size].

    Each label independently with probability ``p_uncond`` (Ho & Salimans 2022, alg. 1: c <- null with
    probability p_uncond), from a CPU generator seeded with (seed, step) alone: the draw needs no state in the
    checkpoint, so a resume repeats it bit for bit, and it is the same on any number of processes.
    """
    g = torch.Generator(device="cpu").manual_seed(derive_seed(seed, _UNCOND_STREAM, step))
    return torch.rand(batch_size, generator=g, dtype=torch.float64) < p_uncond


def class_names_of(data) -> tuple[str, ...] | None:
    """The class names of a dataset with labels (``"0".."K-1"`` when it names none), None without labels."""
    if data.labels is None:
        return None
    if data.class_names is not None:
        return tuple(data.class_names)
    return tuple(str(k) for k in range(int(data.labels.max()) + 1 if data.labels.numel() else 1))


class TimestepBuckets(Meter):
    """metrics.csv's ``loss_t0..9``: the mean loss in each tenth of the timesteps since the last row."""

    def __init__(self, T: int, device):
        self.T = T
        self.sum = torch.zeros(NUM_BUCKETS, device=device, dtype=torch.float64)
        self.n = torch.zeros(NUM_BUCKETS, device=device, dtype=torch.float64)

    def add(self, per_sample, info, scalars) -> None:
        t = info.round().long() if info.is_floating_point() else info  # EDM's real-valued t: its nearest step
        bucket = (t * NUM_BUCKETS) // self.T
        self.sum.index_add_(0, bucket, per_sample.double())
        self.n.index_add_(0, bucket, torch.ones_like(per_sample, dtype=torch.float64))

    def row(self) -> dict:
        means, counts = (self.sum / self.n.clamp(min=1)).tolist(), self.n.tolist()
        self.sum.zero_(), self.n.zero_()
        return {f"loss_t{i}": v if n > 0 else None for i, (v, n) in enumerate(zip(means, counts))}


class DiffusionTask(Task):
    """A U-Net that denoises, trained on ``training_losses`` (eps, x0 or v; L_simple, L_hybrid or L_vlb), or with
    ``--precond edm`` on ``edm_training_losses`` (EDM's preconditioning, its loss and its log-normal noise levels)."""

    def __init__(self, cfg, ctx: TaskContext):
        self.cfg, self.ctx = cfg, ctx
        device, dctx = ctx.device, ctx.dist
        # rank 0 loads (and downloads, if asked) first, so that ranks never race on the data directory
        data = dctx.main_first(lambda: load_dataset(
            cfg.data, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
            download=cfg.download, split="train", strict=cfg.strict, progress=not ctx.quiet))
        if data.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ConfigError(f"the data has shape {tuple(data.images.shape[1:])}, the model expects "
                              f"{(cfg.channels, cfg.image_size, cfg.image_size)}")
        self.num_images = data.num_images
        self.class_names = class_names_of(data) if cfg.class_cond else None
        if cfg.class_cond and self.class_names is None:
            raise ConfigError(f"--class-cond needs labelled images, and {cfg.data} has no labels (digits and "
                              f"CIFAR-10 have theirs; a folder is labelled by its class subfolders)")
        self.null_class = None if self.class_names is None else len(self.class_names)  # the last embedding row
        # Class labels travel with the images only when the network takes them.
        self.class_cond = cfg.class_cond
        labels = data.labels if self.class_cond else None
        # a latent run (--autoencoder) diffuses the images' latents, encoded once (and cached); else the images
        self.latent = None  # a latent run's PreparedLatents (its space, config.json section, latent shape)
        self.shape = (cfg.channels, cfg.image_size, cfg.image_size)  # of what the U-Net denoises
        if cfg.autoencoder:
            from ..latent_data import prepare_latents

            self.latent, latents, mirrored = prepare_latents(cfg, data.images, ctx)
            self.shape = self.latent.shape
            self.batcher = Batcher(latents, cfg.batch_size, device=device, flip=cfg.flip, seed=cfg.seed,
                                   labels=labels, mirrored=mirrored)
            del latents, mirrored
        else:
            self.batcher = Batcher(data.images, cfg.batch_size, device=device, flip=cfg.flip, seed=cfg.seed,
                                   labels=labels)
        del data
        self.schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T).to(device)
        self.gen = torch.Generator(device=device)  # timesteps and noise of the training batches
        self.gen.manual_seed(cfg.seed + 1)
        # --timestep-sampler loss-second-moment (Improved DDPM sec. 3.3): its loss history is checkpointed
        self.t_sampler = LossSecondMomentSampler(cfg.T) if cfg.timestep_sampler == "loss-second-moment" else None
        self._probe = False  # --eval-every's feature network, built at its first use

    # ------------------------------------------------------------------ the networks
    def build(self) -> dict[str, torch.nn.Module]:
        latent_shape = None if self.latent is None else self.shape
        return {"model": UNet(**self.cfg.model_config(self.null_class, latent_shape)).to(self.ctx.device)}

    def optimizers(self, models) -> dict[str, OptimizerSpec]:
        return {"model": OptimizerSpec(models["model"].parameters())}

    # ------------------------------------------------------------------ one step
    def images(self, step: int):
        """(x0, y, lo): this rank's share of the images (and labels, or None) of the global batch of ``step``, and
        where that share begins in the global batch. With label dropout, each label becomes the null class with
        probability ``p_uncond`` (Ho & Salimans 2022, for classifier-free guidance)."""
        cfg, dctx = self.cfg, self.ctx.dist
        batch = self.batcher.next_batch(self.class_cond, rank=dctx.rank, world_size=dctx.world_size)
        x0, y = batch if self.class_cond else (batch, None)
        per = x0.shape[0]
        lo = dctx.rank * per
        if y is not None and cfg.p_uncond > 0:
            drop = uncond_mask(cfg.seed, step, cfg.batch_size, cfg.p_uncond)[lo:lo + per].to(self.ctx.device)
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        return x0, y, lo

    def batch(self, step: int):
        """(x0, y, t, noise, importance weights) of this rank's share of the global batch of ``step``."""
        cfg, device = self.cfg, self.ctx.device
        x0, y, lo = self.images(step)
        # The timesteps and noise of the whole global batch come from one stream, drawn identically on every
        # rank (t first, then the noise, as training_losses would draw them); each rank takes its slice. The
        # run is then the same on any number of processes, up to the order of floating-point sums. An EDM run
        # draws real-valued t of log-normal noise levels (EDM table 1) in place of the uniform integer t.
        B, per = cfg.batch_size, x0.shape[0]
        if cfg.precond == "edm":
            t_all, w_all = sample_edm_timesteps(B, self.schedule, cfg.p_mean, cfg.p_std, generator=self.gen,
                                                device=device), None
        elif self.t_sampler is None:
            t_all, w_all = sample_timesteps(B, cfg.T, generator=self.gen, device=device), None
        else:  # importance sampling: every rank draws the same global batch from the same history
            t_all, w_all = self.t_sampler.sample(B, generator=self.gen, device=device)
        noise_all = torch.randn((B,) + tuple(x0.shape[1:]), generator=self.gen, device=self.gen.device,
                                dtype=x0.dtype).to(device)
        w = None if w_all is None else w_all[lo:lo + per]
        return x0, y, t_all[lo:lo + per], noise_all[lo:lo + per], w

    def loss(self, name, batch, part: slice, nets) -> LossOut:
        x0, y, t, noise, w = batch
        cfg = self.cfg
        if cfg.precond == "edm":  # EDM eq. 8: lambda(sigma) ||D - x0||^2 of the preconditioned network
            losses, t_k = edm_training_losses(nets["model"], self.schedule, x0[part],
                                              sigma_data=cfg.precond_sigma_data,
                                              t=t[part], noise=noise[part], cond=None if y is None else y[part])
            return LossOut(losses.mean(), losses.detach(), t_k)
        losses, t_k = training_losses(nets["model"], self.schedule, x0[part], objective=cfg.objective, t=t[part],
                                      noise=noise[part], cond=None if y is None else y[part],
                                      loss_weight=cfg.loss_weight, min_snr_gamma=cfg.min_snr_gamma,
                                      vlb_only=cfg.vlb_only)
        # importance weights 1 / (T p_t) keep the objective that of uniform t (Improved DDPM sec. 3.3)
        weighted = losses if w is None else losses * w[part]
        return LossOut(weighted.mean(), losses.detach(), t_k)

    def updated(self, name, per_sample, info) -> None:
        if self.t_sampler is not None:  # the global batch's unweighted losses, the same on every rank
            self.t_sampler.update(info, per_sample)

    def meter(self) -> Meter:
        return TimestepBuckets(self.cfg.T, self.ctx.device)

    def metrics_columns(self) -> list[str]:
        return [f"loss_t{i}" for i in range(NUM_BUCKETS)]  # TimestepBuckets.row's

    # ------------------------------------------------------------------ the run's files
    def write_files(self, run_dir: Path) -> None:
        if self.latent is not None:  # the run's own copy of its autoencoder (latent_data.py)
            from ..latent_data import save_autoencoder_copy

            save_autoencoder_copy(run_dir, self.latent)

    def config_json(self) -> dict:
        return self.cfg.to_json(self.class_names, None if self.latent is None else self.latent.info)

    def state_dict(self) -> dict:
        state = {"gen": self.gen.get_state(), "batcher": self.batcher.state_dict(), "num_images": self.num_images}
        if self.t_sampler is not None:
            state["t_sampler"] = self.t_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"].cpu().to(torch.uint8))
        self.batcher.load_state_dict(state["batcher"])
        if self.t_sampler is not None and "t_sampler" in state:  # absent: a run that sampled t uniformly so far
            self.t_sampler.load_state_dict(state["t_sampler"])

    # ------------------------------------------------------------------ pictures and quality
    def reading(self, net, objective: str | None = None, **kw) -> Denoiser:
        """A Denoiser of ``net`` on this run's schedule and its EDM preconditioning, if any (``objective``: the
        run's by default); ``kw`` are the Denoiser's other settings. The sample grids, the --eval-every probe and a
        distillation's teachers and students read their networks through it."""
        return Denoiser(net, self.schedule, objective or self.cfg.objective, precond=self.cfg.precond_sigma_data,
                        **kw)

    def denoiser(self, model: torch.nn.Module) -> Denoiser:
        """The Denoiser of the sample grids and the --eval-every probe, with the settings ``Run.denoiser`` gives
        ``ddpmkit sample``: the run's objective and variance, x0 clipped (sample's default --clip), its null class."""
        # analytic needs Gamma_t of trained weights (`ddpmkit eval variance` estimates it after training), which a run
        # in training does not have: it draws with beta_tilde, the lower bound of that variance (Analytic-DPM thm. 2)
        variance = "small" if self.cfg.variance == "analytic" else self.cfg.variance
        # latents are not bounded by [-1, 1] as pixels are: no clipping of x0_hat there (LDM clips none); the
        # decoder turns finished samples into images
        latent = self.latent is not None
        return self.reading(model, variance=variance, clip_x0=not latent, null_cond=self.null_class,
                            decoder=self.latent.space.decode if latent else None)

    def drawing(self, purpose: str) -> dict:
        """How the sample grids (``purpose`` "grid") and the --eval-every probe ("eval") draw: ``sampler`` and
        ``steps`` (the run's --sample-*/--eval-* settings), and the guidance weight of a class-conditional run."""
        from ...diffusion.denoiser import DEFAULT_GUIDANCE

        cfg = self.cfg
        sampler, steps = ((cfg.sample_sampler, cfg.sample_steps) if purpose == "grid" else
                          (cfg.eval_sampler, cfg.eval_steps))
        return {"sampler": sampler, "steps": steps, "guidance": DEFAULT_GUIDANCE if self.class_cond else None}

    def sample_grid(self, ema, path: Path) -> Path | None:
        from ...samplers import sample
        from ...viz.grids import save_grid, save_labelled_grid

        if self.cfg.num_samples <= 0:
            return None
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed + 2)
        n = self.cfg.num_samples
        denoiser = self.denoiser(ema())
        how = self.drawing("grid")
        if self.class_cond:  # one labelled row per class, guided: n // K samples of each (at least one)
            K = len(self.class_names)
            per = max(1, n // K)
            n = per * K
            labels = torch.arange(K, device=self.ctx.device).repeat_interleave(per)
            denoiser = denoiser.with_cond(labels).guided(how["guidance"], self.null_class)
        x = sample(denoiser, (n, *self.shape), sampler=how["sampler"], steps=how["steps"], noise=g)
        x = denoiser.to_pixels(x)
        if self.class_cond:
            return save_labelled_grid(x.cpu(), self.class_names, path)
        return save_grid(x.cpu(), path)

    def evaluate(self, ema) -> dict | None:
        """--eval-every: ``eval_n`` samples from the EMA weights with ``eval_sampler``, the same noise and labels every
        time, their Frechet distance and its standard error (metrics/quality.py); None without a feature network."""
        from ...metrics.quality import QualityProbe

        cfg = self.cfg
        if self._probe is False:  # built once: the classifier, or Inception's reference stats
            images = None
            if str(cfg.data).strip().lower() != "digits":
                images = load_dataset(cfg.data, image_size=cfg.image_size, channels=cfg.channels,
                                      data_dir=cfg.data_dir, split="train", progress=False).images
            self._probe = QualityProbe.for_data(cfg.data, images, log=self.ctx.log)
        if self._probe is None:
            return None
        how = self.drawing("eval")
        return self._probe.measure(
            self.denoiser(ema()), cfg.eval_n, self.shape,
            sampler=how["sampler"], steps=how["steps"], seed=cfg.seed,
            num_classes=None if self.class_names is None else len(self.class_names),
            guidance=how["guidance"], null_class=self.null_class)

