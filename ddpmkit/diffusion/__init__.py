"""The mathematics of diffusion: schedules, the forward process, the Denoiser, the training loss.

No files, no network internals: a network is any callable ``net(x_t, t[, cond])``.
"""

from .denoiser import Denoiser, Prediction
from .losses import sample_timesteps, training_loss, training_losses
from .process import (OBJECTIVES, VARIANCES, check_objective, model_variance, predict_eps, predict_x0,
                      q_posterior, q_sample, training_target)
from .schedule import NoiseSchedule, extract

__all__ = [
    "NoiseSchedule", "extract",
    "OBJECTIVES", "VARIANCES", "check_objective", "q_sample", "training_target", "predict_x0", "predict_eps",
    "q_posterior", "model_variance",
    "Denoiser", "Prediction",
    "sample_timesteps", "training_losses", "training_loss",
]
