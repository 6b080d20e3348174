"""The class-specific gate matrix's objective and scores (:doc:`/methods/gates`, Liang et al. 2020).

The projection onto column-wise max-one matrices, the sparsity penalty and its density
bounds, the similarity of features and gates, the block order of a gate matrix and the rule
that makes a filter class-specific. The estimator that learns the gates is
:class:`xnn_toolkit.heads.ClassSpecificGates`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..datafit import as_labels
from ..errors import InputError

__all__ = [
    "block_order",
    "default_g",
    "density_bounds",
    "gate_similarity",
    "l1_density",
    "project_gates",
    "sparsity_penalty",
]


def project_gates(gates: torch.Tensor) -> torch.Tensor:
    r"""Project onto ``{G ∈ [0, 1]^{C x K} : ‖G^k‖_∞ = 1 for every filter k}``
    (:doc:`/methods/gates`).

    ``G^k ← clamp(G^k / max_c G_{ck}, 0, 1)`` column by column. A column whose maximum is
    ``≤ 0`` (or not finite) cannot be rescaled; it is reset to all ones, i.e. the filter is
    opened to every class again, as at the start of a fit (the authors' code divides by
    the maximum unconditionally and would produce ``inf`` / ``NaN`` there). NaN entries of
    other columns count as 0.

    Parameters
    ----------
    gates : Tensor
        ``C x K``.

    Returns
    -------
    Tensor
        ``C x K`` (new tensor), every value in [0, 1] and every column's maximum exactly 1.
    """
    if gates.dim() != 2:
        raise InputError(f"gates must be C x K, got shape {tuple(gates.shape)}")
    g = torch.nan_to_num(gates, nan=0.0)
    top = g.amax(0, keepdim=True)
    ok = torch.isfinite(top) & (top > 0)
    safe = torch.where(ok, top, torch.ones_like(top))
    out = (torch.nan_to_num(g, posinf=0.0, neginf=0.0) / safe).clamp(0.0, 1.0)
    # an infinite maximum: its own entries become 1, the finite ones 0
    out = torch.where(torch.isposinf(g) & torch.isposinf(top), torch.ones_like(out), out)
    ok = ok | torch.isposinf(top)
    out = torch.where(ok, out, torch.ones_like(out))
    # x / x can round below 1 in float; the maximum must be exactly 1
    idx = out.argmax(0, keepdim=True)
    return out.scatter(0, idx, 1.0)


def sparsity_penalty(gates: torch.Tensor, g: float) -> torch.Tensor:
    r"""The hinge ``d(‖G‖₁, g) = max(0, ‖G‖₁ − g)`` with ``‖G‖₁ = Σ_{c,k} |G_ck|``.

    See :doc:`/methods/gates`.

    Parameters
    ----------
    gates : Tensor
        ``C x K``.
    g : float
        Upper bound of ``‖G‖₁``.

    Returns
    -------
    Tensor
        Scalar (differentiable in ``gates``).
    """
    return torch.relu(gates.abs().sum() - g)


def l1_density(gates: torch.Tensor) -> float:
    r"""L1-density ``‖G‖₁ / (C·K)`` (:doc:`/methods/gates`, Liang et al. 2020 App. A).

    Parameters
    ----------
    gates : Tensor
        ``C x K``.

    Returns
    -------
    float
    """
    return float(gates.detach().abs().sum() / gates.numel())


def density_bounds(num_classes: int, num_filters: int, g: float) -> tuple[float, float]:
    r"""The convergence interval ``[1/C, g/(C·K)]`` of the L1-density (Liang et al. 2020 App. A).

    Parameters
    ----------
    num_classes, num_filters : int
        ``C`` and ``K``.
    g : float

    Returns
    -------
    (float, float)
    """
    return 1.0 / num_classes, g / (num_classes * num_filters)


def default_g(num_classes: int, num_filters: int) -> float:
    """``g`` used when none is given: ``max(0.2·C·K, 2·K)``, capped at ``C·K``.

    Equals the authors' ``0.2·C·K`` for ``C ≥ 10``; see the module docstring.

    Parameters
    ----------
    num_classes, num_filters : int

    Returns
    -------
    float
    """
    c, k = num_classes, num_filters
    return float(min(max(0.2 * c * k, 2.0 * k), c * k))


def gate_similarity(
    features: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Similarities ``S_yc = cos(ā_y, G_c)`` over true positives and false negatives.

    :doc:`/methods/gates`, Liang et al. 2020 App. C. ``ā_y`` is the mean pooled activation of the
    images of
    class ``y`` that are predicted as ``y`` (true positives, ``S_TP``) or as another class
    (false negatives, ``S_FN``); ``G_c`` is row ``c`` of the gate matrix. A class without
    such images has a NaN row; a zero vector has cosine 0.

    Parameters
    ----------
    features : Tensor
        ``N x K`` pooled activations.
    labels, predictions : Tensor
        ``N`` true and predicted classes.
    gates : Tensor
        ``C x K``.

    Returns
    -------
    (Tensor, Tensor)
        ``S_TP`` and ``S_FN``, each ``C x C`` float64 (rows: true class ``y``, columns: gate
        row ``c``).
    """
    if gates.dim() != 2:
        raise InputError(f"gates must be C x K, got shape {tuple(gates.shape)}")
    c, k = gates.shape
    x, y = _check_features(features, labels, c)
    if x.shape[1] != k:
        raise InputError(f"features have {x.shape[1]} channels but the gates have K = {k}")
    p = torch.as_tensor(predictions).long().reshape(-1).to(y.device)
    if p.shape != y.shape:
        raise InputError(f"predictions must have shape {tuple(y.shape)}, got {tuple(p.shape)}")
    x = x.double()
    gd = gates.detach().double().to(x.device)
    out = []
    for sel in (p == y, p != y):
        s = torch.full((c, c), float("nan"), dtype=torch.float64)
        for ci in range(c):
            m = sel & (y == ci)
            if bool(m.any()):
                mean = x[m].mean(0)
                s[ci] = F.cosine_similarity(mean[None, :], gd, dim=1, eps=1e-12).cpu()
        out.append(s)
    return out[0], out[1]


def block_order(gates: torch.Tensor) -> torch.Tensor:
    """Column order that shows the gate matrix's blocks.

    Filters are sorted by the class of their largest gate (first class on ties), then,
    within a class, by the column's sum, ascending: the most exclusive filters first
    (every column's maximum is 1 after projection, so the maximum itself cannot order them).

    Parameters
    ----------
    gates : Tensor
        ``C x K``.

    Returns
    -------
    Tensor
        ``K`` int64 permutation of the filters.
    """
    if gates.dim() != 2:
        raise InputError(f"gates must be C x K, got shape {tuple(gates.shape)}")
    g = gates.detach().double().cpu()
    arg = g.argmax(0)
    total = g.sum(0)
    keys = np.lexsort((np.arange(g.shape[1]), total.numpy(), arg.numpy()))
    return torch.from_numpy(keys.astype(np.int64))


def _check_features(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(features)
    if x.dim() != 2 or x.shape[0] == 0:
        raise InputError(f"features must be N x K with N >= 1, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise InputError("features hold NaN or infinite values")
    y = as_labels(labels).reshape(-1).to(x.device)
    if y.shape[0] != x.shape[0]:
        raise InputError(f"labels must have N = {x.shape[0]} entries, got {y.shape[0]}")
    _check_label_range(y, num_classes)
    return x, y


def _check_label_range(y: torch.Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InputError(
            f"labels must lie in [0, {num_classes}) (C = {num_classes} classes), got values "
            f"in [{int(y.min())}, {int(y.max())}]; pass num_classes= if the data has more "
            "classes than the model's outputs"
        )


def _class_filters(gates: torch.Tensor, c: int, threshold: float, others: float) -> torch.Tensor:
    g = gates.detach().double().cpu()
    own = g[c]
    rest = torch.cat([g[:c], g[c + 1 :]])
    if rest.shape[0]:
        ok = (own > threshold) & (rest.amax(0) <= threshold) & (rest.mean(0) <= others)
    else:
        ok = own > threshold
    idx = torch.nonzero(ok).reshape(-1)
    others = g.sum(0) - own
    keys = np.lexsort((idx.numpy(), others[idx].numpy(), -own[idx].numpy()))
    return idx[torch.from_numpy(keys.astype(np.int64))]
