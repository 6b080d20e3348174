"""Streaming covariance and correlation matrices.

Shared by the orthogonality metric (:doc:`/methods/metrics`: covariance of x-feature heatmaps over
the
whole dataset) and the Gaussian total correlation (:doc:`/methods/paths`). Batches are merged with
the
pairwise update of Chan, Golub & LeVeque in float64, so the whole dataset never has to sit in
memory and the result does not depend on how it was cut into batches (up to rounding).
"""

from __future__ import annotations

import math
import warnings

import torch

from ..errors import InputError
from ._inputs import _as_maps

__all__ = ["CovarianceAccumulator"]


class CovarianceAccumulator:
    """Accumulate the mean and co-moment matrix of ``D`` variables over batches of samples.

    For the samples seen so far, ``mean = 1/S Σ_s x_s`` and the co-moment
    ``M = Σ_s (x_s − mean)(x_s − mean)ᵀ``; merging a batch ``b`` into the total ``a``:
    ``δ = mean_b − mean_a``, ``mean = mean_a + δ S_b / S``,
    ``M = M_a + M_b + δδᵀ S_a S_b / S``.

    Examples
    --------
    >>> acc = CovarianceAccumulator()
    >>> for batch in batches:                      # doctest: +SKIP
    ...     acc.update(batch)                      # S_b x D
    >>> acc.covariance().shape                     # doctest: +SKIP
    torch.Size([D, D])
    """

    def __init__(self) -> None:
        self.count_ = 0
        self.mean_: torch.Tensor | None = None
        self.comoment_: torch.Tensor | None = None

    def update(self, samples: torch.Tensor) -> CovarianceAccumulator:
        """Add a batch of samples.

        Parameters
        ----------
        samples : Tensor
            ``S x D``: ``S`` samples of ``D`` variables (any float dtype, any device).

        Returns
        -------
        CovarianceAccumulator
            ``self``.
        """
        x = _as_maps(samples, "samples", ndims=(2,)).double()
        if self.mean_ is not None and x.shape[1] != self.mean_.shape[0]:
            raise InputError(
                f"samples have {x.shape[1]} variables but earlier batches had "
                f"{self.mean_.shape[0]}; every batch must have the same variables"
            )
        s_b = x.shape[0]
        if s_b == 0:
            return self
        mean_b = x.mean(0)
        xc = x - mean_b
        m_b = xc.T @ xc
        if self.mean_ is None:
            self.count_, self.mean_, self.comoment_ = s_b, mean_b, m_b
            return self
        mean_b = mean_b.to(self.mean_.device)
        m_b = m_b.to(self.mean_.device)
        s_a = self.count_
        s = s_a + s_b
        delta = mean_b - self.mean_
        self.mean_ = self.mean_ + delta * (s_b / s)
        self.comoment_ = self.comoment_ + m_b + torch.outer(delta, delta) * (s_a * s_b / s)
        self.count_ = s
        return self

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """The ``D x D`` covariance ``M / (S − ddof)`` (float64)."""
        if self.comoment_ is None or self.count_ - ddof <= 0:
            raise InputError(
                f"the covariance needs more than {ddof} sample(s), got {self.count_}; "
                "call update() with data first"
            )
        return self.comoment_ / (self.count_ - ddof)

    def correlation(self) -> torch.Tensor:
        """The ``D x D`` correlation matrix ``P = diag(C)^-½ C diag(C)^-½`` (float64).

        A variable with zero variance (e.g. an x-feature whose heatmaps are all zero) has no
        defined correlation; it is given correlation 0 with every other variable and 1 with
        itself, which leaves ``||P||_F`` and ``det P`` as they are for the other variables,
        and a warning is issued.
        """
        return _correlation(self.covariance())


def _constant(var: torch.Tensor) -> torch.Tensor:
    """Variables of (numerically) zero variance: ``var <= 1e-12 · max var``, bool mask."""
    scale = var.abs().max() if var.numel() else var.new_tensor(0.0)
    return var <= scale * 1e-12 if bool(scale > 0) else torch.ones_like(var, dtype=torch.bool)


def _correlation(cov: torch.Tensor) -> torch.Tensor:
    var = torch.diagonal(cov)
    dead = _constant(var)
    if bool(dead.any()):
        warnings.warn(
            f"{int(dead.sum())} of {var.numel()} variables have zero variance (constant, e.g. "
            "all-zero heatmaps); they are treated as uncorrelated with the others",
            RuntimeWarning,
            stacklevel=3,
        )
    inv = torch.where(dead, torch.zeros_like(var), var.clamp_min(1e-300).rsqrt())
    p = cov * inv[:, None] * inv[None, :]
    p = torch.where(dead[:, None] | dead[None, :], torch.zeros_like(p), p)
    p = p + torch.diag(dead.to(p.dtype))
    return 0.5 * (p + p.T)


def _neg_logdet(p: torch.Tensor) -> float:
    """``−log det P`` of a correlation matrix; ``+inf`` when ``P`` is singular."""
    sign, logabs = torch.linalg.slogdet(p)
    if float(sign) <= 0 or not math.isfinite(float(logabs)):
        return math.inf
    return -float(logabs)
