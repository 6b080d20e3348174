"""Faithfulness of an explanation head to the network it explains (:doc:`/methods/metrics`).

- ``F_reg = 1/M Σ_m |ȳ^(m) − ŷ^(m)|``: mean absolute error between the head's approximation
  ``ȳ`` of a logit and the logit ``ŷ`` itself (the thesis prints the difference without its
  minus sign; the absolute loss is what is meant).
- ``F_cls = c_r / M``: share of the ``M`` examples whose predicted class stays the same when
  ``ŷ_c`` is replaced by ``ȳ_c`` in the network's logit vector.

Predicted class = first maximum of the logit vector (``torch.argmax``), before and after
the substitution, so exact ties resolve to the lowest class index in both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from ..errors import InputError
from ._inputs import _as_maps, _as_tensor

__all__ = ["f_cls", "f_reg"]

Reduction = Literal["mean", "none"]


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean(0)
    if reduction == "none":
        return x
    raise InputError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def f_reg(y_bar: torch.Tensor, y_hat: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Regression faithfulness ``F_reg = 1/M Σ |ȳ − ŷ|`` (:doc:`/methods/metrics`).

    Parameters
    ----------
    y_bar : Tensor
        ``M`` approximations of one logit by one head, or ``M x K`` for ``K`` heads.
    y_hat : Tensor
        The network's logits being approximated, same shape as ``y_bar``.
    reduction : {"mean", "none"}
        ``"mean"`` over examples (default); ``"none"`` returns the per-example absolute
        errors (sum them over batches to stream).

    Returns
    -------
    Tensor
        Scalar (``M`` input) or ``K`` (one value per head) for ``"mean"``; the input shape
        for ``"none"``. Lower is better.
    """
    a = _as_maps(y_bar, "y_bar", ndims=(1, 2), expected="M or M x K")
    b = _as_maps(y_hat, "y_hat", ndims=(1, 2), expected="M or M x K")
    if a.shape != b.shape:
        raise InputError(
            f"y_bar {tuple(a.shape)} and y_hat {tuple(b.shape)} must have the same shape; "
            "pass the logits of the explained classes only (e.g. logits[:, classes])"
        )
    if a.shape[0] == 0:
        raise InputError("f_reg needs at least one example, got 0")
    return _reduce((a - b.to(a.device, a.dtype)).abs(), reduction)


def f_cls(
    y_bar: torch.Tensor,
    logits: torch.Tensor,
    classes: int | Sequence[int] | torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Classification faithfulness ``F_cls`` (:doc:`/methods/metrics`).

    The predicted class of each example is computed from its logit vector twice: as it is,
    and with the explained class's logit ``ŷ_c`` replaced by the head's ``ȳ_c``; ``F_cls`` is
    the share of examples whose prediction does not change.

    Parameters
    ----------
    y_bar : Tensor
        ``M``: one head's approximation of class ``classes``'s logit; or ``M x K``: ``K``
        one-vs-all heads, column ``k`` approximating class ``classes[k]``. Each column is
        substituted on its own (the others keep the network's logits).
    logits : Tensor
        ``M x C`` the network's logits ``ŷ``.
    classes : int, sequence of int, Tensor or None
        For a 1-D ``y_bar``: the explained class (an int) or one class per example (an ``M``
        tensor, e.g. the predicted classes). For a 2-D ``y_bar``: the ``K`` explained classes;
        ``None`` means all classes, ``K = C``.
    reduction : {"mean", "none"}
        ``"mean"`` over examples (default) or ``"none"`` for the per-example booleans
        "prediction unchanged" (average them over batches to stream).

    Returns
    -------
    Tensor
        ``"mean"``: a scalar (1-D ``y_bar``) or ``K`` shares in [0, 1], one per head.
        ``"none"``: ``M`` or ``M x K`` bool. Higher is better.
    """
    yb = _as_maps(y_bar, "y_bar", ndims=(1, 2), expected="M or M x K")
    lg = _as_maps(logits, "logits", ndims=(2,), expected="M x C").to(yb.device)
    m, c = lg.shape
    if yb.shape[0] != m:
        raise InputError(f"y_bar has {yb.shape[0]} examples but logits has {m}")
    if m == 0:
        raise InputError("f_cls needs at least one example, got 0")
    single = yb.dim() == 1
    if single:
        if classes is None:
            raise InputError(
                "a 1-D y_bar explains one class: pass classes=<the class index> "
                "(or an M tensor of per-example classes)"
            )
        cls = _as_tensor(classes, "classes").long().to(yb.device)
        if cls.dim() == 0:
            cls = cls.expand(m)
        if cls.shape != (m,):
            raise InputError(f"classes must be an int or an M = {m} tensor, got {tuple(cls.shape)}")
        per_row = cls[:, None]
        yb = yb[:, None]
    else:
        k = yb.shape[1]
        if classes is None:
            if k != c:
                raise InputError(
                    f"y_bar has {k} heads but logits has {c} classes; pass classes=[...] "
                    "naming the class that each column of y_bar explains"
                )
            cls = torch.arange(c, device=yb.device)
        else:
            cls = _as_tensor(classes, "classes").long().reshape(-1).to(yb.device)
            if cls.numel() != k:
                raise InputError(
                    f"classes must name {k} classes (one per column), got {cls.numel()}"
                )
        per_row = cls[None, :].expand(m, k)
    if per_row.numel() and (int(per_row.min()) < 0 or int(per_row.max()) >= c):
        raise InputError(f"classes must lie in [0, {c - 1}], got {per_row.unique().tolist()}")
    pred = lg.argmax(1)
    kept = torch.empty(per_row.shape, dtype=torch.bool, device=yb.device)
    # Materialise the substituted logit vectors a few heads at a time: exact argmax
    # semantics (first maximum) at a bounded memory cost.
    step = max(1, (1 << 24) // max(1, m * c))
    for s in range(0, per_row.shape[1], step):
        idx = per_row[:, s : s + step]
        mod = lg[:, None, :].expand(m, idx.shape[1], c).clone()
        mod.scatter_(2, idx[:, :, None], yb[:, s : s + step, None].to(lg.dtype))
        kept[:, s : s + step] = mod.argmax(2) == pred[:, None]
    kept = kept[:, 0] if single else kept
    if reduction == "none":
        return kept
    return _reduce(kept.to(yb.dtype), reduction)
