"""The SRAE network of XNN and its losses (:doc:`/methods/xnn`).

The grouped encoder / decoder of every explained output (one block per head, batched as
grouped linear layers), its predictor initialisation, and the losses: faithfulness, the
sparse reconstruction loss and its per-dimension error, the pull-away term.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "faithfulness_loss",
    "pull_away_loss",
    "reconstruction_error_per_dim",
    "sparse_reconstruction_loss",
]


def faithfulness_loss(
    y_bar: torch.Tensor, y_hat: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Faithfulness ``L_FS = Σ_i w_i (ȳ_i − ŷ_i)² / Σ_i w_i`` (:doc:`/methods/xnn`, eq. 3.1).

    Parameters
    ----------
    y_bar, y_hat : Tensor
        ``... x M`` predictions of the head and target logits (leading dims are heads).
    weight : Tensor, optional
        ``... x M`` sample weights (positives up-weighted); uniform when omitted, which gives
        the thesis's ``1/M Σ_i``.

    Returns
    -------
    Tensor
        ``...`` one loss per head.
    """
    sq = (y_bar - y_hat) ** 2
    if weight is None:
        return sq.mean(-1)
    return (sq * weight).sum(-1) / weight.sum(-1).clamp_min(1e-12)


def reconstruction_error_per_dim(z_rec: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    r"""``Q_k = 1/M Σ_i (E⁻¹(E(Z_i))_k − Z_ik)²`` (:doc:`/methods/xnn`, thesis eq. 3.2 / 3.5).

    Parameters
    ----------
    z_rec, z : Tensor
        ``... x M x S_z`` reconstruction and input.

    Returns
    -------
    Tensor
        ``... x S_z``.
    """
    return ((z_rec - z) ** 2).mean(-2)


def sparse_reconstruction_loss(q_k: torch.Tensor, q: float) -> torch.Tensor:
    r"""Log penalty ``L_SR = 1/S_z Σ_k log(1 + q·Q_k)`` (:doc:`/methods/xnn`, thesis eq. 3.5).

    Parameters
    ----------
    q_k : Tensor
        ``... x S_z`` per-dimension reconstruction errors ``Q_k``.
    q : float
        Sparsity parameter, ``q > 0``.

    Returns
    -------
    Tensor
        ``...``.
    """
    return torch.log1p(q * q_k).mean(-1)


def pull_away_loss(e: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Pull-away term ``L_PT = 1/(n(n−1)) Σ_{l≠l'} (E_lᵀE_l' / (‖E_l‖‖E_l'‖))²``.

    :doc:`/methods/xnn`, thesis eq. 3.3. ``E_l`` is x-feature ``l`` over the batch. 0 for orthogonal
    x-features, 1 when all are identical (up to positive scale).

    Parameters
    ----------
    e : Tensor
        ``... x M x n`` x-features.
    eps : float
        Guards all-zero x-features (their cosine is taken as 0).

    Returns
    -------
    Tensor
        ``...``.
    """
    n = e.shape[-1]
    if n < 2:
        return e.new_zeros(e.shape[:-2])
    unit = e / e.norm(dim=-2, keepdim=True).clamp_min(eps)
    cos = unit.transpose(-1, -2) @ unit
    off = cos.pow(2).sum((-1, -2)) - cos.diagonal(dim1=-2, dim2=-1).pow(2).sum(-1)
    return off / (n * (n - 1))


class _GroupedLinear(nn.Module):
    """``G`` independent linear maps: ``x (G x R x in) -> G x R x out``."""

    def __init__(
        self,
        groups: int,
        d_in: int,
        d_out: int,
        bias: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        # nn.Linear's default initialisation, U(-1/sqrt(in), 1/sqrt(in)), drawn from the
        # caller's generator so that fitting never touches torch's global RNG.
        bound = 1.0 / math.sqrt(d_in)
        w = torch.empty(groups, d_out, d_in).uniform_(-bound, bound, generator=generator)
        self.weight = nn.Parameter(w)
        b = torch.empty(groups, d_out).uniform_(-bound, bound, generator=generator)
        self.bias = nn.Parameter(b) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


def _predictor_init(groups: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """Initial predictor ``v``: ``|N(0, 1/n)|`` with alternating signs, ``G x n``.

    The x-features are non-negative (ReLU x-layer), so ``ȳ = vᵀE`` can only reach logits
    of a sign that some ``v_i`` has. With i.i.d. Gaussian ``v`` a head gets all ``n`` signs
    equal with probability ``2^(1−n)`` (1 in 16 for n = 5: with 10 classes, one head in
    every few fits); such a head fits the negatives' negative logits, its x-features die on
    the positives (ReLU zero, no gradient) and ``ȳ`` stays at 0 there, a stable failure.
    Alternating signs (``+, −, +, ...``) give every head both from the start.
    """
    mag = torch.randn(groups, n, generator=generator).abs() / math.sqrt(n)
    sign = torch.ones(n)
    sign[1::2] = -1.0
    return mag * sign


class _GroupedXNN(nn.Module):
    """Encoder, predictor and decoder of ``G`` heads (:doc:`/methods/xnn`)."""

    def __init__(
        self,
        groups: int,
        d_in: int,
        hidden: Sequence[int],
        n: int,
        decoder: bool,
        relu_x: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        sizes = [d_in, *hidden, n]
        self.encoder = nn.ModuleList(
            _GroupedLinear(groups, a, b, generator=generator) for a, b in zip(sizes[:-1], sizes[1:])
        )
        self.relu_x = relu_x
        self.v = nn.Parameter(_predictor_init(groups, n, generator))
        back = sizes[::-1]
        self.decoder = (
            nn.ModuleList(
                _GroupedLinear(groups, a, b, generator=generator)
                for a, b in zip(back[:-1], back[1:])
            )
            if decoder
            else None
        )

    def encode_rows(self, z: torch.Tensor) -> torch.Tensor:
        """``G x R x D`` rows (positions of images) -> ``G x R x n`` x-feature values."""
        h = z
        last = len(self.encoder) - 1
        for i, layer in enumerate(self.encoder):
            # In place: the grouped linear keeps its inputs, not its output, for backward,
            # so the ReLU need not allocate another G x R x width tensor.
            h = layer(h)
            if i < last or self.relu_x:
                h = torch.relu_(h)
        return h

    def decode_rows(self, e: torch.Tensor) -> torch.Tensor:
        h = e
        assert self.decoder is not None
        last = len(self.decoder) - 1
        for i, layer in enumerate(self.decoder):
            h = layer(h)
            if i < last:
                h = torch.relu_(h)
        return h


def _head_block(module: _GroupedXNN, a: int, b: int) -> _GroupedXNN:
    """A new grouped module holding copies of heads ``a .. b-1`` of ``module``."""
    enc = module.encoder
    sizes = [enc[0].weight.shape[2], *(layer.weight.shape[1] for layer in enc)]
    block = _GroupedXNN(
        b - a,
        sizes[0],
        sizes[1:-1],
        sizes[-1],
        decoder=module.decoder is not None,
        relu_x=module.relu_x,
        generator=torch.Generator().manual_seed(0),
    ).to(module.v.device)
    with torch.no_grad():
        for (_, part), (_, full) in zip(block.named_parameters(), module.named_parameters()):
            part.copy_(full[a:b])
    return block
