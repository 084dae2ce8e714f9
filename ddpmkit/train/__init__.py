"""Training: the settings (:mod:`.config`), resuming (:mod:`.resume`), the one loop (:mod:`.loop`) and the tasks it
trains (:mod:`.task`, :mod:`.tasks`), several processes (:mod:`.distributed`); :class:`Trainer` is a diffusion run.

    from ddpmkit.train import config_from_preset, train
    train(config_from_preset("digits", steps=500), "runs/digits")
"""

from ..store.metrics_log import MetricsLog
from .config import PRESETS, TrainConfig, config_from_preset, settings_table
from .device import pick_device
from .ema import EMA
from .loop import MAX_GRAD_NORM, NonFiniteError, TrainingLoop
from .resume import Resolved, resolve_config, resolve_run
from .seeding import dropout_seed, seed_dropout
from .task import Task
from .trainer import Trainer, train

__all__ = ["TrainConfig", "PRESETS", "config_from_preset", "settings_table", "Trainer", "NonFiniteError", "EMA",
           "MetricsLog", "pick_device", "train", "dropout_seed", "seed_dropout", "MAX_GRAD_NORM", "TrainingLoop",
           "Task", "resolve_config", "resolve_run", "Resolved"]
