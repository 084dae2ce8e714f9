"""Many samples, batch by batch, with bounded memory: the loop behind ``ddpmkit sample`` and FID.

Sample i (counted from ``start``) always comes from the noise stream (seed, i), so the images do not depend on the
batch size, on the out-of-memory retry that halves it, or on how the indices are split between processes.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from ..errors import DdpmkitError
from . import sample
from .noise import PerSampleNoise
from .options import SamplingPlan, resolve

__all__ = ["sample_batches"]


def sample_batches(denoiser, *, n: int, shape: Sequence[int], sampler: str | SamplingPlan = "ddim",
                   steps: int | None = None, spacing: str | None = None, seed: int = 0, batch_size: int = 64,
                   start: int = 0, options: dict | None = None, on_first_batch: Callable | None = None,
                   log: Callable = print, labels: torch.Tensor | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(index, x)`` for samples ``start .. start + n - 1``: x is float [b, C, H, W] in [-1, 1], index its first.
    ``shape`` is that of the samples the denoiser makes; a latent run's (a Denoiser with a decoder) come out decoded,
    as images.

    ``sampler`` is a :class:`SamplingPlan` or a sampler's name (planned here once, with ``steps``, ``spacing`` and
    ``options``); every batch runs the same plan.

    ``labels`` (int64 [n], one per sample, for a class-conditional Denoiser) conditions sample ``start + j`` on
    ``labels[j]``, whatever batch it falls in.

    ``on_first_batch(x_T)``, when given, is called with the first batch's initial noise (again after a retry) and
    returns the callback for that batch's sampler (a chain recorder, say), or None. A CUDA out-of-memory error
    halves the batch size and retries, with a warning through ``log``; the images stay the same.
    """
    plan = sampler if isinstance(sampler, SamplingPlan) else resolve(sampler, denoiser.schedule, steps, spacing,
                                                                      **dict(options or {}))
    chw = tuple(int(s) for s in shape)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (n,):
            raise ValueError(f"sample_batches needs one label per sample: {n}, got shape {tuple(labels.shape)}")
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        noise = PerSampleNoise(seed, start + done)
        try:
            x_T = noise.initial((b, *chw), denoiser.device)
            callback = on_first_batch(x_T) if (on_first_batch is not None and done == 0) else None
            den = denoiser if labels is None else denoiser.with_cond(labels[done:done + b].to(denoiser.device))
            x = sample(den, x_T, sampler=plan, noise=noise, callback=callback)
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise DdpmkitError(f"out of GPU memory on {denoiser.device} even at batch size 1") from None
            batch_size = max(1, batch_size // 2)
            log(f"warning: out of GPU memory on {denoiser.device}; retrying with batch size {batch_size} "
                f"(the samples stay the same)")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield start + done, denoiser.to_pixels(x)  # a latent run's samples decoded into images
        done += b
