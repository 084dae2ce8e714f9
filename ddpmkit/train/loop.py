"""The training loop: any :class:`~ddpmkit.train.task.Task`, trained step by step, checkpointed, resumable exactly.

The loop owns what every model's training shares: Adam with a warm-up and decay of the learning rate (DDPM
appendix B), gradient clipping and accumulation, the EMA of the weights, checkpoints with every random state
(so that a resume continues bit for bit), the run's lock, the graceful stop on SIGINT/SIGTERM, torchrun/DDP,
metrics.csv (and the --log backends: loggers.py) and the progress bar. The task supplies the networks and the
batch -> loss step.
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import CheckpointError, ConfigError, DdpmkitError
from ..store.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..store.lock import RunLock
from ..store.metrics_log import MetricsLog
from ..store.rundir import prepare_run_dir, write_config
from . import distributed, loggers
from .device import autocast_dtype, describe_machine, pick_device
from .ema import EMA
from .progress import MetricsWindow, ProgressBar, fd_text
from .resume import check_locked
from .schedule import lr_at
from .seeding import seed_dropout
from .signals import GracefulStop
from .task import TaskContext

__all__ = ["TrainingLoop", "StepResult", "NonFiniteError", "MAX_GRAD_NORM", "make_adam"]

# A finite gradient norm above this is treated like a non-finite one. The norm is measured before clipping;
# on a healthy run it stays within O(0.01 .. 100) (the unit-variance eps targets bound the loss), so 1e6 is
# four orders of magnitude beyond any sane value and never fires by accident, while a norm that large
# only comes from a numerical blow-up (an overflow on its way to inf) whose direction is meaningless even
# once clipped, and it would inflate Adam's second moment for thousands of steps.
MAX_GRAD_NORM = 1e6


def make_adam(params, **kw) -> torch.optim.Adam:
    """Adam, fused (one kernel over every tensor) where this torch has it for the parameters' device: the same update,
    about a tenth less time a step for a small network on a CPU (bench/bench_train_speed.py), where the per-tensor
    loop of the default implementation is a large share of the step. Elsewhere (torch < 2.4 on a CPU, MPS) the
    default implementation. A resumed run keeps the implementation its optimizer state records."""
    params = list(params)
    if all(isinstance(p, torch.Tensor) and p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.Adam(params, fused=True, **kw)
        except (RuntimeError, TypeError):  # no fused Adam for this device or dtype in this torch
            pass
    return torch.optim.Adam(params, **kw)


class NonFiniteError(DdpmkitError):
    """The loss or the gradient norm became NaN or infinite."""


class StepResult(NamedTuple):
    """One step of the main optimizer: the global batch's per-sample losses and tags, the gradient norm before
    clipping, the learning rate, and the task's scalars (of this rank)."""

    losses: torch.Tensor
    info: torch.Tensor | None
    grad_norm: torch.Tensor
    lr: float
    scalars: dict


class TrainingLoop:
    """One training run of a task in a run directory: build or resume, then :meth:`run`.

    ``task`` is called as ``task(cfg, TaskContext)`` to make the :class:`~ddpmkit.train.task.Task`; ``cfg`` holds
    the loop's settings (steps, time_limit, batch_size, grad_accum, lr, warmup, lr_decay, grad_clip, adam_*,
    weight_decay, ema_*, seed, log_every, log, checkpoint_every, sample_every, eval_every, keep, skip_nonfinite,
    device, precision, compile) and is the resolved configuration (:func:`ddpmkit.train.resume.resolve_config`).
    """

    def __init__(self, task, cfg, run_dir: str | Path, *, resume: bool = False, quiet: bool = False, log=None,
                 stored_config: dict | None = None):
        cfg.validate()
        loggers.require(cfg.log)  # a --log backend's missing package, refused before anything is written
        self._stored_config = stored_config  # a resumed run's config.json as the command read it (resolve_run)
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
            self._setup(task, cfg, Path(run_dir), resume, quiet, log)
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

    def _setup(self, task, cfg, run_dir: Path, resume: bool, quiet: bool, log) -> None:
        dctx = self.dist
        self.cfg, self.run_dir = cfg, run_dir
        self.quiet = quiet or not dctx.is_main  # only rank 0 shows progress
        base_log = log or (lambda msg: print(msg, file=sys.stderr))
        self.log = base_log if dctx.is_main else (lambda msg: None)
        ckpt = self._open_checkpoint() if resume else None
        self.device = pick_device(cfg.device)
        if dctx.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", dctx.local_rank)
        self.autocast_dtype = autocast_dtype(cfg.precision, self.device)
        self.task = task(cfg, TaskContext(self.device, dctx, self.log, self.quiet, run_dir=run_dir,
                                          stored_config=None if ckpt is None else ckpt.config))
        self.num_images = self.task.num_images

        # The same seed on every rank: identical initial weights. Dropout is reseeded per rank and step (train_step).
        torch.manual_seed(cfg.seed)
        self.models = self.task.build()
        self.main = next(iter(self.models))  # the network of the checkpoint's model and EMA files
        self.trainable = [n for n, m in self.models.items() if any(p.requires_grad for p in m.parameters())]
        self.specs = self.task.optimizers(self.models)
        self.optimizers = {name: make_adam(spec.params, lr=cfg.lr * spec.lr_scale,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
                           for name, spec in self.specs.items()}
        self.ema = EMA(self.models[self.main], cfg.ema_decay, cfg.ema_warmup)
        self.step = 0
        self.skipped_steps = 0  # steps skipped by skip_nonfinite, over the whole run
        self.last_step_skipped = False
        self.wall_offset = 0.0
        self.ddp = dict(self.models)
        if dctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # the same seed gives every rank the same initial weights; DDP also broadcasts rank 0's
            for n in self.trainable:
                self.ddp[n] = DistributedDataParallel(
                    self.models[n], device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.nets = {n: torch.compile(m) if cfg.compile else m for n, m in self.ddp.items()}  # what runs forward

        if ckpt is not None:
            self._restore(ckpt)
            self.log(f"resuming {self.run_dir} from step {self.step} ({ckpt.path.name})")

        self.loggers = loggers.Loggers()  # --log's backends: rank 0 opens them (prepare), the other ranks log nothing

        def prepare():  # rank 0 alone writes in the run directory
            if not dctx.is_main:
                return None
            if ckpt is None:
                prepare_run_dir(self.run_dir, resume=False)
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self._take_lock()
            self.task.write_files(self.run_dir)
            config = self.task.config_json()
            config["machine"] = describe_machine(self.device, dctx.world_size)  # of this session, after a resume
            write_config(self.run_dir, config)
            metrics = MetricsLog(self.run_dir / "metrics.csv", resume_step=self.step if ckpt else None,
                                 task_columns=self.task.metrics_columns())
            self.loggers = loggers.open_loggers(cfg.log, self.run_dir, config["train"],
                                                resume_step=self.step if ckpt else None, log=self.log)
            return metrics

        self.metrics = dctx.main_first(prepare)

    def _open_checkpoint(self):
        """The run's newest intact checkpoint, its settings checked against the locked ones of this session's."""
        dctx = self.dist
        # rank 0 checks the directory (a probe write) and takes the lock first; the other ranks only read from it
        stored = self._stored_config  # read once by the command (resolve_run); else read here, once
        dctx.main_first(lambda: (prepare_run_dir(self.run_dir, resume=True, config=stored), self._take_lock())
                        if dctx.is_main else None)
        ckpt = load_checkpoint(self.run_dir, config=stored)
        check_locked(self.cfg, ckpt.config, self.run_dir)  # the config.json load_checkpoint read with it
        for p in ckpt.skipped:
            self.log(f"warning: checkpoint {p} is corrupt; resuming from {ckpt.path} instead")
        return ckpt

    # ------------------------------------------------------------------ state
    def _train_state(self) -> dict:
        state = {
            "step": self.step,
            "ema_updates": self.ema.num_updates,
            "skipped_steps": self.skipped_steps,
            "wall_s": self.wall_offset + (time.perf_counter() - self._t0 if hasattr(self, "_t0") else 0.0),
            # informative only: train_step reseeds the global generators from (seed, rank, step) at every step
            "torch_rng": torch.get_rng_state(),
            **self.task.state_dict(),
        }
        others = [n for n in self.trainable if n != self.main]
        if others:  # a second network (a discriminator) and a second optimizer travel in the training state
            state["models"] = {n: self.models[n].state_dict() for n in others}
        if len(self.optimizers) > 1:
            state["optimizers"] = {n: opt.state_dict() for n, opt in list(self.optimizers.items())[1:]}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def _restore(self, ckpt) -> None:
        st = ckpt.train_state or {}
        first = next(iter(self.optimizers))
        try:
            self.models[self.main].load_state_dict(ckpt.model_state, strict=True)
            for n, state in st.get("models", {}).items():
                self.models[n].load_state_dict(state, strict=True)
            if ckpt.optimizer_state is not None:
                self.optimizers[first].load_state_dict(ckpt.optimizer_state)
            for n, state in st.get("optimizers", {}).items():
                self.optimizers[n].load_state_dict(state)
            self.ema.load_state_dict(ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state,
                                     st.get("ema_updates", 0))
            self.step = int(st["step"])
            self.skipped_steps = int(st.get("skipped_steps", 0))
            self.wall_offset = float(st.get("wall_s", 0.0))
            torch.set_rng_state(st["torch_rng"])
            self.task.load_state_dict(st)
            if "cuda_rng" in st and torch.cuda.is_available() and len(st["cuda_rng"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(st["cuda_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit this run: {str(e).splitlines()[0]}") from None
        if self.step != ckpt.step:
            raise CheckpointError(f"checkpoint {ckpt.path} is inconsistent (step {ckpt.step} vs {self.step})")
        # the optimizers' learning rates follow the schedule, not the stored values; the implementation is the one the
        # state records (a run begun unfused stays so, and resumes bit-exactly), unless this torch has no fused Adam
        for name, opt in self.optimizers.items():
            fused = bool(opt.defaults.get("fused"))
            for g in opt.param_groups:
                g["lr"] = lr_at(self.cfg, self.step) * self.specs[name].lr_scale
                if g.get("fused") and not fused:
                    g["fused"] = None  # torch's default implementation

    def save(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(
            self.run_dir, self.step,
            model_state=self.models[self.main].state_dict(),
            ema_state=self.ema.state_dict(),
            optimizer_state=next(iter(self.optimizers.values())).state_dict(),
            train_state=self._train_state(),
            keep=self.cfg.keep,
        )

    def _time_progress(self) -> float | None:
        """The fraction of --time-limit spent in this session (None without a limit or before run())."""
        if self.cfg.time_limit is None or getattr(self, "_t0", None) is None:
            return None
        return (time.perf_counter() - self._t0) / self.cfg.time_limit

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        """One optimizer step of every optimizer due (the main one's result); ``step`` advances by one."""
        cfg, dctx = self.cfg, self.dist
        # Dropout masks come from a stream derived from (seed, rank, step), reseeded at every step: each rank
        # draws its own masks (a shared seed would make them identical across ranks), a 1-process run stays
        # reproducible, and a resume, on any number of processes, needs no per-rank state from the checkpoint.
        seed_dropout(cfg.seed, dctx.rank, self.step)
        batch = self.task.batch(self.step)
        # the run's schedule, times the task's own factor (after batch(): a distillation's round may begin there)
        lr = lr_at(cfg, self.step, self._time_progress()) * self.task.lr_factor(self.step)
        for n in self.trainable:
            self.models[n].train()
        result, faults = None, []
        for name, opt in self.optimizers.items():
            if self.step < self.specs[name].start_step:
                continue
            for g in opt.param_groups:
                g["lr"] = lr * self.specs[name].lr_scale
            out, fault = self._update(name, opt, batch, lr)
            result = out if result is None else result  # the main optimizer's, which updates first
            if fault:
                faults.append(fault)
        self.last_step_skipped = bool(faults)
        self.step += 1
        if faults:
            # Skip: no optimizer step, no EMA update, gradients dropped. The step counter still advances, so
            # that the step stays the number of batches (and noise draws) consumed: the data order and the
            # random streams of the following steps are those of a run without the fault, and resume is exact.
            self.skipped_steps += 1
            self.log(f"warning: {faults[0]} at step {self.step}; step skipped ({self.skipped_steps} skipped so far)")
        else:
            self.ema.update(self.models[self.main])
        return result

    def _update(self, name: str, opt, batch, lr: float) -> tuple[StepResult, str | None]:
        """Optimizer ``name``'s update from this rank's share of the batch: its result, and what went wrong (a
        NaN, an inf or an exploding gradient: the update is dropped) or None."""
        cfg, dctx = self.cfg, self.dist
        # Gradient accumulation: the rank's share in K micro-batches, each loss scaled by 1/K so that the summed
        # gradient is that of the mean over the share (and, after DDP's average over ranks, of the global mean).
        # DDP all-reduces only in the last backward; the earlier ones accumulate locally under no_sync().
        K = cfg.grad_accum
        m = cfg.batch_size // dctx.world_size // K
        opt.zero_grad(set_to_none=True)
        parts = []
        for k in range(K):
            sync = k == K - 1 or not dctx.enabled
            with contextlib.nullcontext() if sync else self._no_sync():
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    out = self.task.loss(name, batch, slice(k * m, (k + 1) * m), self.nets)
                (out.loss / K).backward()
            parts.append(out)

        def cat(xs):
            return torch.cat(xs) if K > 1 else xs[0]

        losses = cat([p.per_sample for p in parts])
        info = None if parts[0].info is None else cat([p.info for p in parts])
        scalars = {k: sum(p.scalars[k].detach() for p in parts) / K for k in parts[0].scalars}
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        # after DDP's all-reduce, so the norm and the clipping are the same on every rank
        params = [p for g in opt.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # the norm before clipping
        if dctx.enabled:  # every rank sees the losses of the whole global batch (for the check and the metrics)
            losses = dctx.all_gather_cat(losses.detach())
            info = None if info is None else dctx.all_gather_cat(info)
        loss = losses.mean()
        result = StepResult(losses.detach(), info, grad_norm.detach(), lr, scalars)
        fault = self._fault(loss, grad_norm, name)
        if fault:
            opt.zero_grad(set_to_none=True)
            return result, fault
        self.task.updated(name, losses, info)
        opt.step()
        return result, None

    def _fault(self, loss: torch.Tensor, grad_norm: torch.Tensor, name: str) -> str | None:
        """What is wrong with an update (on any rank: all ranks agree), or None; raises NonFiniteError unless
        skip_nonfinite."""
        loss_ok, norm_ok = bool(torch.isfinite(loss)), bool(torch.isfinite(grad_norm))
        bad = not (loss_ok and norm_ok and grad_norm.item() <= MAX_GRAD_NORM)
        if self.dist.enabled:  # all ranks stop or skip together
            bad = self.dist.any(bad, self.device)
        if not bad:
            return None
        if not loss_ok:
            what = f"the loss became {loss.item()}"
        elif not norm_ok:
            what = f"the gradient norm became {grad_norm.item()}"
        elif grad_norm.item() > MAX_GRAD_NORM:
            what = f"the gradient norm exploded to {grad_norm.item():.3g} (> {MAX_GRAD_NORM:.0e})"
        else:
            what = "a non-finite value appeared on another process"
        if len(self.optimizers) > 1:
            what += f" in the {name} update"
        if not self.cfg.skip_nonfinite:
            raise NonFiniteError(
                f"{what} at step {self.step + 1}; training stopped and the last checkpoint in "
                f"{self.run_dir / 'checkpoints'} is intact (try a lower --lr, a longer --warmup, "
                f"or --skip-nonfinite)")
        return what

    def _no_sync(self):
        """DDP's no_sync() on every wrapped network: the gradients accumulate locally until the last micro-batch."""
        stack = contextlib.ExitStack()
        for n in self.trainable:
            stack.enter_context(self.ddp[n].no_sync())
        return stack

    # ------------------------------------------------------------------ samples and quality
    def _ema_copy(self) -> torch.nn.Module:
        """A copy of the main network with the EMA weights, in eval mode (a copy draws nothing from the random
        generators, and leaves the trained model as it is)."""
        model = copy.deepcopy(self.models[self.main]).eval()
        model.load_state_dict(self.ema.state_dict())
        return model

    def sample_grid(self) -> Path | None:
        """The task's picture of samples from the EMA weights, as samples/grid_step_N.png (rank 0)."""
        if not self.dist.is_main:
            return None
        path = self.task.sample_grid(self._ema_copy, self.run_dir / "samples" / f"grid_step_{self.step:09d}.png")
        if path is not None:
            self.loggers.image(self.step, "samples", path)
        return path

    def evaluate(self) -> dict | None:
        """The task's --eval-every measurement of the EMA weights (rank 0; None elsewhere or without one)."""
        if not self.dist.is_main:
            return None
        return self.task.evaluate(self._ema_copy)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Train to ``cfg.steps`` (or the time limit, or a first SIGINT/SIGTERM: see :class:`GracefulStop`)."""
        stop = GracefulStop(self.run_dir / "checkpoints").install()
        try:
            return self._run(stop)
        finally:
            stop.restore()
            self._release_lock()
            distributed.leave()  # the process group this loop joined, if any, also on an error
            self.loggers.close(failed=sys.exc_info()[0] is not None)

    def _run(self, stop: GracefulStop) -> dict:
        cfg = self.cfg
        self._t0 = time.perf_counter()
        start_step = self.step
        timed = cfg.time_limit is not None
        bar = ProgressBar(cfg, self.step, self.quiet)
        window = MetricsWindow(cfg.batch_size, self.device, self.task.meter())
        last_loss, stop_reason, r = float("nan"), "steps", None
        # --eval-every: the values for the next row, the last result, its cost
        quality = {"pending": {}, "last": None, "seconds": 0.0}

        def flush_window() -> float:
            """Write one metrics.csv row for the steps since the last one; return their mean loss."""
            row = window.row(self.step, r.lr, r.grad_norm, self.wall_offset + time.perf_counter() - self._t0)
            row.update(fd=None, fd_stderr=None)
            row.update(quality["pending"])
            quality["pending"] = {}
            if self.metrics is not None:  # rank 0 only
                self.metrics.append(row)
                self.loggers.scalars(self.step, {c: row.get(c) for c in self.metrics.columns})  # the row as written
            shown = {} if quality["last"] is None else {"fd": fd_text(quality["last"])}  # --eval-every's last
            bar.show(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", **shown)
            return row["loss"]

        def measure_quality() -> None:
            q = self.evaluate()
            if q is not None:
                quality.update(pending={k: v for k, v in q.items() if k != "seconds"}, last=q,
                               seconds=quality["seconds"] + q["seconds"])
                bar.show(fd=fd_text(q))

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
                r = self.train_step()
                if not self.last_step_skipped:  # a skipped step's non-finite loss stays out of the metrics
                    window.add(r)
                bar.advance(self.step, time.perf_counter() - self._t0)
                evaluate = cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps)
                if evaluate:
                    measure_quality()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps or evaluate:
                    last_loss = flush_window()
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save()
                if self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self.sample_grid()
            if window.steps:  # a run cut short by its time limit still logs its last steps
                if cfg.eval_every and stop_reason != "signal":  # and measures its final weights
                    measure_quality()
                last_loss = flush_window()
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
