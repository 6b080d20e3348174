"""Counter-based random numbers: uniforms that depend only on ``(seed, index, slot)``.

A synthetic sample must depend on its ``(seed, index)`` alone, whatever order samples are
drawn in and however many are drawn together. Hashing the counter with SplitMix64 (Steele,
Lea & Flood, OOPSLA 2014) gives that in a few vectorised integer operations per number,
with no generator state, identical on every platform.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser of ``z + golden`` (uint64 arithmetic wraps modulo 2^64)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, indices: np.ndarray, slots: int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)`` keyed by ``(seed, index, slot)``.

    Parameters
    ----------
    seed : int
        Stream seed (any Python int; taken modulo 2^64).
    indices : ndarray
        ``N`` non-negative sample indices.
    slots : int
        Numbers per sample ``K``.

    Returns
    -------
    ndarray
        ``N x K`` float64; entry ``[n, k]`` depends only on ``(seed, indices[n], k)``.
    """
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed & _MASK64], dtype=np.uint64))
        per_sample = _mix(key ^ np.asarray(indices, dtype=np.int64).astype(np.uint64))
        z = per_sample[:, None] + np.arange(slots, dtype=np.uint64)[None, :] * _GOLDEN
        bits = _mix(z) >> np.uint64(11)
    return bits.astype(np.float64) * (1.0 / (1 << 53))
