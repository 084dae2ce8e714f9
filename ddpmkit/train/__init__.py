"""Training: the settings (:mod:`.config`), the loop (:mod:`.trainer`) and several processes (:mod:`.distributed`).

    from ddpmkit.train import config_from_preset, train
    train(config_from_preset("digits", steps=500), "runs/digits")
"""

from .config import PRESETS, TrainConfig, config_from_preset, settings_table
from .trainer import (EMA, MAX_GRAD_NORM, MetricsLog, NonFiniteError, Trainer, dropout_seed, pick_device,
                      seed_dropout, train)

__all__ = ["TrainConfig", "PRESETS", "config_from_preset", "settings_table", "Trainer", "NonFiniteError", "EMA",
           "MetricsLog", "pick_device", "train", "dropout_seed", "seed_dropout", "MAX_GRAD_NORM"]
