"""Pixel order of a heatmap: which pixels count as "top-k".

Used by the top-k intersection, the top-fraction segmentation, the deletion / insertion
curves and the masking test. Pixels are ordered by decreasing heatmap value; exact ties are
broken by row-major position (the pixel met first when reading rows top to bottom comes
first), so the order is deterministic on every device.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError
from ._inputs import _as_maps

__all__ = ["pixel_ranks", "top_pixels"]


def pixel_ranks(heatmaps: torch.Tensor) -> torch.Tensor:
    """Rank of every pixel within its map: 0 for the largest value.

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W``.

    Returns
    -------
    Tensor
        Same shape, int64 in ``[0, H·W)``; ties ranked in row-major order.
    """
    maps = _as_maps(heatmaps)
    flat = maps.reshape(*maps.shape[:-2], -1)
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ar = torch.arange(flat.shape[-1], device=flat.device).expand_as(order)
    ranks.scatter_(-1, order, ar)
    return ranks.reshape(maps.shape)


def top_pixels(heatmaps: torch.Tensor, k: int | float) -> torch.Tensor:
    """Boolean mask of the ``k`` highest pixels of each map.

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W``.
    k : int or float
        A pixel count (int, ``0 <= k <= H·W``) or a fraction of the map (float in [0, 1],
        ``ceil(k·H·W)`` pixels; e.g. 0.3 for the "top 30 %" segmentation of Liang et al. 2020 App.
        G).

    Returns
    -------
    Tensor
        Bool, same shape: exactly ``k`` pixels set per map (ties in row-major order).
    """
    maps = _as_maps(heatmaps)
    hw = maps.shape[-1] * maps.shape[-2]
    count = _pixel_count(k, hw)
    if count == 0:
        return torch.zeros(maps.shape, dtype=torch.bool, device=maps.device)
    # ``pixel_ranks(maps) < count`` without sorting: everything above the count-th largest
    # value, then its ties in row-major order until ``count`` pixels are set
    flat = maps.reshape(*maps.shape[:-2], hw)
    thr = flat.kthvalue(hw - count + 1, dim=-1, keepdim=True).values
    above = flat > thr
    tie = flat == thr
    room = count - above.sum(-1, keepdim=True)
    return (above | (tie & (tie.cumsum(-1) <= room))).reshape(maps.shape)


def _pixel_count(k: int | float, hw: int) -> int:
    if isinstance(k, bool):
        raise InputError(f"k must be an int count or a float fraction, got {k!r}")
    if isinstance(k, float):
        if not 0.0 <= k <= 1.0:
            raise InputError(f"a fraction k must lie in [0, 1], got {k}")
        # round first: 0.3 * 100 is 30.000000000000004 in floating point, not 31 pixels
        return min(hw, math.ceil(round(k * hw, 9)))
    if not isinstance(k, int) or not 0 <= k <= hw:
        raise InputError(f"k must be an int in [0, {hw}] (the map has {hw} pixels), got {k!r}")
    return k
