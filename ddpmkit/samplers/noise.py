"""Where a sampler's randomness comes from.

:class:`PerSampleNoise` gives sample i (counted over the whole run, from ``start``) its own stream, seeded from
(seed, i): its initial noise and every step's noise are then the same whatever the batch it is drawn in, so an
image depends on neither the batch size, nor an out-of-memory retry, nor the number of processes (the idea of EDM's
``StackedRandomGenerator``). :class:`GeneratorNoise` draws whole batches from one ``torch.Generator``.

Both are drawn on the CPU (or the generator's device) and moved to the sample's device, so a seed gives the same
numbers on every machine.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..rng import derive_seed

__all__ = ["NoiseSource", "PerSampleNoise", "GeneratorNoise", "as_noise"]


class NoiseSource:
    """A stream of standard normal batches: ``initial(shape, device)`` for x_T, then ``like(x)`` for each step."""

    def initial(self, shape: Sequence[int], device=None) -> torch.Tensor:
        raise NotImplementedError

    def like(self, x: torch.Tensor) -> torch.Tensor:
        return self.initial(x.shape, x.device)


class PerSampleNoise(NoiseSource):
    """Sample ``start + j`` of a batch draws from its own generator seeded with ``derive_seed(seed, start + j)``."""

    def __init__(self, seed: int, start: int = 0):
        self.seed = int(seed)
        self.start = int(start)
        self._gens: list[torch.Generator] = []

    def _generators(self, n: int) -> list[torch.Generator]:
        if not self._gens:
            self._gens = [torch.Generator(device="cpu").manual_seed(derive_seed(self.seed, self.start + j))
                          for j in range(n)]
        elif len(self._gens) != n:
            raise ValueError(f"this noise stream serves batches of {len(self._gens)} samples, not {n}")
        return self._gens

    def initial(self, shape, device=None) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        gens = self._generators(shape[0])
        x = torch.stack([torch.randn(shape[1:], generator=g) for g in gens])
        return x if device is None else x.to(device)


class GeneratorNoise(NoiseSource):
    """Whole batches from one ``torch.Generator`` (on its own device), in the order they are asked for."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def initial(self, shape, device=None) -> torch.Tensor:
        g = self.generator
        if g is None:
            return torch.randn(tuple(shape), device=device)
        x = torch.randn(tuple(shape), generator=g, device=g.device)
        return x if device is None else x.to(device)


def as_noise(noise) -> NoiseSource:
    """A NoiseSource from a NoiseSource, a ``torch.Generator``, an int seed (per-sample streams) or None."""
    if isinstance(noise, NoiseSource):
        return noise
    if noise is None or isinstance(noise, torch.Generator):
        return GeneratorNoise(noise)
    if isinstance(noise, int) and not isinstance(noise, bool):
        return PerSampleNoise(noise)
    raise TypeError(f"noise must be a NoiseSource, a torch.Generator, an int seed or None, got {type(noise).__name__}")
