"""The training loop and its state: EMA, checkpoints, metrics, exact resume (the settings: :mod:`.config`).

The loop is DDPM algorithm 1 with the paper's optimisation setup (Adam, linear warm-up, gradient clipping, EMA),
run over batches served from memory by :class:`ddpmkit.data.Batcher`. Everything a run needs to continue
exactly (weights, EMA, optimizer, step, every random state, the data order) goes into each checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ..data import Batcher, load_dataset
from ..diffusion import Denoiser, NoiseSchedule, sample_timesteps, training_losses
from ..diffusion.losses import LossSecondMomentSampler
from ..errors import CheckpointError, ConfigError, DdpmkitError
from ..files import atomic_write_text
from ..models.unet import UNet
from ..rng import derive_seed
from ..store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..store.lock import RunLock
from ..store.rundir import prepare_run_dir, read_config, write_config
from . import distributed
from .config import TrainConfig, resume_locked

__all__ = ["Trainer", "EMA", "MetricsLog", "NonFiniteError", "pick_device", "train", "dropout_seed",
           "seed_dropout", "MAX_GRAD_NORM", "uncond_mask", "class_names_of"]

NUM_BUCKETS = 10  # metrics.csv reports the loss in T/10 timestep buckets

# A finite gradient norm above this is treated like a non-finite one. The norm is measured before clipping;
# on a healthy run it stays within O(0.01 .. 100) (the unit-variance eps targets bound the loss), so 1e6 is
# four orders of magnitude beyond any sane value and never fires by accident, while a norm that large
# only comes from a numerical blow-up (an overflow on its way to inf) whose direction is meaningless even
# once clipped, and it would inflate Adam's second moment for thousands of steps.
MAX_GRAD_NORM = 1e6


class NonFiniteError(DdpmkitError):
    """The loss or the gradient norm became NaN or infinite."""


def pick_device(name: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or the named device, checked to exist."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA GPU is available")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps was asked for, but MPS is not available")
    return dev


def describe_machine(device: torch.device, world_size: int = 1) -> dict:
    """What a run trained on, for config.json's ``machine`` section (the report shows it): the device, its name,
    the number of processes and the PyTorch version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import os
        import platform

        name = f"{platform.machine() or 'CPU'}, {torch.get_num_threads()} threads of {os.cpu_count()} cores"
    return {"device": device.type, "name": name, "processes": int(world_size), "torch": torch.__version__}


class EMA:
    """Exponential moving average of the parameters, with a warm-up of the decay.

    decay_t = min(decay, (1 + n) / (10 + n)) after n updates, so that the average of a short run is already
    usable (the average starts at the initial weights and forgets them quickly early on).
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        params = dict(model.state_dict())
        keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach() for k in keys], 1.0 - d)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(params[k])
        self.num_updates += 1

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict, num_updates: int) -> None:
        for k, v in self.shadow.items():
            v.copy_(state[k].to(v.device, v.dtype))
        self.num_updates = int(num_updates)


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the global generator (the dropout masks) on process ``rank`` for training step ``step``.

    A hash of the three numbers, so that nearby seeds, ranks and steps give unrelated streams (``seed + rank``
    would hand rank 1 of seed 0 the stream of rank 0 of seed 1).
    """
    return derive_seed(seed, rank, step)


def seed_dropout(seed: int, rank: int, step: int) -> None:
    """Seed the global generators (CPU and every accelerator), which dropout draws from, for one rank and step."""
    torch.manual_seed(dropout_seed(seed, rank, step))


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


def _lr_at(cfg: TrainConfig, step: int, progress: float | None = None) -> float:
    """Linear warm-up from lr/warmup to lr over the first `warmup` steps, then constant (DDPM appendix B), or
    with ``lr_decay = cosine`` lr * (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts),
    p the fraction of the run done: of --steps, or of --time-limit when ``progress`` (that fraction) is larger."""
    lr = cfg.lr if cfg.warmup <= 0 else cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if getattr(cfg, "lr_decay", "none") == "cosine":
        p = min(1.0, max(step / cfg.steps, progress or 0.0))
        lr *= 0.5 * (1.0 + math.cos(math.pi * p))  # SGDR eq. 5 with eta_min = 0
    return lr


class MetricsLog:
    """metrics.csv of a run, appended row by row; a resume first drops the rows past the checkpoint."""

    COLUMNS = (["step", "loss", "lr", "grad_norm", "img_per_s", "wall_s"] + [f"loss_t{i}" for i in range(NUM_BUCKETS)]
               + ["fd", "fd_stderr"])  # --eval-every's Frechet distance and its standard error, on its steps' rows

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if r and _int_or(r[0], -1) <= resume_step] if rows else []
            if keep:
                atomic_write_text(path, "".join(",".join(r) + "\n" for r in keep))
        if not path.exists():
            atomic_write_text(path, ",".join(self.COLUMNS) + "\n")
        with open(path, newline="") as f:  # a run started by an older version keeps its file's columns
            self.columns = next(csv.reader(f), None) or self.COLUMNS

    def append(self, row: dict) -> None:
        line = ",".join(_fmt(row.get(c)) for c in self.columns) + "\n"
        with open(self.path, "a") as f:
            f.write(line)


def _int_or(s, default):
    try:
        return int(s)
    except ValueError:
        return default


def _fd_text(r: dict) -> str:
    """A quality measurement for the progress bar: ``12.34+-0.56``."""
    se = r.get("fd_stderr")
    return f"{r['fd']:.2f}" + ("" if se is None else f"+-{se:.2f}")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


class Trainer:
    """One training run in a run directory: build or resume, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                 log=None):
        cfg.validate()
        world = distributed.current().world_size if distributed.current().enabled else distributed.env_world_size()
        if cfg.batch_size % world:  # checked before joining the group: every rank stops here at once
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the "
                              f"{world} processes of this run")
        if (cfg.batch_size // world) % cfg.grad_accum:
            raise ConfigError(f"--batch-size {cfg.batch_size} (the global batch) over {world} process"
                              f"{'es' if world > 1 else ''} is {cfg.batch_size // world} images per process, "
                              f"which --grad-accum {cfg.grad_accum} does not split evenly: use a batch size that "
                              f"is a multiple of {world * cfg.grad_accum}")
        # Under torchrun (WORLD_SIZE > 1) join the process group; run() leaves it at the end, an error here too.
        self.dist = distributed.join(pick_device(cfg.device))
        self._lock = None  # rank 0's writer lock of the run directory (store/lock.py), held until run() ends
        try:
            self._init(cfg, run_dir, resume, quiet, log)
        except BaseException:
            self._release_lock()
            distributed.leave()
            raise

    def _take_lock(self) -> None:
        """Rank 0 alone writes the run: a second writer is refused in one line naming the holder."""
        if self.dist.is_main and self._lock is None:
            self._lock = RunLock(self.run_dir).acquire()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _init(self, cfg, run_dir, resume, quiet, log):
        dctx = self.dist
        self.run_dir = Path(run_dir)
        self.quiet = quiet or not dctx.is_main  # only rank 0 shows progress
        quiet = self.quiet
        base_log = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = base_log if dctx.is_main else (lambda msg: None)
        ckpt = None
        if resume:
            # rank 0 checks the directory (a probe write) first; the other ranks only read from it
            dctx.main_first(lambda: (prepare_run_dir(self.run_dir, resume=True), self._take_lock())
                            if dctx.is_main else None)
            stored = TrainConfig.from_json(read_config(self.run_dir))
            changed = [k for k in resume_locked() if getattr(stored, k) != getattr(cfg, k)]
            if changed:
                raise ConfigError(
                    "cannot resume with a changed " + ", ".join(changed) + f" (the run in {self.run_dir} has "
                    + ", ".join(f"{k}={getattr(stored, k)!r}" for k in changed) + ")")
            ckpt = load_checkpoint(self.run_dir)
            for p in ckpt.skipped:
                self.log(f"warning: checkpoint {p} is corrupt; resuming from {ckpt.path} instead")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if dctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dctx.local_rank)
        self.autocast_dtype = (torch.bfloat16 if (cfg.precision == "bf16" or
                                                   (cfg.precision == "auto" and self.device.type == "cuda"))
                               else None)
        # rank 0 loads (and downloads, if asked) first, so that ranks never race on the data directory
        data = dctx.main_first(lambda: load_dataset(
            cfg.data, image_size=cfg.image_size, channels=cfg.channels, data_dir=cfg.data_dir,
            download=cfg.download, split="train", strict=cfg.strict, progress=not quiet))
        if data.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ConfigError(f"the data has shape {tuple(data.images.shape[1:])}, the model expects "
                              f"{(cfg.channels, cfg.image_size, cfg.image_size)}")
        self.num_images = data.num_images
        self.class_names = class_names_of(data) if cfg.class_cond else None
        if cfg.class_cond and self.class_names is None:
            raise ConfigError(f"--class-cond needs labelled images, and {cfg.data} has no labels (digits and "
                              f"CIFAR-10 have theirs; a folder is labelled by its class subfolders)")
        self.null_class = None if self.class_names is None else len(self.class_names)  # the last embedding row

        # The same seed on every rank: identical initial weights. Dropout is reseeded per rank and step (train_step).
        torch.manual_seed(cfg.seed)
        self.model = UNet(**cfg.model_config(self.null_class)).to(self.device)
        self.schedule = NoiseSchedule.from_name(cfg.schedule, cfg.T).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr,
                                          betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        # Class labels travel with the images only when the network takes them.
        self.class_cond = cfg.class_cond
        self.batcher = Batcher(data.images, cfg.batch_size, device=self.device, flip=cfg.flip, seed=cfg.seed,
                               labels=data.labels if self.class_cond else None)
        del data
        self.gen = torch.Generator(device=self.device)  # timesteps and noise of the training batches
        self.gen.manual_seed(cfg.seed + 1)
        # --timestep-sampler loss-second-moment (Improved DDPM sec. 3.3): its loss history is checkpointed
        self.t_sampler = LossSecondMomentSampler(cfg.T) if cfg.timestep_sampler == "loss-second-moment" else None
        self.step = 0
        self.skipped_steps = 0  # steps skipped by skip_nonfinite, over the whole run
        self.last_step_skipped = False
        self.wall_offset = 0.0
        if dctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # the same seed gives every rank the same initial weights; DDP also broadcasts rank 0's
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        else:
            self.ddp = self.model
        self.forward = torch.compile(self.ddp) if cfg.compile else self.ddp

        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resuming {self.run_dir} from step {self.step} ({ckpt.path.name})")

        def prepare():  # rank 0 alone writes in the run directory
            if not dctx.is_main:
                return None
            if ckpt is None:
                prepare_run_dir(self.run_dir, resume=False)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._take_lock()
            config = cfg.to_json(self.class_names)
            config["machine"] = describe_machine(self.device, dctx.world_size)  # of this session, after a resume
            write_config(self.run_dir, config)
            return MetricsLog(self.run_dir / "metrics.csv", resume_step=self.step if ckpt else None)

        self.metrics = dctx.main_first(prepare)

    # ------------------------------------------------------------------ state
    def _train_state(self) -> dict:
        state = {
            "step": self.step,
            "ema_updates": self.ema.num_updates,
            "skipped_steps": self.skipped_steps,
            "wall_s": self.wall_offset + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            # informative only: train_step reseeds the global generators from (seed, rank, step) at every step
            "torch_rng": torch.get_rng_state(),
            "gen": self.gen.get_state(),
            "batcher": self.batcher.state_dict(),
            "num_images": self.num_images,
        }
        if self.t_sampler is not None:
            state["t_sampler"] = self.t_sampler.state_dict()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, ckpt) -> None:
        st = ckpt.train_state or {}
        try:
            self.model.load_state_dict(ckpt.model_state, strict=True)
            if ckpt.optimizer_state is not None:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
            self.ema.load_state_dict(ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state,
                                     st.get("ema_updates", 0))
            self.step = int(st["step"])
            self.skipped_steps = int(st.get("skipped_steps", 0))
            self.wall_offset = float(st.get("wall_s", 0.0))
            torch.set_rng_state(st["torch_rng"])
            self.gen.set_state(st["gen"].cpu().to(torch.uint8))
            self.batcher.load_state_dict(st["batcher"])
            if self.t_sampler is not None and "t_sampler" in st:  # absent: a run that sampled t uniformly so far
                self.t_sampler.load_state_dict(st["t_sampler"])
            if "cuda_rng" in st and torch.cuda.is_available() and len(st["cuda_rng"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(st["cuda_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run: {str(e).splitlines()[0]}") from None
        if self.step != ckpt.step:
            raise CheckpointError(f"checkpoint {ckpt.path} is inconsistent (step {ckpt.step} vs {self.step})")
        # the optimizer's learning rate follows the schedule, not the stored value
        for g in self.optimizer.param_groups:
            g["lr"] = _lr_at(self.cfg, self.step)

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(
            self.run_dir, self.step,
            model_state=self.model.state_dict(),
            ema_state=self.ema.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            train_state=self._train_state(),
            keep=self.cfg.keep,
        )

    def _time_progress(self) -> float | None:
        """The fraction of --time-limit spent in this session (None without a limit or before run())."""
        if self.cfg.time_limit is None or getattr(self, "_t0", None) is None:
            return None
        return (time.perf_counter() - self._t0) / self.cfg.time_limit

    # ------------------------------------------------------------------ one step
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        cfg = self.cfg
        lr = _lr_at(cfg, self.step, self._time_progress())
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        dctx = self.dist
        # Dropout masks come from a stream derived from (seed, rank, step), reseeded at every step: each rank
        # draws its own masks (a shared seed would make them identical across ranks), a 1-process run stays
        # reproducible, and a resume, on any number of processes, needs no per-rank state from the checkpoint.
        seed_dropout(cfg.seed, dctx.rank, self.step)
        batch = self.batcher.next_batch(self.class_cond, rank=dctx.rank, world_size=dctx.world_size)
        x0, y = batch if self.class_cond else (batch, None)
        # The timesteps and noise of the whole global batch come from one stream, drawn identically on every
        # rank (t first, then the noise, as training_losses would draw them); each rank takes its slice. The
        # run is then the same on any number of processes, up to the order of floating-point sums.
        B, per = cfg.batch_size, x0.shape[0]
        lo = dctx.rank * per
        if y is not None and cfg.p_uncond > 0:  # label dropout for classifier-free guidance (Ho & Salimans 2022)
            drop = uncond_mask(cfg.seed, self.step, B, cfg.p_uncond)[lo:lo + per].to(self.device)
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        if self.t_sampler is None:
            t_all, w_all = sample_timesteps(B, cfg.T, generator=self.gen, device=self.device), None
        else:  # importance sampling: every rank draws the same global batch from the same history
            t_all, w_all = self.t_sampler.sample(B, generator=self.gen, device=self.device)
        noise_all = torch.randn((B,) + tuple(x0.shape[1:]), generator=self.gen, device=self.gen.device,
                                dtype=x0.dtype).to(self.device)
        t_rank, noise_rank = t_all[lo:lo + per], noise_all[lo:lo + per]
        # Gradient accumulation: the rank's share in K micro-batches, each loss scaled by 1/K so that the summed
        # gradient is that of the mean over the share (and, after DDP's average over ranks, of the global mean).
        # DDP all-reduces only in the last backward; the earlier ones accumulate locally under no_sync().
        K = cfg.grad_accum
        m = per // K
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts_losses, parts_t = [], []
        for k in range(K):
            sl = slice(k * m, (k + 1) * m)
            cond = None if y is None else y[sl]
            sync = k == K - 1 or not dctx.enabled
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    losses_k, t_k = training_losses(self.forward, self.schedule, x0[sl], objective=cfg.objective,
                                                    t=t_rank[sl], noise=noise_rank[sl], cond=cond,
                                                    loss_weight=cfg.loss_weight, min_snr_gamma=cfg.min_snr_gamma,
                                                    vlb_only=cfg.vlb_only)
                # importance weights 1 / (T p_t) keep the objective that of uniform t (Improved DDPM sec. 3.3)
                weighted = losses_k if w_all is None else losses_k * w_all[lo:lo + per][sl]
                (weighted.mean() / K).backward()
            parts_losses.append(losses_k.detach())
            parts_t.append(t_k)
        losses = parts_losses[0] if K == 1 else torch.cat(parts_losses)
        t = parts_t[0] if K == 1 else torch.cat(parts_t)
        loss = losses.mean()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        # after DDP's all-reduce, so the norm and the clipping are the same on every rank
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)  # the norm before clipping
        if dctx.enabled:  # every rank sees the losses of the whole global batch (for the check and the metrics)
            losses = dctx.all_gather_cat(losses.detach())
            t = dctx.all_gather_cat(t)
            loss = losses.mean()
        loss_ok, norm_ok = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        bad = not (loss_ok and norm_ok and grad_norm.item() <= MAX_GRAD_NORM)
        if dctx.enabled:  # all ranks stop or skip together
            bad = dctx.any(bad, self.device)
        self.last_step_skipped = False
        if bad:
            if not loss_ok:
                what = f"the loss became {loss.item()}"
            elif not norm_ok:
                what = f"the gradient norm became {grad_norm.item()}"
            elif grad_norm.item() > MAX_GRAD_NORM:
                what = f"the gradient norm exploded to {grad_norm.item():.3g} (> {MAX_GRAD_NORM:.0e})"
            else:
                what = "a non-finite value appeared on another process"
            if not cfg.skip_nonfinite:
                raise NonFiniteError(
                    f"{what} at step {self.step + 1}; training stopped and the last checkpoint in "
                    f"{self.run_dir / 'checkpoints'} is intact (try a lower --lr, a longer --warmup, "
                    f"or --skip-nonfinite)")
            # Skip: no optimizer step, no EMA update, gradients dropped. The step counter still advances, so
            # that the step stays the number of batches (and noise draws) consumed: the data order and the
            # random streams of the following steps are those of a run without the fault, and resume is exact.
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.last_step_skipped = True
            self.step += 1
            self.log(f"warning: {what} at step {self.step}; step skipped ({self.skipped_steps} skipped so far)")
            return losses.detach(), t, grad_norm.detach(), lr
        if self.t_sampler is not None:  # the global batch's unweighted losses, the same on every rank
            self.t_sampler.update(t, losses)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return losses.detach(), t, grad_norm.detach(), lr

    # ------------------------------------------------------------------ samples
    def _ema_copy(self) -> torch.nn.Module:
        """A copy of the network with the EMA weights, in eval mode (a copy draws nothing from the random
        generators, and leaves the trained model as it is)."""
        model = copy.deepcopy(self.model).eval()
        model.load_state_dict(self.ema.state_dict())
        return model

    def _denoiser(self, model: torch.nn.Module) -> Denoiser:
        """The Denoiser of the sample grids and the --eval-every probe, with the settings ``Run.denoiser`` gives
        ``ddpmkit sample``: the run's objective and variance, x0 clipped (sample's default --clip), its null class."""
        # analytic needs Gamma_t of trained weights (`ddpmkit eval variance` estimates it after training), which a run
        # in training does not have: it draws with beta_tilde, the lower bound of that variance (Analytic-DPM thm. 2)
        variance = "small" if self.cfg.variance == "analytic" else self.cfg.variance
        return Denoiser(model, self.schedule, self.cfg.objective, variance, clip_x0=True, null_cond=self.null_class)

    def sample_grid(self) -> Path | None:
        from ..viz.figures import save_grid
        from ..samplers import sample

        if self.cfg.num_samples <= 0 or not self.dist.is_main:
            return None
        model = self._ema_copy()
        g = torch.Generator(device="cpu").manual_seed(self.cfg.seed + 2)
        n = self.cfg.num_samples
        denoiser = self._denoiser(model)
        path = self.run_dir / "samples" / f"grid_step_{self.step:09d}.png"
        if self.class_cond:  # one labelled row per class, guided: n // K samples of each (at least one)
            from ..samplers.options import DEFAULT_GUIDANCE
            from ..viz.figures import save_labelled_grid

            K = len(self.class_names)
            per = max(1, n // K)
            n = per * K
            labels = torch.arange(K, device=self.device).repeat_interleave(per)
            denoiser = denoiser.with_cond(labels).guided(DEFAULT_GUIDANCE, self.null_class)
        shape = (n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        x = sample(denoiser, shape, sampler=self.cfg.sample_sampler, steps=self.cfg.sample_steps, noise=g)
        if self.class_cond:
            return save_labelled_grid(x.cpu(), self.class_names, path)
        return save_grid(x.cpu(), path)

    def evaluate_quality(self) -> dict | None:
        """--eval-every: ``eval_n`` samples from the EMA weights with ``eval_sampler``, the same noise and labels every
        time, their Frechet distance and its standard error (metrics/quality.py); None without a feature network."""
        from ..metrics.quality import QualityProbe

        if not self.dist.is_main:
            return None
        if getattr(self, "_probe", False) is False:  # built once: the classifier, or Inception's reference stats
            images = None
            if str(self.cfg.data).strip().lower() != "digits":
                images = load_dataset(self.cfg.data, image_size=self.cfg.image_size, channels=self.cfg.channels,
                                      data_dir=self.cfg.data_dir, split="train", progress=False).images
            self._probe = QualityProbe.for_data(self.cfg.data, images, log=self.log)
        if self._probe is None:
            return None
        from ..samplers.options import DEFAULT_GUIDANCE

        shape = (self.cfg.channels, self.cfg.image_size, self.cfg.image_size)
        return self._probe.measure(
            self._denoiser(self._ema_copy()), self.cfg.eval_n, shape,
            sampler=self.cfg.eval_sampler, steps=self.cfg.eval_steps, seed=self.cfg.seed,
            num_classes=None if self.class_names is None else len(self.class_names),
            guidance=DEFAULT_GUIDANCE if self.class_cond else None, null_class=self.null_class)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to ``cfg.steps`` (or the time limit, or a first SIGINT/SIGTERM: see :class:`GracefulStop`)."""
        stop = GracefulStop(self.run_dir / "checkpoints").install()
        try:
            return self._run(stop)
        finally:
            stop.restore()
            self._release_lock()
            distributed.leave()  # the process group this trainer joined, if any, also on an error

    def _run(self, stop: "GracefulStop") -> dict:
        cfg = self.cfg
        from tqdm import tqdm

        self._t0 = time.perf_counter()
        start_step = self.step
        # A time-limited run (the demo: 150 s, steps 1,000,000) shows its progress in seconds, the step beside it;
        # a bar of steps would read 0/1000000 with an ETA of a day.
        timed = cfg.time_limit is not None
        if timed:
            bar = tqdm(total=float(cfg.time_limit), disable=self.quiet, unit="s", dynamic_ncols=True, file=sys.stderr,
                       desc=f"step {self.step}", bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s "
                                                            "[{elapsed}<{remaining}{postfix}]")
        else:
            bar = tqdm(total=cfg.steps, initial=self.step, disable=self.quiet, unit="step", dynamic_ncols=True,
                       file=sys.stderr, smoothing=0.05)
        window_loss = torch.zeros((), device=self.device, dtype=torch.float64)
        bucket_sum = torch.zeros(NUM_BUCKETS, device=self.device, dtype=torch.float64)
        bucket_n = torch.zeros(NUM_BUCKETS, device=self.device, dtype=torch.float64)
        window_steps, window_t0 = 0, time.perf_counter()
        last_loss = float("nan")
        stop_reason = "steps"
        # --eval-every: the pending values, the last result, its cost
        quality = {"fd": None, "fd_stderr": None, "last": None, "seconds": 0.0}

        def flush_window(lr, grad_norm) -> float:
            """Write one metrics.csv row for the steps since the last one; return their mean loss."""
            nonlocal window_steps, window_t0
            elapsed = time.perf_counter() - window_t0
            mean_loss = (window_loss / (window_steps * cfg.batch_size)).item()
            img_s = window_steps * cfg.batch_size / max(elapsed, 1e-9)
            row = {"step": self.step, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm.item(),
                   "img_per_s": img_s, "wall_s": self.wall_offset + time.perf_counter() - self._t0,
                   "fd": quality["fd"], "fd_stderr": quality["fd_stderr"]}
            quality["fd"] = quality["fd_stderr"] = None
            for i, (v, n) in enumerate(zip((bucket_sum / bucket_n.clamp(min=1)).tolist(), bucket_n.tolist())):
                row[f"loss_t{i}"] = v if n > 0 else None
            if self.metrics is not None:  # rank 0 only
                self.metrics.append(row)
            shown = {} if quality["last"] is None else {"fd": _fd_text(quality["last"])}  # --eval-every's last
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s:.0f}", **shown, refresh=False)
            window_loss.zero_(), bucket_sum.zero_(), bucket_n.zero_()
            window_steps, window_t0 = 0, time.perf_counter()
            return mean_loss

        def measure_quality() -> None:
            r = self.evaluate_quality()
            if r is not None:
                quality.update(fd=r["fd"], fd_stderr=r.get("fd_stderr"), last=r,
                               seconds=quality["seconds"] + r["seconds"])
                bar.set_postfix(fd=_fd_text(r), refresh=False)

        try:
            while self.step < cfg.steps:
                # 0: go on; 1: the time limit; a signal number: SIGINT or SIGTERM arrived. The largest over the
                # ranks, so that all stop together at the same step even when one alone got the signal.
                why = stop.signum or int(timed and time.perf_counter() - self._t0 >= cfg.time_limit)
                if self.dist.enabled:
                    why = self.dist.max_int(why, self.device)
                if why:
                    stop_reason = "time_limit" if why == 1 else "signal"
                    if why > 1:  # another rank's signal stops this one too
                        stop.signum = stop.signum or why
                    break
                losses, t, grad_norm, lr = self.train_step()
                if not self.last_step_skipped:  # a skipped step's non-finite loss stays out of the metrics
                    window_loss += losses.sum()
                    bucket = (t * NUM_BUCKETS) // cfg.T
                    bucket_sum.index_add_(0, bucket, losses.double())
                    bucket_n.index_add_(0, bucket, torch.ones_like(losses, dtype=torch.float64))
                    window_steps += 1
                if timed:
                    bar.set_description_str(f"step {self.step}", refresh=False)
                    bar.update(min(time.perf_counter() - self._t0, cfg.time_limit) - bar.n)
                else:
                    bar.update(1)
                evaluate = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                if evaluate:
                    measure_quality()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or evaluate:
                    last_loss = flush_window(lr, grad_norm)
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
                if self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self.sample_grid()
            if window_steps:  # a run cut short by its time limit still logs its last steps
                if cfg.eval_every and stop_reason != "signal":  # and measures its final weights
                    measure_quality()
                last_loss = flush_window(lr, grad_norm)
        finally:
            bar.close()
        if stop_reason == "signal":
            self.log(f"{signal.Signals(stop.signum).name}: stopping at step {self.step} and saving a checkpoint "
                     "(press Ctrl-C again to abort at once)")
        if not self.dist.is_main:
            ckpt = None
        elif self.step > start_step or not any((self.run_dir / "checkpoints").glob("step_*")):
            ckpt = self.save()
        else:
            ckpt = latest_checkpoint(self.run_dir)[0] if stop_reason == "signal" else None
        # a stop by a signal (a preemption, say) writes no sample grid: the checkpoint is what must be on disk
        grid = None if stop_reason == "signal" else self.sample_grid()
        self.dist.barrier()  # the other ranks wait for rank 0's last checkpoint and samples
        res = {"step": self.step, "loss": last_loss, "stop": stop_reason, "checkpoint": ckpt, "grid": grid,
               "seconds": time.perf_counter() - self._t0}
        if quality["last"] is not None:
            res["quality"] = quality["last"]
            res["eval_seconds"] = quality["seconds"]
        if stop_reason == "signal":
            res["signal"] = signal.Signals(stop.signum).name
        return res


class GracefulStop:
    """SIGINT and SIGTERM during training: the first asks the loop to stop after the current step and save a
    checkpoint (a cluster scheduler sends SIGTERM before it preempts a job); the second aborts at once, with
    the last complete checkpoint intact (every write is atomic).

    Installed only in the main thread, and not over a signal that was ignored when the process started (a
    job started with ``nohup``, or in the background of a script, keeps ignoring SIGINT).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoints_dir):
        self.checkpoints_dir = checkpoints_dir
        self.signum = 0  # the first signal received (0: none)
        self._previous: dict = {}

    def install(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum:  # the second: no more waiting (printing is left to the CLI: not safe in a handler)
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name} aborted training at once; the last "
                                    f"complete checkpoint in {self.checkpoints_dir} is intact")
        self.signum = signum


def train(cfg: TrainConfig, run_dir, *, resume: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) a run; returns a summary dict (final step, loss, checkpoint and grid paths)."""
    return Trainer(cfg, run_dir, resume=resume, quiet=quiet).run()
