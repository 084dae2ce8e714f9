"""A diffusion training run: :class:`Trainer`, the training loop (:mod:`.loop`) with the diffusion task.

    Trainer(cfg, "runs/digits").run()     # cfg: a TrainConfig, resolved once (resume.resolve_config)

The names that lived here before the loop was split keep being importable from this module.
"""

from __future__ import annotations

from pathlib import Path

from ..store.metrics_log import MetricsLog
from .config import TrainConfig
from .device import describe_machine, pick_device
from .ema import EMA
from .loop import MAX_GRAD_NORM, NonFiniteError, StepResult, TrainingLoop
from .seeding import dropout_seed, seed_dropout
from .signals import GracefulStop
from .tasks.diffusion import DiffusionTask, class_names_of, uncond_mask

__all__ = ["Trainer", "EMA", "MetricsLog", "NonFiniteError", "pick_device", "train", "dropout_seed",
           "seed_dropout", "MAX_GRAD_NORM", "uncond_mask", "class_names_of", "describe_machine", "GracefulStop",
           "StepResult"]


class Trainer(TrainingLoop):
    """One diffusion training run in a run directory: build or resume, then :meth:`run`."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False,
                 log=None, stored_config: dict | None = None):
        super().__init__(DiffusionTask, cfg, run_dir, resume=resume, quiet=quiet, log=log,
                         stored_config=stored_config)

    # the diffusion task's parts, under the names they had before the split
    model = property(lambda self: self.models["model"], doc="the U-Net being trained")
    optimizer = property(lambda self: self.optimizers["model"], doc="its Adam")
    schedule = property(lambda self: self.task.schedule, doc="the noise schedule")
    gen = property(lambda self: self.task.gen, doc="the generator of the training timesteps and noise")
    batcher = property(lambda self: self.task.batcher, doc="the training batches")
    t_sampler = property(lambda self: self.task.t_sampler, doc="the loss-second-moment timestep sampler, or None")
    class_cond = property(lambda self: self.task.class_cond)
    class_names = property(lambda self: self.task.class_names)
    null_class = property(lambda self: self.task.null_class)

    def evaluate_quality(self) -> dict | None:
        """--eval-every's measurement of the EMA weights now (:meth:`DiffusionTask.evaluate`)."""
        return self.evaluate()


def train(cfg: TrainConfig, run_dir, *, resume: bool = False, quiet: bool = False) -> dict:
    """Train (or resume) a run; returns a summary dict (final step, loss, checkpoint and grid paths)."""
    return Trainer(cfg, run_dir, resume=resume, quiet=quiet).run()
