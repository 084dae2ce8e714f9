"""Samplers: one module per algorithm, each a plain function over a Denoiser, found and registered by name.

A sampler is ``fn(denoiser, x_T, timesteps, *, noise, callback=None, **options) -> x_0``: ``timesteps`` is the
increasing sequence it visits (chosen by :mod:`.timesteps`), ``noise`` a :class:`~.noise.NoiseSource` for its
stochastic steps, and ``callback(i, t, x, x0_hat)`` is called after step i (0-based) with the timestep t just
denoised, the new sample and that step's clean-image prediction. A new sampler is one new module of this package
that decorates its function with :func:`~.registry.register`; nothing else changes.

:func:`sample` runs any of them by name, or a :class:`~.options.SamplingPlan` made once by :func:`resolve` (the
sampler, its checked options and its timesteps), as the batch loop and the commands do.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Sequence

import torch

from .noise import GeneratorNoise, NoiseSource, PerSampleNoise, as_noise
from .registry import SAMPLERS, Option, SamplerInfo, get_sampler, register, sampler_names
from .timesteps import SPACINGS, timesteps
from .options import SamplingPlan, resolve

__all__ = ["SAMPLERS", "SPACINGS", "Option", "SamplerInfo", "register", "get_sampler", "sampler_names",
           "timesteps", "NoiseSource", "PerSampleNoise", "GeneratorNoise", "sample", "plan", "resolve",
           "SamplingPlan"]

_NOT_SAMPLERS = {"registry", "noise", "timesteps", "batches", "options"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _NOT_SAMPLERS and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")


def plan(sampler: str, schedule, steps: int | None = None, spacing: str | None = None, **options):
    """``(info, timesteps, options)`` for a run of ``sampler`` over ``schedule`` (a NoiseSchedule, or its T where
    the spacing needs no more), every argument checked.

    A sampler that takes real-valued timesteps gets the ``logsnr`` and ``karras`` spacings exactly. ValueError
    with one line on an unknown sampler, spacing or option, or a step count outside [1, T]. ``resolve`` gives the
    same as one :class:`SamplingPlan`.
    """
    p = resolve(sampler, schedule, steps, spacing, **options)
    return p.info, p.timesteps, p.options


@torch.inference_mode()
def sample(denoiser, x_T: torch.Tensor | Sequence[int], *, sampler: str | SamplingPlan = "ddim",
           steps: int | None = None, spacing: str | None = None, noise=None, callback: Callable | None = None,
           **options) -> torch.Tensor:
    """Run ``sampler`` from ``x_T`` (a tensor, or a shape [B, C, H, W] to draw it from ``noise``).

    ``noise``: a NoiseSource, an int seed (per-sample streams: see :class:`PerSampleNoise`), a
    ``torch.Generator`` (one stream for the batch) or None (the global generator). ``steps`` and ``spacing``
    default to the sampler's own; ``options`` are the sampler's (for example ``eta`` for ddim). ``sampler`` may be
    a :class:`SamplingPlan` (from ``resolve``), whose timesteps and options are used as they are.
    """
    if isinstance(sampler, SamplingPlan):
        if steps is not None or spacing is not None or options:
            raise ValueError("sample: a SamplingPlan carries its steps, spacing and options; give none besides")
        p = sampler
    else:
        p = resolve(sampler, denoiser.schedule, steps, spacing, **options)
    info, tau, opts = p.info, p.timesteps, p.options
    noise = as_noise(noise)
    if not isinstance(x_T, torch.Tensor):
        shape = tuple(int(s) for s in x_T)
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"shape must be [B, C, ...] with positive sizes, got {shape}")
        x_T = noise.initial(shape, denoiser.device)
    x_T = x_T.to(device=denoiser.device, dtype=torch.float64 if x_T.dtype == torch.float64 else torch.float32)
    return info.fn(denoiser.to(x_T.device), x_T, tau, noise=noise, callback=callback, **opts)
