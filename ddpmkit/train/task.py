"""What a training run trains: the interface between the one training loop and a model with its loss.

The loop (:class:`ddpmkit.train.loop.TrainingLoop`) owns the steps, the optimizers, the learning-rate schedule,
gradient clipping and accumulation, the EMA, checkpoints and exact resume, the run lock, the graceful stop,
torchrun/DDP, the metrics log and the progress bar. A :class:`Task` owns the rest: its data, its networks, the
parameters each optimizer updates, the batch -> loss step, the random state that step draws from, and what a
sample grid or a quality measurement of the current weights is.

Tasks: the diffusion model (:class:`ddpmkit.train.tasks.diffusion.DiffusionTask`). The next two fit the same
interface without copying the loop:

* the autoencoder of latent diffusion: networks ``{"autoencoder", "discriminator"}`` (the autoencoder first: its
  weights and EMA fill the checkpoint's model files), optimizers ``{"autoencoder": OptimizerSpec(ae params),
  "discriminator": OptimizerSpec(disc params, start_step=disc_start)}``; :meth:`Task.loss` returns the
  reconstruction + KL + adaptive-weight GAN loss for ``"autoencoder"`` and the hinge loss on detached
  reconstructions for ``"discriminator"``, with their parts (``rec``, ``kl``, ``g``, ``d_weight``) as scalars;
* a distilled student (:class:`ddpmkit.train.tasks.distill.DistillTask`): networks ``{"model", "teacher"}``, one
  optimizer over the student's parameters; the frozen teacher has none, and its weights travel in the task's
  training state, since each round's teacher is the last round's student.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Task", "TaskContext", "OptimizerSpec", "LossOut", "Meter"]


@dataclass
class TaskContext:
    """What the loop hands a task: where to put tensors, the process group, and how to talk."""

    device: torch.device
    dist: Any  # ddpmkit.train.distributed.DistContext
    log: Callable[[str], None]
    quiet: bool = False  # no progress bars (rank > 0, or asked)
    run_dir: Path | None = None  # the run directory (read only: the loop writes it, through write_files)
    stored_config: dict | None = None  # a resumed run's config.json, as the loop read it (None: a new run)


@dataclass
class OptimizerSpec:
    """One optimizer of a task: the parameters it updates, its learning rate relative to the run's, and the step
    from which it updates (a GAN's discriminator joins late; the first optimizer, the main network's, updates
    from step 0); the loop builds Adam from the run's settings."""

    params: Iterable[torch.nn.Parameter]
    lr_scale: float = 1.0
    start_step: int = 0


@dataclass
class LossOut:
    """One micro-batch's loss for one optimizer."""

    loss: torch.Tensor  # the scalar the loop differentiates (divided by the number of micro-batches)
    per_sample: torch.Tensor  # each sample's loss, detached: the metrics and the non-finite check
    info: torch.Tensor | None = None  # a per-sample tag gathered with it over the ranks (diffusion: t)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)  # extra values for the metrics row


class Meter(abc.ABC):
    """A task's own columns of the metrics rows, accumulated over the steps between two rows."""

    @abc.abstractmethod
    def add(self, per_sample: torch.Tensor, info: torch.Tensor | None, scalars: dict) -> None:
        """One applied step's gathered per-sample losses, their tags and scalars (the main optimizer's)."""

    @abc.abstractmethod
    def row(self) -> dict:
        """The columns for the next metrics row, and start over."""


class Task(abc.ABC):
    """A model and its loss, trained by the loop. Built once per process with its settings and a
    :class:`TaskContext`; the loop then calls, in order: :meth:`build` (after seeding the global generator with
    the run's seed), :meth:`optimizers`, :meth:`load_state_dict` on a resume, and per step :meth:`batch`, then
    :meth:`loss` per optimizer and micro-batch, then :meth:`updated` per applied update."""

    num_images: int = 0  # the size of the training set, for the messages

    @abc.abstractmethod
    def build(self) -> dict[str, torch.nn.Module]:
        """The networks, by name, on the context's device. The first is the main one: its weights, EMA and
        optimizer fill the checkpoint's model, EMA and optimizer files (what ``ddpmkit sample`` loads); the
        others with trainable parameters are saved in the training state (``models``), frozen ones nowhere."""

    @abc.abstractmethod
    def optimizers(self, models: dict[str, torch.nn.Module]) -> dict[str, OptimizerSpec]:
        """The optimizers, by name, in the order they update within a step; the first goes with the main network."""

    @abc.abstractmethod
    def batch(self, step: int) -> Any:
        """This process's share of the global batch of ``step``, with every random draw its loss needs (from the
        task's own generators, whose state :meth:`state_dict` holds), as anything :meth:`loss` can slice."""

    @abc.abstractmethod
    def loss(self, name: str, batch: Any, part: slice, nets: dict[str, Callable]) -> LossOut:
        """The loss of optimizer ``name`` on micro-batch ``part`` of ``batch``. ``nets`` are the networks as the
        loop runs them forward (wrapped by DDP and torch.compile), by name."""

    def lr_factor(self, step: int) -> float:
        """A factor on the run's learning rate at ``step``, called after :meth:`batch` (1: the run's schedule alone;
        a distillation decays it over each of its rounds)."""
        return 1.0

    def updated(self, name: str, per_sample: torch.Tensor, info: torch.Tensor | None) -> None:
        """Optimizer ``name`` applied its step; ``per_sample`` and ``info`` hold the whole global batch."""
        return None

    def meter(self) -> Meter | None:
        """A new accumulator of the task's metrics columns (None: the loop's columns only)."""
        return None

    def metrics_columns(self) -> list[str]:
        """The task's own columns of metrics.csv (its :meth:`meter`'s), between the loop's and --eval-every's."""
        return []

    def write_files(self, run_dir: Path) -> None:
        """Write the task's own files into the run directory, before its config.json (rank 0; a new run, or a
        resumed one: only what is missing). A latent run's copy of its autoencoder goes here."""
        return None

    @abc.abstractmethod
    def config_json(self) -> dict:
        """The run's config.json (the loop adds the ``machine`` section)."""

    @abc.abstractmethod
    def state_dict(self) -> dict:
        """The task's part of the training state (its generators, the data order...), merged into the
        checkpoint's: its keys must not be the loop's (step, ema_updates, skipped_steps, wall_s, torch_rng,
        cuda_rng, models, optimizers)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s entries from a checkpoint's training state."""

    def sample_grid(self, ema: Callable[[], torch.nn.Module], path: Path) -> Path | None:
        """Write a picture of samples to ``path``: the path written, or None when the task draws none. ``ema()``
        gives a copy of the main network with its EMA weights, in eval mode. Rank 0 only."""
        return None

    def evaluate(self, ema: Callable[[], torch.nn.Module]) -> dict | None:
        """The --eval-every measurement of the EMA weights (``ema()``, as for :meth:`sample_grid`): a dict with
        ``fd``, ``fd_stderr`` and ``seconds`` (and any of the task's metrics columns), or None. Rank 0 only."""
        return None
