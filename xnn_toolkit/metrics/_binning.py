"""Binned (plug-in) estimates of entropies and mutual information of units and labels.

Each unit's values are cut into ``B`` equal-width bins ``[e_b, e_{b+1})`` (the last bin closed,
as ``numpy.histogram``); values outside the edges fall into the end bins. Counts are joint
``unit bin x class`` tables, so the estimates stream over batches once the edges are fixed.
All logarithms are natural (nats).
"""

from __future__ import annotations

import torch

from ..errors import InputError


def _equal_width_edges(x: torch.Tensor, bins: int) -> torch.Tensor:
    """``D x (B + 1)`` float64 edges spanning each column's range (±0.5 for a constant one)."""
    if not isinstance(bins, int) or bins < 1:
        raise InputError(f"bins must be a positive int, got {bins!r}")
    if x.shape[0] == 0:
        raise InputError("at least one sample is needed to place the bin edges")
    xd = x.double()
    lo, hi = xd.amin(0), xd.amax(0)
    flat = hi <= lo
    lo = torch.where(flat, lo - 0.5, lo)
    hi = torch.where(flat, hi + 0.5, hi)
    t = torch.arange(bins + 1, device=x.device, dtype=torch.float64) / bins
    edges = lo[:, None] + (hi - lo)[:, None] * t[None, :]
    edges[:, -1] = hi  # exact right end, so the maximum falls in the last bin
    return edges


def _bin_index(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``S x D`` int64 bin of each value (``D x (B + 1)`` edges)."""
    inner = edges[:, 1:-1].contiguous()
    if inner.shape[1] == 0:
        return torch.zeros(x.shape, dtype=torch.long, device=x.device)
    idx = torch.searchsorted(inner, x.double().T.contiguous(), right=True)
    return idx.T


def _joint_counts(idx: torch.Tensor, labels: torch.Tensor, bins: int, classes: int) -> torch.Tensor:
    """``D x B x C`` float64 counts of (bin, class) per unit."""
    s, d = idx.shape
    unit = torch.arange(d, device=idx.device)[None, :]
    flat = (unit * bins + idx) * classes + labels[:, None]
    counts = torch.bincount(flat.reshape(-1), minlength=d * bins * classes)
    return counts.reshape(d, bins, classes).double()


def _plogp_sum(p: torch.Tensor, dim) -> torch.Tensor:
    """``−Σ p log p`` over ``dim`` with ``0 log 0 = 0``."""
    return -(torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1)), 0)).sum(dim)


def _entropy_split(joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``H(B)``, ``I(B; Y)``, ``H(B | Y)`` per unit from ``D x B x C`` counts.

    ``H(B | Y) = Σ_y p(y) H(B | Y = y)`` and ``I = H(B) − H(B | Y)`` (≥ 0 for plug-in
    estimates; clamped against rounding).
    """
    total = joint.sum((1, 2), keepdim=True).clamp_min(1)
    p = joint / total
    h = _plogp_sum(p.sum(2), 1)
    py = p.sum(1)  # D x C
    hc = _plogp_sum(p, (1, 2)) - _plogp_sum(py, 1)  # H(B, Y) − H(Y)
    hc = hc.clamp_min(0)
    return h, (h - hc).clamp_min(0), hc


def _binary_mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """``D x C``: ``I(B; [Y = c])`` of each unit with each one-vs-rest class indicator."""
    total = joint.sum((1, 2)).clamp_min(1)[:, None, None]  # D x 1 x 1
    inside = joint.transpose(1, 2)  # D x C x B
    outside = joint.sum(2)[:, None, :] - inside
    p = torch.stack([inside, outside], -1) / total[..., None]  # D x C x B x 2
    pb = p.sum(-1)  # D x C x B
    pz = p.sum(-2)  # D x C x 2
    return (_plogp_sum(pb, -1) + _plogp_sum(pz, -1) - _plogp_sum(p, (-2, -1))).clamp_min(0)
