"""Orthogonality of x-feature heatmaps (:doc:`/methods/metrics`, Khorram 2020 §3.3.2).

Each x-feature's heatmaps over the whole dataset form one long vector; ``C`` is the ``n x n``
covariance of these vectors, ``P = diag(C)^-½ C diag(C)^-½`` their correlation matrix, and

- ``O₁ = ||P||_F − √n`` (the thesis prints ``||P||_F √n``; the stated optimum 0 at ``P = I``
  shows that the minus is meant),
- ``O₂ = −log det P``.

Both are 0 when the heatmaps of different x-features are uncorrelated and grow as they
overlap; ``O₂`` is ``+inf`` for exactly linearly dependent heatmaps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError
from ._inputs import _as_maps
from .covariance import CovarianceAccumulator, _constant, _correlation, _neg_logdet

__all__ = ["Orthogonality", "OrthogonalityAccumulator", "orthogonality", "orthogonality_scores"]


@dataclass
class Orthogonality:
    """Orthogonality of ``n`` x-features.

    Attributes
    ----------
    o1 : float
        ``||P||_F − √n`` (0 at best).
    o2 : float
        ``−log det P`` (0 at best, ``+inf`` for linearly dependent heatmaps).
    correlation : Tensor
        ``n x n`` correlation matrix ``P`` (float64).
    n_constant : int
        x-features whose heatmaps are constant (e.g. all zero) over the data: they have no
        correlation and count as uncorrelated with the others (a warning says so).
    """

    o1: float
    o2: float
    correlation: torch.Tensor
    n_constant: int = 0


def orthogonality_scores(correlation: torch.Tensor) -> Orthogonality:
    """``O₁`` and ``O₂`` of a correlation matrix (:doc:`/methods/metrics`).

    Parameters
    ----------
    correlation : Tensor
        ``n x n`` correlation matrix ``P``.

    Returns
    -------
    Orthogonality
    """
    p = _as_maps(correlation, "correlation", ndims=(2,), expected="n x n").double()
    if p.shape[0] != p.shape[1]:
        raise InputError(f"correlation must be square (n x n), got {tuple(p.shape)}")
    n = p.shape[0]
    o1 = float(torch.linalg.matrix_norm(p, "fro")) - math.sqrt(n)
    return Orthogonality(o1=o1, o2=_neg_logdet(p), correlation=p)


def _samples(heatmaps: torch.Tensor) -> torch.Tensor:
    """``N x n x H x W`` (or ``N x n x D``) -> ``(N·H·W) x n``: one column per x-feature."""
    maps = _as_maps(heatmaps, "heatmaps", ndims=(3, 4), expected="N x n x H x W or N x n x D")
    n, k = maps.shape[:2]
    return maps.reshape(n, k, -1).transpose(1, 2).reshape(-1, k)


class OrthogonalityAccumulator:
    """Build the x-feature covariance over batches, then score it.

    Examples
    --------
    >>> acc = OrthogonalityAccumulator()
    >>> for maps in batches:              # N x n x H x W heatmaps of n x-features
    ...     acc.update(maps)              # doctest: +SKIP
    >>> acc.result().o1                   # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.covariance_ = CovarianceAccumulator()

    def update(self, heatmaps: torch.Tensor) -> OrthogonalityAccumulator:
        """Add a batch of heatmaps.

        Parameters
        ----------
        heatmaps : Tensor
            ``N x n x H x W`` (or ``N x n x D`` for already flattened maps): ``n`` x-feature
            heatmaps for each of ``N`` images; every pixel of every image is one sample.

        Returns
        -------
        OrthogonalityAccumulator
            ``self``.
        """
        self.covariance_.update(_samples(heatmaps))
        return self

    def result(self) -> Orthogonality:
        """``O₁``, ``O₂`` and ``P`` of everything seen so far."""
        cov = self.covariance_.covariance()
        out = orthogonality_scores(_correlation(cov))
        out.n_constant = int(_constant(torch.diagonal(cov)).sum())
        return out


def orthogonality(heatmaps: torch.Tensor) -> Orthogonality:
    """Orthogonality of x-feature heatmaps over a dataset held in memory (:doc:`/methods/metrics`).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x n x H x W``: the heatmaps of ``n`` x-features on ``N`` images (or
        ``N x n x D``). Use :class:`OrthogonalityAccumulator` to stream batches.

    Returns
    -------
    Orthogonality
        ``o1``, ``o2`` and the correlation matrix.
    """
    return OrthogonalityAccumulator().update(heatmaps).result()
