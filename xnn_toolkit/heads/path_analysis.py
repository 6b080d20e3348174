"""What learned class paths say: overlaps, similarities, hit rates, misclassifications.

:doc:`/methods/paths`. Jaccard overlaps and path similarity between classes, the 2 x 2
composite figure data, the hit rate of an image's activations on its class path, and the
analysis of misclassified images against the most similar classes' paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..datafit import as_labels
from ..errors import InputError

__all__ = [
    "HitRates",
    "Misclassification",
    "composite_2x2",
    "hit_rate",
    "jaccard_matrix",
    "misclassification_analysis",
    "path_similarity",
]


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
