"""Information-bottleneck class paths (NAD) on a frozen network, all classes in one pass.

:doc:`/methods/paths` (Hu et al. 2021, the supplement of Hu et al., ICCV 2021, and the official NAD
code).
For every class ``c`` and every masked layer ``i`` a channel mask ``μ_i^c = sigmoid(m_i^c)``
of shape ``1 x C_i x 1 x 1`` multiplies the layer's output, ``r̃_i = μ_i^c · r_i``; the
backbone is frozen and in eval mode. A channel is on the class's path when ``μ > 0.5``.

One pass trains every class: each image of a batch uses its own class's masks, gathered by
label (``masks[labels] -> B x C_i x 1 x 1``), and the batch loss is the sum over the classes
present of each class's mean loss, so the gradient that reaches class ``c``'s masks is
exactly that of a one-class fit on the class-``c`` images of the batch (the network is in
eval mode: images do not interact). The optimisers update only the rows of classes present
in the batch (:class:`_RowOptimizer`), so a fit of all classes follows, class by class, the
same trajectory as fits of one class at a time over the same batches.

Objectives (per class ``c``; ``B_c`` its images in the batch, ``L`` the number of masked
layers, ``mean_e`` a mean over the ``C_i·H_i·W_i`` elements of a layer's output):

``objective="paper"`` (supplement eq. 14 per hidden layer, eq. 15 for the output)::

    L_c = mean_{b ∈ B_c} [ Σ_i ( β·mean_e((r_i μ_i)²) + mean_e((r_i − μ_i r_i)²) )
                           − log ỹ_c ]

where ``r_i`` is the output of layer ``i`` in the masked forward (masks of earlier layers
applied), before its own mask, and ``ỹ_c = softmax(masked logits)_c`` is the network's own
probability of class ``c``, so the Bernoulli log-likelihood of eq. 15 with ``y_c = 1`` is the
cross-entropy. Eq. 14 is a per-unit expression (univariate Gaussians, eq. 11-13); we average
it over the units of a layer instead of summing, so that both terms of a layer share one
reduction (``β`` keeps the paper's meaning, the per-unit trade-off, and the minimiser of the
layer term alone is ``μ = 1/(1+β)`` for any ``r ≠ 0``) and a layer's weight does not grow
with its size; the layers are summed, the images of a class averaged.

``objective="code"`` (official code)::

    L_c = [ CE(masked logits, c) + Σ_i MSE(μ_i r_i, r_i⁰) ] / L + β Σ_i mean_C(μ_i²) / L

with ``r_i⁰`` the activation of the unmasked network, the MSE averaged over the elements of
the class's images that the unmasked network classifies correctly (0 when there are none)
and the CE over all its images.

β in the paper (chosen by the elbow of reconstruction vs regularisation loss, supplement B):
see :data:`PAPER_BETAS`. With the per-unit means above, values on a different network or
data set must be re-chosen the same way.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._guard import model_guard
from .._io import checked_load, load_estimator_files, loaded_params, save_estimator_files
from ..datafit import as_labels, data_fit
from ..errors import AssetError, InputError, NotFittedError
from ..hooks import intervene
from ._base import Head, keeps_global_rng
from ._placement import auto_layers, check_layers

__all__ = [
    "PAPER_BETAS",
    "ClassPaths",
    "HitRates",
    "Misclassification",
    "binarize",
    "code_objective",
    "composite_2x2",
    "hit_rate",
    "jaccard_matrix",
    "mask_from_logit",
    "misclassification_analysis",
    "paper_objective",
    "path_similarity",
]

#: β of the NAD paper (supplement B), per network and data set.
PAPER_BETAS: dict[str, float] = {
    "vgg16/imagenet": 4.5,
    "vgg16/places365": 5.0,
    "resnet50/imagenet": 0.02,
    "resnet50/places365": 0.02,
    "densenet121/imagenet": 0.02,
    "densenet121/places365": 0.02,
    "darts/imagenet": 0.45,
    "darts/places365": 0.20,
}

OBJECTIVES = ("paper", "code")
OPTIMIZERS = ("adam", "normalized")


# --------------------------------------------------------------------------- formulas


def mask_from_logit(logit: torch.Tensor) -> torch.Tensor:
    """``μ = sigmoid(m)``: mask values in (0, 1) from their logits (:doc:`/methods/paths`)."""
    return torch.sigmoid(logit)


def binarize(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Channels on the path: ``μ > threshold`` (:doc:`/methods/paths`: ``μ > 0.5``), as bool."""
    return masks > threshold


def _class_mean(
    values: torch.Tensor, rows: torch.Tensor, n_rows: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``out_k = Σ_{b: rows_b = k} w_b v_b / Σ_{b: rows_b = k} w_b`` (0 where the sum is 0)."""
    w = torch.ones_like(values) if weight is None else weight.to(values.dtype)
    num = values.new_zeros(n_rows).index_add(0, rows, values * w)
    den = values.new_zeros(n_rows).index_add(0, rows, w)
    return num / den.clamp_min(1e-12) * (den > 0)


def _flat_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """``B x ...`` -> ``B``: mean of squares over everything but the batch dimension."""
    return x.pow(2).flatten(1).mean(1)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B x C`` masks -> broadcastable against ``B x C x H x W`` (or ``B x C``)."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 2))


def paper_objective(
    pre: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    beta: float,
) -> dict[str, torch.Tensor]:
    r"""The paper's objective per class (:doc:`/methods/paths`; supplement eq. 14 and 15).

    ``L_c = mean_{b∈c} [Σ_i (β·mean_e((r_i μ_i)²) + mean_e((r_i − μ_i r_i)²)) − log ỹ_c]``
    with ``ỹ_c = softmax(masked logits)_c`` (see the module docstring for the reductions).

    Parameters
    ----------
    pre : sequence of Tensor
        Per masked layer, ``B x C_i x H_i x W_i`` (or ``B x C_i``): ``r_i``, the layer's
        output in the masked forward before its own mask.
    masks : sequence of Tensor
        Per layer, ``B x C_i``: each image's class mask ``μ_i``.
    logits : Tensor
        ``B x K`` logits of the masked network.
    labels : Tensor
        ``B`` class (logit) index of each image.
    rows : Tensor
        ``B`` row of each image's class among the ``n_rows`` fitted classes.
    n_rows : int
    beta : float

    Returns
    -------
    dict of str to Tensor
        ``n_rows`` vectors: ``"total"``, ``"kl"`` (the β-weighted terms), ``"rec"`` and
        ``"bce"``; rows without images are 0.
    """
    kl = logits.new_zeros(len(labels))
    rec = logits.new_zeros(len(labels))
    for r, mu in zip(pre, masks):
        m = _expand(mu, r)
        kl = kl + beta * _flat_mean_sq(r * m)
        rec = rec + _flat_mean_sq(r - m * r)
    bce = F.cross_entropy(logits, labels, reduction="none")
    out = {
        "kl": _class_mean(kl, rows, n_rows),
        "rec": _class_mean(rec, rows, n_rows),
        "bce": _class_mean(bce, rows, n_rows),
    }
    out["total"] = out["kl"] + out["rec"] + out["bce"]
    return out


def code_objective(
    post: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    row_masks: Sequence[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    correct: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    r"""The official code's objective per class (:doc:`/methods/paths`).

    ``L_c = [CE_c + Σ_i MSE_ic] / L + β Σ_i mean_C(μ_ic²) / L`` where ``CE_c`` is the mean
    cross-entropy of the masked logits over the class's images and ``MSE_ic`` the mean of
    ``(μ_i r_i − r_i⁰)²`` over the elements of the class's correctly classified images.

    Parameters
    ----------
    post : sequence of Tensor
        Per layer, ``B x C_i x ...``: the masked activations ``μ_i r_i``.
    original : sequence of Tensor
        Per layer, the same shape: ``r_i⁰`` of the unmasked network.
    row_masks : sequence of Tensor
        Per layer, ``R x C_i``: the masks of every fitted class (``R = n_rows``).
    logits : Tensor
        ``B x K`` masked logits.
    labels, rows : Tensor
        ``B`` logit index and row of each image's class.
    correct : Tensor
        ``B`` bool, the unmasked network's prediction is right.
    beta : float

    Returns
    -------
    dict of str to Tensor
        ``R`` vectors ``"total"``, ``"ce"``, ``"mse"``, ``"reg"`` (each already divided by
        ``L``); rows without images are 0.
    """
    n_rows = row_masks[0].shape[0]
    n_layers = len(post)
    present = torch.zeros(n_rows, dtype=torch.bool, device=logits.device)
    present[rows] = True
    ce = _class_mean(F.cross_entropy(logits, labels, reduction="none"), rows, n_rows)
    mse = logits.new_zeros(n_rows)
    reg = logits.new_zeros(n_rows)
    for p, o, mu in zip(post, original, row_masks):
        mse = mse + _class_mean(_flat_mean_sq(p - o), rows, n_rows, weight=correct)
        reg = reg + mu.pow(2).mean(1)
    out = {
        "ce": ce / n_layers,
        "mse": mse / n_layers,
        "reg": beta * reg * present / n_layers,
    }
    out["total"] = out["ce"] + out["mse"] + out["reg"]
    return out


# --------------------------------------------------------------------------- analyses


def jaccard_matrix(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Jaccard index ``|A ∩ B| / |A ∪ B|`` of every pair of rows of two binary matrices.

    Two empty sets count as identical (index 1).

    Parameters
    ----------
    a : Tensor
        ``K x C`` bool (or 0/1).
    b : Tensor, optional
        ``K' x C`` (default: ``a``).

    Returns
    -------
    Tensor
        ``K x K'`` in [0, 1].
    """
    a = torch.as_tensor(a).bool()
    b = a if b is None else torch.as_tensor(b).bool()
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise InputError(
            f"expected two K x C binary matrices with the same C, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    af, bf = a.double(), b.double()
    inter = af @ bf.T
    union = af.sum(1)[:, None] + bf.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).float()


def path_similarity(paths: dict[str, torch.Tensor]) -> torch.Tensor:
    """Path similarity of classes: mean over layers of the Jaccard index (:doc:`/methods/paths`).

    Parameters
    ----------
    paths : dict of str to Tensor
        Per layer, ``K x C_i`` binary paths (rows are classes).

    Returns
    -------
    Tensor
        ``K x K`` symmetric, 1 on the diagonal.
    """
    if not paths:
        raise InputError("paths is empty; pass {layer: K x C binary paths}")
    mats = [jaccard_matrix(p) for p in paths.values()]
    if len({m.shape for m in mats}) != 1:
        raise InputError("every layer's paths must have the same number of classes (rows)")
    return torch.stack(mats).mean(0)


def composite_2x2(
    images: torch.Tensor,
    labels: torch.Tensor,
    n: int,
    random_state: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2 x 2 composites of images of 4 different classes (:doc:`/methods/paths`, hit rate).

    Quadrants are numbered 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right. Images
    are tiled at full resolution, so a composite of ``H x W`` images is ``2H x 2W``.

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W``.
    labels : Tensor
        ``N`` class labels (at least 4 distinct classes).
    n : int
        Number of composites.
    random_state : int
        Seed of the choice of classes and images.

    Returns
    -------
    (Tensor, Tensor, Tensor)
        ``n x C x 2H x 2W`` composites, ``n x 4`` class of each quadrant and ``n x 4``
        index of each quadrant's source image.
    """
    if images.dim() != 4 or labels.shape != (len(images),):
        raise InputError(
            f"expected images N x C x H x W and labels (N,), got {tuple(images.shape)} and "
            f"{tuple(labels.shape)}"
        )
    classes = labels.unique()
    if len(classes) < 4:
        raise InputError(
            f"2 x 2 composites need images of 4 different classes, got {len(classes)} "
            f"class(es): {classes.tolist()}"
        )
    if n < 1:
        raise InputError(f"n must be >= 1, got {n}")
    gen = torch.Generator().manual_seed(random_state)
    by_class = {int(c): torch.nonzero(labels == c).flatten() for c in classes}
    quad_cls = torch.empty(n, 4, dtype=torch.long)
    src = torch.empty(n, 4, dtype=torch.long)
    for j in range(n):
        pick = classes[torch.randperm(len(classes), generator=gen)[:4]]
        for q, c in enumerate(pick.tolist()):
            pool = by_class[c]
            quad_cls[j, q] = c
            src[j, q] = pool[torch.randint(len(pool), (1,), generator=gen)]
    tiles = images[src]  # n x 4 x C x H x W
    top = torch.cat([tiles[:, 0], tiles[:, 1]], dim=-1)
    bottom = torch.cat([tiles[:, 2], tiles[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2), quad_cls, src


def hit_rate(
    maps: torch.Tensor,
    quadrants: torch.Tensor,
    top: float = 0.1,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Share of a map's top pixels inside a quadrant (:doc:`/methods/paths`, hit rate; chance 0.25).

    Each map is min-max normalised, upsampled bilinearly to ``size``, and its
    ``ceil(top · H · W)`` largest pixels are kept; the hit is the share of them that lie in
    the given quadrant (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right; the split
    is at ``H // 2`` and ``W // 2``).

    Parameters
    ----------
    maps : Tensor
        ``M x h x w``.
    quadrants : Tensor
        ``M`` quadrant index of each map's class.
    top : float
        Share of pixels kept, in (0, 1].
    size : (int, int), optional
        Upsampled size ``H x W`` (default: the maps' own size).

    Returns
    -------
    Tensor
        ``M`` hit shares in [0, 1].
    """
    if maps.dim() != 3:
        raise InputError(f"maps must be M x h x w, got shape {tuple(maps.shape)}")
    quadrants = torch.as_tensor(quadrants, device=maps.device).long()
    if quadrants.shape != (len(maps),) or bool(((quadrants < 0) | (quadrants > 3)).any()):
        raise InputError(f"quadrants must be {len(maps)} values in 0..3")
    if not 0 < top <= 1:
        raise InputError(f"top must be in (0, 1], got {top}")
    m = maps.float()
    lo = m.flatten(1).min(1).values[:, None, None]
    hi = m.flatten(1).max(1).values[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    if size is not None and tuple(size) != tuple(m.shape[-2:]):
        m = F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    h, w = m.shape[-2:]
    k = max(1, math.ceil(top * h * w))
    idx = m.flatten(1).topk(k, dim=1).indices
    row_lower = (idx // w) >= h // 2
    col_right = (idx % w) >= w // 2
    quad = row_lower.long() * 2 + col_right.long()
    return (quad == quadrants[:, None]).float().mean(1)


@dataclass
class HitRates:
    """Hit rates of class paths on 2 x 2 composites, per layer (:doc:`/methods/paths`).

    Attributes
    ----------
    layers : list of str
        The spatial masked layers, shallow to deep.
    mean, std : Tensor
        ``L`` mean and standard deviation of the hits over composites and quadrants.
    values : Tensor
        ``M x L`` every hit (``M`` = composites x 4).
    chance : float
        0.25.
    """

    layers: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    values: torch.Tensor
    chance: float = 0.25


@dataclass
class Misclassification:
    """Most similar paths of the true class vs the network's top predictions
    (:doc:`/methods/paths`).

    Attributes
    ----------
    indices : Tensor
        ``M`` indices of the misclassified images.
    true : Tensor
        ``M`` true classes.
    predicted : Tensor
        ``M x k`` the network's top-k classes.
    similar : Tensor
        ``M x k`` the k classes whose paths are most similar to the true class's (itself
        excluded).
    overlap : Tensor
        ``M`` expected number of the network's top-k classes that are among the k most
        similar ones (an integer unless similarities tie).
    top1_in_similar : Tensor
        ``M`` probability that the network's (wrong) top-1 is among the k most similar
        classes: 0 or 1, or a fraction when similarities tie at the k-th place (ties broken
        uniformly at random, so equal similarities score exactly the chance level).
    rate : float
        Mean of ``top1_in_similar``.
    chance : float
        The rate expected if the similar classes were drawn at random: ``k / (K − 1)``.
    """

    indices: torch.Tensor
    true: torch.Tensor
    predicted: torch.Tensor
    similar: torch.Tensor
    overlap: torch.Tensor
    top1_in_similar: torch.Tensor
    rate: float
    chance: float


def _topk_membership(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Probability of each entry to be among the k largest of its row, ties broken at random.

    With ``g`` entries strictly larger and ``e`` equal to an entry (itself included), it is
    ``clamp((k − g) / e, 0, 1)``.
    """
    v = scores[:, :, None]
    others = scores[:, None, :]
    greater = (others > v).sum(2).to(scores.dtype)
    equal = (others == v).sum(2).to(scores.dtype)
    return ((k - greater) / equal).clamp(0, 1)


def misclassification_analysis(
    similarity: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor | Sequence[int] | None = None,
    k: int = 3,
) -> Misclassification:
    """Compare, for each misclassified image, the true class's most similar paths with the
    network's top-k predictions (:doc:`/methods/paths`).

    Parameters
    ----------
    similarity : Tensor
        ``K x K`` path similarity (:func:`path_similarity`).
    logits : Tensor
        ``N x K_out`` logits of the unmasked network.
    labels : Tensor
        ``N`` true classes.
    classes : Tensor or sequence of int, optional
        The logit index of each similarity row (default ``0 .. K−1``). Images whose class
        has no row are skipped; predictions are restricted to these classes.
    k : int

    Returns
    -------
    Misclassification
    """
    sim = torch.as_tensor(similarity).float().cpu()
    n_cls = sim.shape[0]
    if sim.dim() != 2 or sim.shape[1] != n_cls:
        raise InputError(f"similarity must be K x K, got {tuple(sim.shape)}")
    cls = torch.arange(n_cls) if classes is None else torch.as_tensor(classes).long().cpu()
    if cls.shape != (n_cls,):
        raise InputError(f"classes must list {n_cls} logit indices, got {tuple(cls.shape)}")
    if not 1 <= k <= n_cls - 1:
        raise InputError(f"k must be between 1 and K - 1 = {n_cls - 1}, got {k}")
    logits = torch.as_tensor(logits).float().cpu()
    labels = as_labels(labels).cpu()
    if logits.dim() != 2 or labels.shape != (len(logits),):
        raise InputError("logits must be N x K_out and labels (N,)")
    if int(cls.max()) >= logits.shape[1]:
        raise InputError(f"classes reach {int(cls.max())} but logits have {logits.shape[1]}")
    row_of = torch.full((logits.shape[1],), -1, dtype=torch.long)
    row_of[cls] = torch.arange(n_cls)
    valid = (labels >= 0) & (labels < logits.shape[1])
    rows = torch.where(valid, row_of[labels.clamp(0, logits.shape[1] - 1)], -1)
    sub = logits[:, cls]  # N x K, restricted to the classes with paths
    pred_rows = sub.topk(k, dim=1).indices
    wrong = (rows >= 0) & (pred_rows[:, 0] != rows)
    idx = torch.nonzero(wrong).flatten()
    r = rows[idx]
    s = sim[r].clone()
    s[torch.arange(len(r)), r] = -math.inf
    sim_rows = s.topk(k, dim=1).indices
    pr = pred_rows[idx]
    member = _topk_membership(s, k)  # M x K probability of being among the k most similar
    picked = member.gather(1, pr)
    overlap = picked.sum(1)
    top1 = picked[:, 0]
    return Misclassification(
        indices=idx,
        true=cls[r],
        predicted=cls[pr],
        similar=cls[sim_rows],
        overlap=overlap,
        top1_in_similar=top1,
        rate=float(top1.float().mean()) if len(idx) else float("nan"),
        chance=k / (n_cls - 1),
    )


# --------------------------------------------------------------------------- data feeding


def _is_pair(data: object) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


def _is_dataset(data: object) -> bool:
    return (
        hasattr(data, "__getitem__")
        and hasattr(data, "__len__")
        and not isinstance(data, torch.utils.data.DataLoader | list | tuple | torch.Tensor)
    )


def _check_pair(data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise InputError(
            f"data as (images, labels) must be N x ... and (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if len(x) == 0:
        raise InputError("data is empty")
    return x, y.long()


def _known_labels(data: object) -> torch.Tensor | None:
    """All labels of the data when they are available without reading the images."""
    if _is_pair(data):
        return _check_pair(data)[1]
    if _is_dataset(data):
        for attr in ("targets", "labels"):
            t = getattr(data, attr, None)
            if t is not None and not callable(t):
                t = torch.as_tensor(t)
                if t.dim() == 1 and len(t) == len(data):
                    return t.long()
        label = getattr(data, "label", None)  # e.g. SyntheticParts.label(i), no rendering
        if callable(label):
            return torch.tensor([int(label(i)) for i in range(len(data))], dtype=torch.long)
    return None


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        x, y = batch[0], batch[1]
        if isinstance(x, torch.Tensor):
            return x, as_labels(y).reshape(-1)
    raise InputError(
        f"each batch must be (images, labels, ...), got {type(batch).__name__}; pass a "
        "DataLoader of (image, label) pairs, a Dataset, or an (images, labels) tuple"
    )


def _batches(
    data: object, batch_size: int, gen: torch.Generator, door: Callable | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(images, labels)`` batches, shuffled with ``gen`` where we own the order;
    ``door(x, start)`` (:meth:`xnn_toolkit.datafit.DataFit.images`) checks each image batch."""
    seen = 0
    for x, y in _raw_batches(data, batch_size, gen):
        yield (x if door is None else door(x, seen)), y
        seen += int(x.shape[0])


def _raw_batches(
    data: object, batch_size: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if _is_pair(data):
        x, y = _check_pair(data)
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            yield x[idx], y[idx]
    elif _is_dataset(data):
        seed = int(torch.randint(2**62, (1,), generator=gen))
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=_collate_pairs,
        )
        yield from loader
    else:
        try:
            it = iter(data)  # type: ignore[call-overload]
        except TypeError:
            raise InputError(
                f"data must be an (images, labels) tuple of tensors, a Dataset or an "
                f"iterable of batches, got {type(data).__name__}"
            ) from None
        for batch in it:
            yield _split_batch(batch)


def _collate_pairs(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``(image, label, ...)`` samples; what follows the label (annotations) is
    dropped, so that datasets with ground truth can be used as they are."""
    try:
        xs = torch.stack([torch.as_tensor(s[0]) for s in samples])
    except (TypeError, IndexError, RuntimeError) as exc:
        raise InputError(
            "dataset samples must be (image, label, ...) with C x H x W images of one size; "
            f"got {type(samples[0]).__name__}: {exc}"
        ) from None
    if not all(isinstance(s, tuple | list) and len(s) > 1 for s in samples):
        raise InputError("dataset samples must be (image, label, ...) pairs; labels are missing")
    return xs, as_labels([s[1] for s in samples])


def _first_images(data: object) -> torch.Tensor:
    """A one-image batch for probing the network."""
    if _is_pair(data):
        return _check_pair(data)[0][:1]
    if _is_dataset(data):
        if len(data) == 0:
            raise InputError("the dataset is empty")
        item = data[0]
        x = item[0] if isinstance(item, tuple | list) else item
        return torch.as_tensor(x).unsqueeze(0)
    try:
        one_shot = iter(data) is data  # type: ignore[call-overload]
    except TypeError:
        one_shot = False
    if one_shot:
        raise InputError(
            f"data is a one-shot iterator ({type(data).__name__}) but fitting reads it once per "
            "epoch; pass a DataLoader, a list of batches, a Dataset or an (images, labels) tuple"
        )
    for batch in _batches(data, 1, torch.Generator()):
        return batch[0][:1]
    raise InputError("data yields no batches")


class _RowOptimizer:
    """Adam or normalised-gradient steps on ``R x C`` parameters, row (class) by row.

    Only the rows of classes present in a batch move; their step counters, moments and bias
    corrections are their own, so each row follows exactly the trajectory of a one-class
    fit on the same batches.

    - ``adam``: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
      ``θ ← θ − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`` (as ``torch.optim.Adam``).
    - ``normalized`` (official NAD code): ``θ ← θ − lr · g / ||g||₂``, the norm taken per
      class row of each layer (a row with zero gradient does not move).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        kind: str,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.kind = kind
        self.lr = lr
        self.betas = betas
        self.eps = eps
        n_rows = self.params[0].shape[0]
        self.t = torch.zeros(n_rows, dtype=torch.long, device=self.params[0].device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], present: torch.Tensor) -> None:
        sel = present.reshape(-1, 1)
        if self.kind == "normalized":
            for p, g in zip(self.params, grads):
                norm = g.norm(dim=1, keepdim=True)
                upd = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
                p.sub_(self.lr * upd * sel)
            return
        b1, b2 = self.betas
        self.t += present.long()
        t = self.t.clamp_min(1).to(self.params[0].dtype).reshape(-1, 1)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.copy_(torch.where(sel, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(sel, b2 * v + (1 - b2) * g * g, v))
            upd = (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p.sub_(self.lr * upd * sel)


# --------------------------------------------------------------------------- masked runs


class _MaskRun:
    """State shared by the forward edits of one :func:`intervene` block.

    ``mode`` is ``"off"`` (pass through, record the output when ``record`` is set) or
    ``"mask"`` (multiply by the masks of ``rows``, keep the pre- and post-mask outputs).
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.rows: torch.Tensor | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.pre: dict[str, torch.Tensor] = {}
        self.post: dict[str, torch.Tensor] = {}
        self.record = False

    def edit(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            if self.record:
                self.pre[name] = out.detach().clone()
            return out
        m = self.masks[name][self.rows]
        post = out * _expand(m, out)
        self.pre[name] = out
        self.post[name] = post
        # Hand the rest of the network a copy: an in-place op downstream (ReLU(inplace),
        # ``x += shortcut``) must not change the tensor the loss reads.
        return post.clone()


class ClassPaths(Head):
    """Information-bottleneck class paths of a frozen network (:doc:`/methods/paths`, NAD).

    Parameters
    ----------
    layers : "auto" or sequence of layer specs
        Where to put masks. ``"auto"``: after every ReLU'd conv (after the pool when one
        follows) of a plain network, after the stem and every residual block of a ResNet,
        after every dense block and transition of a DenseNet. Or dotted names / modules.
        Conv outputs ``N x C x H x W`` get masks ``1 x C x 1 x 1``; fully connected outputs
        ``N x D`` get masks ``1 x D`` (each unit is a "channel"). Other shapes are an error.
    objective : {"paper", "code"}
        The supplement's eq. 14/15 or the official code's loss (module docstring).
    beta : float
        Weight of the information (regularisation) term; the paper's values are in
        :data:`PAPER_BETAS` (VGG16 4.5 / 5.0, ResNet50 and DenseNet121 0.02, DARTS 0.45 /
        0.20 on ImageNet / Places365).
    optimizer : {"adam", "normalized"}
        Adam, or the official code's ``m ← m − lr · g / ||g||`` (per class and layer).
    lr : float
        Step size on the mask logits (official code: 0.1 with normalised steps).
    epochs : int
        Passes over the data (official code: about 20).
    batch_size : int
        Images per step, all classes mixed (official code: 16 images of one class).
    classes : sequence of int, optional
        Which classes (logit indices) get paths; default: every class present in the data.
        Images of other classes are skipped.
    min_images : int
        A class with fewer images is an error.
    init : float
        Initial mask value ``μ₀`` in (0, 1) (default 0.5: a channel that never receives a
        gradient, e.g. one that is zero on every image of the class under the paper's
        objective, stays at 0.5 and is off the path).
    threshold : float
        Binarisation threshold (``μ > threshold`` is on the path).
    random_state : int
        Seed of the batch order.
    device : str or torch.device, optional
        Must match the model's device (the model is never moved); default: the model's.

    Attributes
    ----------
    layers_ : list of str
        Masked layers, shallow to deep.
    classes_ : Tensor
        ``K`` classes (logit indices) with paths; row ``k`` of every mask is class
        ``classes_[k]``.
    masks_ : dict of str to Tensor
        ``K x C_i`` mask values in [0, 1] (CPU).
    paths_ : dict of str to Tensor
        ``K x C_i`` bool, ``masks_ > threshold``.
    logits_ : dict of str to Tensor
        ``K x C_i`` mask logits.
    n_images_ : Tensor
        ``K`` images per class seen in one epoch.
    history_ : list of dict
        Per epoch, the mean per-step loss terms (summed over classes).
    n_outputs_ : int
        Number of logits of the network.

    Examples
    --------
    >>> cp = ClassPaths(beta=1.0, epochs=5).fit(model, (images, labels))  # doctest: +SKIP
    >>> cp.paths_["layer4.1"].shape                                      # doctest: +SKIP
    torch.Size([10, 256])
    >>> cp.similarity()                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: str | Sequence[object] = "auto",
        objective: str = "paper",
        beta: float = 1.0,
        optimizer: str = "adam",
        lr: float = 0.1,
        epochs: int = 20,
        batch_size: int = 16,
        classes: Sequence[int] | None = None,
        min_images: int = 10,
        init: float = 0.5,
        threshold: float = 0.5,
        random_state: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        self.layers = layers
        self.objective = objective
        self.beta = beta
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.classes = classes
        self.min_images = min_images
        self.init = init
        self.threshold = threshold
        self.random_state = random_state
        self.device = device

    # ---------------------------------------------------------------- validation
    def _check_params(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.beta, int | float) and self.beta >= 0):
            raise InputError(f"beta must be a number >= 0, got {self.beta!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not 0 < self.init < 1:
            raise InputError(f"init must be in (0, 1), got {self.init}")
        if not 0 < self.threshold < 1:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (isinstance(self.min_images, int) and self.min_images >= 1):
            raise InputError(f"min_images must be an int >= 1, got {self.min_images!r}")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise InputError(
                f"layers must be 'auto' or a list of layer names, got the string "
                f"{self.layers!r}; wrap a single name in a list"
            )

    def _rows_setup(self, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes, row_of)``: the fitted classes and the row of every logit (−1: none)."""
        if self.classes is None:
            cls = torch.arange(n_out)
        else:
            cls = torch.as_tensor(list(self.classes), dtype=torch.long)
            if cls.dim() != 1 or len(cls) == 0:
                raise InputError("classes must be a non-empty list of class indices")
            bad = [c for c in cls.tolist() if not 0 <= c < n_out]
            if bad:
                raise InputError(
                    f"classes {bad} are out of range for a network with {n_out} logits"
                )
            if len(cls.unique()) != len(cls):
                raise InputError(f"classes {cls.tolist()} lists a class more than once")
        row_of = torch.full((n_out,), -1, dtype=torch.long)
        row_of[cls] = torch.arange(len(cls))
        return cls, row_of

    def _check_counts(self, counts: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Keep the rows with images; error on classes with too few."""
        if self.classes is not None:
            short = {int(c): int(n) for c, n in zip(cls, counts) if n < self.min_images}
        else:
            short = {int(c): int(n) for c, n in zip(cls, counts) if 0 < n < self.min_images}
        if short:
            raise InputError(
                f"too few images for some classes (class: images) {short}; each class needs "
                f"at least min_images={self.min_images}: add data, lower min_images, or pass "
                "classes= without them"
            )
        keep = counts > 0
        if not bool(keep.any()):
            raise InputError("no image of any class to fit: check the labels")
        missing = cls[~keep].tolist()
        if missing and self.classes is None:
            warnings.warn(
                f"classes {missing[:20]}{'...' if len(missing) > 20 else ''} have no images; "
                "they get no path",
                stacklevel=3,
            )
        return keep

    # ---------------------------------------------------------------- fitting
    @keeps_global_rng
    def fit(self, model: nn.Module, data: object) -> ClassPaths:
        """Learn the masks of every class in one pass over the data per epoch.

        Parameters
        ----------
        model : nn.Module
            The frozen network (``N x C x H x W -> N x K`` logits). It is left exactly as it
            was: parameters, buffers, modes, ``requires_grad`` flags, ``.grad`` and hooks.
        data : tuple, Dataset or iterable
            ``(images, labels)`` tensors (``N x C x H x W``, ``N``), a map-style dataset of
            ``(image, label)`` items, or an iterable of ``(images, labels)`` batches (e.g. a
            DataLoader, which keeps its own order and augmentation). Images are moved to the
            model's device batch by batch.

        Returns
        -------
        ClassPaths
            ``self``.
        """
        self._check_params()
        door = data_fit(model, data, arg="data").images
        model = getattr(model, "model", model)  # a LoadedModel normalised raw data at the door
        dev = model_device(model, self.device)
        probe = door(_first_images(data), 0).to(dev)
        layers = auto_layers(model, probe) if self.layers == "auto" else list(self.layers)
        names, shapes = check_layers(model, layers, probe)
        with model_guard(model, eval_mode=True), torch.no_grad():
            out = model(probe)
        if not isinstance(out, torch.Tensor) or out.dim() != 2:
            raise InputError(
                f"the model must return N x K logits, got "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        n_out = int(out.shape[1])
        cls, row_of = self._rows_setup(n_out)
        n_rows = len(cls)
        known = _known_labels(data)
        if known is not None:
            if bool(((known < 0) | (known >= n_out)).any()):
                raise InputError(f"labels must be in 0..{n_out - 1} (the network's logits)")
            sel = row_of[known]
            self._check_counts(torch.bincount(sel[sel >= 0], minlength=n_rows), cls)

        logit0 = math.log(self.init / (1 - self.init))
        params = {
            n: torch.full((n_rows, shapes[n][1]), logit0, device=dev, requires_grad=True)
            for n in names
        }
        opt = _RowOptimizer(list(params.values()), self.optimizer, self.lr)
        run = _MaskRun()
        gen = torch.Generator().manual_seed(self.random_state)
        row_of_dev = row_of.to(dev)
        counts = torch.zeros(n_rows, dtype=torch.long)
        history = []
        edits = {n: partial(run.edit, n) for n in names}
        with intervene(model, edits, eval_mode=True, freeze=True):
            for epoch in range(self.epochs):
                sums: dict[str, float] = {}
                steps = 0
                for x, y in _batches(data, self.batch_size, gen, door):
                    if bool(((y < 0) | (y >= n_out)).any()):
                        raise InputError(f"labels must be in 0..{n_out - 1} (the network's logits)")
                    y = y.to(dev)
                    rows = row_of_dev[y]
                    keep = rows >= 0
                    if not bool(keep.any()):
                        continue
                    if not bool(keep.all()):
                        x, y, rows = x[keep.to(x.device)], y[keep], rows[keep]
                    x = x.to(dev)
                    if epoch == 0:
                        counts += torch.bincount(rows, minlength=n_rows).cpu()
                    terms = self._step_loss(model, run, params, names, x, y, rows, n_rows)
                    total = terms["total"].sum()
                    grads = torch.autograd.grad(total, list(params.values()))
                    present = torch.zeros(n_rows, dtype=torch.bool, device=dev)
                    present[rows] = True
                    opt.step(grads, present)
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach().sum())
                    steps += 1
                    run.pre.clear()
                    run.post.clear()
                if epoch == 0:
                    keep_rows = self._check_counts(counts, cls)
                history.append({k: v / max(steps, 1) for k, v in sums.items()})

        self.layers_ = names
        self.classes_ = cls[keep_rows]
        self.logits_ = {n: p.detach()[keep_rows.to(dev)].cpu() for n, p in params.items()}
        self.n_images_ = counts[keep_rows]
        self.history_ = history
        self.n_outputs_ = n_out
        self._set_masks()
        return self

    def _set_masks(self) -> None:
        self.masks_ = {n: mask_from_logit(v) for n, v in self.logits_.items()}
        self.paths_ = {n: binarize(v, self.threshold) for n, v in self.masks_.items()}

    def _step_loss(self, model, run, params, names, x, y, rows, n_rows) -> dict[str, torch.Tensor]:
        mus = {n: mask_from_logit(p) for n, p in params.items()}
        if self.objective == "code":
            run.mode, run.record = "off", True
            with torch.no_grad():
                clean = model(x)
            original = [run.pre[n] for n in names]
            correct = clean.argmax(1) == y
            run.pre.clear()
        run.mode, run.record, run.rows, run.masks = "mask", False, rows, mus
        logits = model(x)
        run.mode = "off"
        if self.objective == "paper":
            return paper_objective(
                [run.pre[n] for n in names],
                [mus[n][rows] for n in names],
                logits,
                y,
                rows,
                n_rows,
                float(self.beta),
            )
        return code_objective(
            [run.post[n] for n in names],
            original,
            [mus[n] for n in names],
            logits,
            y,
            rows,
            correct,
            float(self.beta),
        )

    # ---------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "masks_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def rows_of(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Row of each class in the mask matrices (``classes_`` index).

        Raises
        ------
        InputError
            A class without a path.
        """
        self._check_fitted()
        labels = as_labels(labels).reshape(-1).cpu()
        row_of = torch.full((self.n_outputs_,), -1, dtype=torch.long)
        row_of[self.classes_] = torch.arange(len(self.classes_))
        ok = (labels >= 0) & (labels < self.n_outputs_)
        rows = torch.where(ok, row_of[labels.clamp(0, self.n_outputs_ - 1)], -1)
        if bool((rows < 0).any()):
            bad = sorted(set(labels[rows < 0].tolist()))
            raise InputError(
                f"classes {bad} have no path; fitted classes: {self.classes_.tolist()}"
            )
        return rows

    @contextmanager
    def _masked(self, model: nn.Module, binary: bool) -> Iterator[_MaskRun]:
        self._check_fitted()
        dev = model_device(model, None)
        run = _MaskRun()
        src = self.paths_ if binary else self.masks_
        run.masks = {n: v.to(dev).float() for n, v in src.items()}
        with intervene(model, {n: partial(run.edit, n) for n in self.layers_}, freeze=True):
            yield run

    @torch.no_grad()
    def masked_logits(
        self,
        model: nn.Module,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        binary: bool = False,
    ) -> torch.Tensor:
        """Logits of the network with each image's class path applied.

        Parameters
        ----------
        model : nn.Module
        images : Tensor
            ``B x C x H x W``.
        classes : Tensor or sequence of int
            ``B`` class whose path each image runs through.
        binary : bool
            Use the binary paths (0/1) instead of the soft masks.

        Returns
        -------
        Tensor
            ``B x K_out`` (on the model's device).
        """
        rows = self.rows_of(classes)
        if len(rows) != len(images):
            raise InputError(f"got {len(images)} images but {len(rows)} classes")
        with self._masked(model, binary) as run:
            dev = model_device(model, None)
            run.mode, run.rows = "mask", rows.to(dev)
            return model(images.to(dev))

    @torch.no_grad()
    def class_maps(
        self,
        model: nn.Module,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        binary: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Masked activation summed over channels at every spatial masked layer.

        Each image runs through the path of its class; the map of layer ``i`` is
        ``Σ_c μ_i,c r_i,c`` (:doc:`/methods/paths`, hit rate).

        Parameters
        ----------
        model : nn.Module
        images : Tensor
            ``B x C x H x W``.
        classes : Tensor or sequence of int
            ``B`` classes.
        binary : bool
            Use the binary paths.

        Returns
        -------
        dict of str to Tensor
            ``B x H_i x W_i`` per spatial layer (CPU).
        """
        rows = self.rows_of(classes)
        if len(rows) != len(images):
            raise InputError(f"got {len(images)} images but {len(rows)} classes")
        with self._masked(model, binary) as run:
            dev = model_device(model, None)
            run.mode, run.rows = "mask", rows.to(dev)
            model(images.to(dev))
            return {n: run.post[n].sum(1).cpu() for n in self.layers_ if run.post[n].dim() == 4}

    def hit_rates(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        n_composites: int = 100,
        top: float = 0.1,
        batch_size: int = 16,
        binary: bool = False,
        random_state: int = 0,
    ) -> HitRates:
        """Hit rate of every spatial masked layer on 2 x 2 composites (:doc:`/methods/paths`).

        Composites of 4 images of different classes (:func:`composite_2x2`) run through each
        quadrant class's path; its map (:meth:`class_maps`) is min-max normalised, upsampled
        to the composite size and its top ``top`` pixels are scored (:func:`hit_rate`).

        Parameters
        ----------
        model : nn.Module
            Must accept ``2H x 2W`` inputs (e.g. a global or adaptive pooling before the
            classifier).
        images, labels : Tensor
            ``N x C x H x W`` and ``N``; only classes with paths are used.
        n_composites : int
        top : float
        batch_size : int
            Composites per forward (each runs 4 times, once per quadrant class).
        binary : bool
            Use the binary paths.
        random_state : int

        Returns
        -------
        HitRates
        """
        self._check_fitted()
        labels = as_labels(labels)
        has = torch.isin(labels, self.classes_)
        images, labels = images[has], labels[has]
        comp, quad_cls, _ = composite_2x2(images, labels, n_composites, random_state)
        size = tuple(comp.shape[-2:])
        values: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(comp), batch_size):
            c = comp[s : s + batch_size]
            q = quad_cls[s : s + batch_size]
            x = c.repeat_interleave(4, 0)
            cls = q.reshape(-1)
            quads = torch.arange(4).repeat(len(c))
            try:
                maps = self.class_maps(model, x, cls, binary=binary)
            except RuntimeError as exc:
                raise InputError(
                    f"the model failed on {size[0]} x {size[1]} composites ({exc}); hit rates "
                    "need a network that accepts twice the image size"
                ) from exc
            for n, m in maps.items():
                values.setdefault(n, []).append(hit_rate(m, quads, top=top, size=size))
        layers = [n for n in self.layers_ if n in values]
        if not layers:
            raise InputError("no masked layer is spatial (N x C x H x W); hit rates need maps")
        v = torch.stack([torch.cat(values[n]) for n in layers], 1)
        return HitRates(layers, v.mean(0), v.std(0), v)

    def similarity(self) -> torch.Tensor:
        """``K x K`` path similarity of the fitted classes (:func:`path_similarity`)."""
        self._check_fitted()
        return path_similarity(self.paths_)

    @torch.no_grad()
    def misclassification(
        self, model: nn.Module, data: object, k: int = 3, batch_size: int = 64
    ) -> Misclassification:
        """Run the unmasked network on ``data`` and compare its errors with the paths.

        See :func:`misclassification_analysis`; ``data`` as in :meth:`fit` (the order of a
        tuple or dataset is kept, so ``indices`` point into it).
        """
        self._check_fitted()
        dev = model_device(model, None)
        if _is_pair(data):
            x, y = _check_pair(data)
            batches: Iterator = (
                (x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)
            )
        elif _is_dataset(data):
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
            batches = (_split_batch(b) for b in loader)
        else:
            batches = _batches(data, batch_size, torch.Generator())
        all_logits, all_labels = [], []
        with model_guard(model, eval_mode=True):
            for xb, yb in batches:
                all_logits.append(model(xb.to(dev)).float().cpu())
                all_labels.append(yb.long().cpu())
        return misclassification_analysis(
            self.similarity(), torch.cat(all_logits), torch.cat(all_labels), self.classes_, k
        )

    # ---------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (JSON-serialisable where possible)."""
        layers = (
            self.layers
            if isinstance(self.layers, str)
            else [x if isinstance(x, str | int) else str(x) for x in self.layers]
        )
        return {
            "layers": layers,
            "objective": self.objective,
            "beta": self.beta,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "classes": None if self.classes is None else [int(c) for c in self.classes],
            "min_images": self.min_images,
            "init": self.init,
            "threshold": self.threshold,
            "random_state": self.random_state,
            "device": None if self.device is None else str(self.device),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (mask logits) and ``<path>.json`` (configuration).

        Both files are written atomically.
        """
        self._check_fitted()
        path = os.fspath(path)
        tensors = {f"logits/{n}": v.contiguous() for n, v in self.logits_.items()}
        tensors["classes"] = self.classes_.contiguous()
        tensors["n_images"] = self.n_images_.contiguous()
        meta = {
            "type": "ClassPaths",
            "params": self._saved_params(),
            "layers_": self.layers_,
            "n_outputs_": self.n_outputs_,
            "history_": self.history_,
        }
        save_estimator_files(path, tensors, meta)

    @classmethod
    @checked_load("the class paths")
    def load(cls, path: str | os.PathLike) -> ClassPaths:
        """Read paths written by :meth:`save`."""
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "ClassPaths", "the class paths")
        self = loaded_params(cls, meta["params"], path, "the class paths")
        try:
            self.layers_ = list(meta["layers_"])
            self.logits_ = {n: tensors[f"logits/{n}"] for n in self.layers_}
            self.classes_ = tensors["classes"].long()
            self.n_images_ = tensors["n_images"].long()
        except KeyError as exc:
            raise AssetError(f"{path}.safetensors lacks {exc}; the files do not match") from exc
        if any(v.shape[0] != len(self.classes_) for v in self.logits_.values()):
            raise AssetError(f"{path}.safetensors: mask rows do not match the classes")
        self.n_outputs_ = int(meta["n_outputs_"])
        self.history_ = meta.get("history_", [])
        self._set_masks()
        return self
