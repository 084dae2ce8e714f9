"""The learning rate of each step: a linear warm-up, then constant or a cosine decay."""

from __future__ import annotations

import math

__all__ = ["lr_at"]


def lr_at(cfg, step: int, progress: float | None = None) -> float:
    """Linear warm-up from lr/warmup to lr over the first `warmup` steps, then constant (DDPM appendix B), or
    with ``lr_decay = cosine`` lr * (1 + cos(pi p)) / 2 (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts),
    p the fraction of the run done: of --steps, or of --time-limit when ``progress`` (that fraction) is larger.

    ``cfg`` needs ``lr``, ``warmup``, ``steps`` and (optionally) ``lr_decay``."""
    lr = cfg.lr if cfg.warmup <= 0 else cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if getattr(cfg, "lr_decay", "none") == "cosine":
        p = min(1.0, max(step / cfg.steps, progress or 0.0))
        lr *= 0.5 * (1.0 + math.cos(math.pi * p))  # SGDR eq. 5 with eta_min = 0
    return lr
