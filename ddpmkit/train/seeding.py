"""The global random generators (dropout's) of each training step, seeded per process and step."""

from __future__ import annotations

import torch

from ..rng import derive_seed

__all__ = ["dropout_seed", "seed_dropout"]


def dropout_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the global generator (the dropout masks) on process ``rank`` for training step ``step``.

    A hash of the three numbers, so that nearby seeds, ranks and steps give unrelated streams (``seed + rank``
    would hand rank 1 of seed 0 the stream of rank 0 of seed 1).
    """
    return derive_seed(seed, rank, step)


def seed_dropout(seed: int, rank: int, step: int) -> None:
    """Seed the global generators (CPU and every accelerator), which dropout draws from, for one rank and step."""
    torch.manual_seed(dropout_seed(seed, rank, step))
