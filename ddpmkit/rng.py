"""Seeds derived from tuples of integers, so that related streams (per rank, per step, per sample) are unrelated."""

from __future__ import annotations

__all__ = ["derive_seed"]

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # the splitmix64 finaliser: a bijection of 64-bit integers in which every input bit reaches every output bit
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, *parts: int) -> int:
    """A 64-bit seed from ``seed`` and further integers: h = mix(seed), then h = mix(h ^ part) for each part.

    Nearby inputs give unrelated outputs (``seed + i`` would hand stream i of seed 0 the stream 0 of seed i).
    """
    h = _splitmix64(int(seed) & _MASK64)
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h
