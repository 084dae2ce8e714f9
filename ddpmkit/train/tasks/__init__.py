"""The models the training loop trains, one task each (:mod:`ddpmkit.train.task` is their interface)."""

from .diffusion import DiffusionTask

__all__ = ["DiffusionTask"]
