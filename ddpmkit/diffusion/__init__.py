"""The mathematics of diffusion: schedules, the forward process, the Denoiser, the training loss.

No files, no network internals: a network is any callable ``net(x_t, t[, cond])``.
"""

from .bound import discretized_gaussian_log_likelihood, normal_kl, vlb_term_bits
from .denoiser import Denoiser, Prediction
from .distill import (END, alpha_sigma, consistency_function, consistency_scalings, consistency_target, ddim_step,
                      edm_sigma, heun_step, progressive_target, progressive_triples, student_grid, teacher_grid,
                      truncated_snr_weight)
from .losses import sample_timesteps, training_loss, training_losses
from .process import (OBJECTIVES, VARIANCES, check_objective, model_variance, predict_eps, predict_x0,
                      q_posterior, q_sample, training_target)
from .schedule import NoiseSchedule, extract
from .variance import analytic_log_var, estimate_gamma, learned_log_var, optimal_reverse_variance

__all__ = [
    "NoiseSchedule", "extract",
    "OBJECTIVES", "VARIANCES", "check_objective", "q_sample", "training_target", "predict_x0", "predict_eps",
    "q_posterior", "model_variance",
    "Denoiser", "Prediction",
    "sample_timesteps", "training_losses", "training_loss",
    "normal_kl", "discretized_gaussian_log_likelihood", "vlb_term_bits",
    "learned_log_var", "optimal_reverse_variance", "analytic_log_var", "estimate_gamma",
    "END", "alpha_sigma", "edm_sigma", "ddim_step", "progressive_target", "truncated_snr_weight", "student_grid",
    "teacher_grid", "progressive_triples", "consistency_scalings", "consistency_function", "heun_step",
    "consistency_target",
]
