"""Localization metrics: IoU / APn (Liang et al. 2020 App. H), pointing games, top-k intersection.

- ``IoU_x = |S ∧ Ŝ| / |S ∨ Ŝ|`` between a ground-truth mask ``S`` and a predicted one ``Ŝ``;
  ``APn_c = mean over images of class c of [IoU ≥ n %]``. Per filter ``k`` (App. H.1): the
  class it localizes best ``c* = argmax_c APn_c^k``, ``IoU^k = IoU_{c*}^k``,
  ``APn^k = APn_{c*}^k``; per class, the mean over the filters focused on it; overall, the
  mean over all filters. For one map per image (CAM, App. H.2): per class and over all images.
- Pointing game (TorchRay convention, :doc:`/methods/metrics`): the heatmap's maximum point is a hit
when a
  mask pixel lies closer than ``tolerance`` pixels (Euclidean, pixel centres), or when the
  point is on the mask (so ``tolerance=0`` is the plain pointing game).
- Energy-based pointing game: the share of the positive heatmap mass inside the mask.
- Top-k intersection (Theiner et al.): the share of the ``k`` highest pixels inside the mask.

Edge cases (documented and tested): the maximum point is the *first* maximum in row-major
order (``torch.argmax``); a constant map (e.g. all zero) has no maximum point and is a miss;
an empty mask is a miss and has energy 0; a map without positive mass has energy 0; ``0/0``
IoU (both masks empty) is ``zero_division`` (0 by default, as in scikit-learn); classes
without images give NaN rows in per-class tables and are skipped in the argmax and means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data.types import PartBatch
from ..errors import InputError
from ..layers import LayerSpec
from ._inputs import (
    _as_labels,
    _as_maps,
    _as_masks,
    _as_tensor,
    _box_masks,
    _check_boxes,
    _per_image,
)
from .ranking import _pixel_count, pixel_ranks

__all__ = [
    "ClassLocalization",
    "FilterLocalization",
    "GateLocalization",
    "LocalizationAccumulator",
    "box_masks",
    "class_localization",
    "energy_pointing_game",
    "filter_localization",
    "gate_localization",
    "iou",
    "pointing_game",
    "top_k_intersection",
]


def box_masks(bbox: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks of inclusive boxes ``(x0, y0, x1, y1)``, for metrics that need a mask.

    Parameters
    ----------
    bbox : Tensor
        ``N x 4`` in pixels (e.g. ``PartBatch.bbox``).
    size : (int, int)
        Image size ``(H, W)``.

    Returns
    -------
    Tensor
        ``N x H x W`` bool, True on pixel centres inside the box.
    """
    b = _check_boxes(bbox, int(torch.as_tensor(bbox).shape[0]))
    return _box_masks(b, tuple(size), b.device)


def _masks(masks: torch.Tensor | PartBatch, maps: torch.Tensor) -> torch.Tensor:
    if isinstance(masks, PartBatch):
        if masks.object_mask is None:
            raise InputError(
                "this PartBatch has no object_mask; pass masks=box_masks(parts.bbox, (H, W)) "
                "to score against the bounding boxes"
            )
        masks = masks.object_mask
    return _per_image(_as_masks(masks, maps), maps)


def iou(
    pred: torch.Tensor, target: torch.Tensor | PartBatch, zero_division: float = 0.0
) -> torch.Tensor:
    """Intersection over union of binary masks (Liang et al. 2020 App. H).

    Parameters
    ----------
    pred : Tensor
        ``N x H x W`` or ``N x K x H x W`` bool predicted segmentations ``Ŝ`` (e.g.
        ``top_pixels(maps, 0.3)`` or ``maps >= threshold``).
    target : Tensor or PartBatch
        ``N x H x W`` ground-truth masks ``S`` (a PartBatch gives its ``object_mask``).
    zero_division : float
        Value when both masks are empty.

    Returns
    -------
    Tensor
        ``N`` or ``N x K`` float32 IoU in [0, 1].
    """
    raw = _as_tensor(pred, "pred")
    p = raw if raw.dtype == torch.bool else _as_maps(raw, "pred")
    if p.dim() not in (3, 4):
        raise InputError(f"pred must be N x H x W or N x K x H x W, got {tuple(p.shape)}")
    if p.dtype != torch.bool and not bool(((p == 0) | (p == 1)).all()):
        raise InputError(
            "pred must be binary masks; threshold the heatmaps first, e.g. "
            "top_pixels(heatmaps, 0.3) or heatmaps >= t"
        )
    pb = p if p.dtype == torch.bool else p != 0
    t = _masks(target, pb)
    inter = (pb & t).sum((-2, -1))
    union = (pb | t).sum((-2, -1))
    out = inter.float() / union.clamp_min(1).float()
    return torch.where(union > 0, out, torch.full_like(out, zero_division))


def _max_points(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, column of the first maximum of each map, and whether the map is constant."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    idx = flat.argmax(-1)
    w = maps.shape[-1]
    constant = flat.amax(-1) == flat.amin(-1)
    return idx // w, idx % w, constant


def pointing_game(
    heatmaps: torch.Tensor, masks: torch.Tensor | PartBatch, tolerance: float = 15
) -> torch.Tensor:
    """Pointing game with a tolerance (TorchRay convention; :doc:`/methods/metrics`).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W``.
    masks : Tensor or PartBatch
        ``N x H x W`` bool object masks (a PartBatch gives its ``object_mask``).
    tolerance : float
        Hit when some mask pixel is at distance ``< tolerance`` from the maximum point
        (TorchRay: ``(u − x)² + (v − y)² < tolerance²``), or the point is on the mask.

    Returns
    -------
    Tensor
        ``N`` or ``N x K`` bool hits. The point is the first maximum in row-major order;
        constant maps and empty masks are misses.
    """
    maps = _as_maps(heatmaps)
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0 pixels, got {tolerance}")
    m = _masks(masks, maps)
    row, col, constant = _max_points(maps)
    h, w = maps.shape[-2:]
    # squared pixel distances are integers: exact in int64 at any image size
    ys = torch.arange(h, device=maps.device)
    xs = torch.arange(w, device=maps.device)
    m = m.expand(*maps.shape[:-2], h, w)
    rows, cols, masks_ = row.reshape(-1), col.reshape(-1), m.reshape(-1, h, w)
    nearest = torch.empty_like(rows)
    far = (h + w) ** 2  # larger than any distance inside the image
    step = max(1, (1 << 24) // (h * w))  # bound the maps x H x W distance tensor
    for a in range(0, rows.shape[0], step):
        dy = (ys[None, :] - rows[a : a + step, None]) ** 2
        dx = (xs[None, :] - cols[a : a + step, None]) ** 2
        d2 = dy[:, :, None] + dx[:, None, :]
        nearest[a : a + step] = torch.where(masks_[a : a + step], d2, far).amin((-2, -1))
    nearest = nearest.reshape(row.shape)
    empty = ~m.any(-1).any(-1)
    hit = (nearest == 0) | (nearest < float(tolerance) ** 2)
    return hit & ~constant & ~empty


def energy_pointing_game(heatmaps: torch.Tensor, masks: torch.Tensor | PartBatch) -> torch.Tensor:
    """Energy-based pointing game: positive heatmap mass inside the mask over the total.

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W`` (negative values are clamped at 0).
    masks : Tensor or PartBatch
        ``N x H x W`` bool masks (object mask or :func:`box_masks`).

    Returns
    -------
    Tensor
        ``N`` or ``N x K`` in [0, 1] (heatmap dtype); 0 for a map with no positive mass.
    """
    maps = _as_maps(heatmaps)
    m = _masks(masks, maps)
    pos = maps.clamp_min(0)
    total = pos.sum((-2, -1))
    inside = (pos * m.to(pos.dtype)).sum((-2, -1))
    return torch.where(total > 0, inside / torch.where(total > 0, total, 1), 0)


def top_k_intersection(
    heatmaps: torch.Tensor, masks: torch.Tensor | PartBatch, k: int | float
) -> torch.Tensor:
    """Share of the ``k`` highest pixels that lie inside the mask (Theiner et al. 2021).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W``.
    masks : Tensor or PartBatch
        ``N x H x W`` bool masks.
    k : int or float
        Pixel count, or fraction of the map (see :func:`xnn_toolkit.metrics.top_pixels`).

    Returns
    -------
    Tensor
        ``N`` or ``N x K`` in [0, 1], heatmap dtype (0 when ``k = 0``); ties in row-major order.
    """
    maps = _as_maps(heatmaps)
    m = _masks(masks, maps)
    count = _pixel_count(k, maps.shape[-1] * maps.shape[-2])
    top = pixel_ranks(maps) < count
    return (top & m).sum((-2, -1)).to(maps.dtype) / max(count, 1)


@dataclass
class FilterLocalization:
    """Localization by single filters (Liang et al. 2020 App. H.1), ``K`` filters and ``C`` classes.

    Attributes
    ----------
    iou_per_class : Tensor
        ``K x C`` ``IoU_c^k`` (NaN for classes without images).
    ap_per_class : Tensor
        ``K x C`` ``APn_c^k``.
    best_class : Tensor
        ``K`` int64: ``c* = argmax_c APn_c^k``; ties (common when few IoUs reach ``n %``,
        e.g. APn = 0 for every class) go to the class with the higher ``IoU_c^k``, then to
        the first. App. H.1 leaves ties open; without this rule a filter that never reaches
        ``n %`` would be scored on class 0.
    iou_per_filter, ap_per_filter : Tensor
        ``K``: ``IoU^k = IoU_{c*}^k`` and ``APn^k = APn_{c*}^k``.
    iou_by_class, ap_by_class : Tensor
        ``C``: means over the filters focused on each class (NaN where none is).
    iou, ap : float
        Means over all ``K`` filters.
    class_counts : Tensor
        ``C`` images per class.
    """

    iou_per_class: torch.Tensor
    ap_per_class: torch.Tensor
    best_class: torch.Tensor
    iou_per_filter: torch.Tensor
    ap_per_filter: torch.Tensor
    iou_by_class: torch.Tensor
    ap_by_class: torch.Tensor
    iou: float
    ap: float
    class_counts: torch.Tensor


@dataclass
class ClassLocalization:
    """Localization by one map per image, e.g. CAM (Liang et al. 2020 App. H.2).

    Attributes
    ----------
    iou_per_class, ap_per_class : Tensor
        ``C`` (or ``K x C`` for ``K`` maps per image): ``IoU_c`` and ``APn_c``, NaN for
        classes without images.
    iou, ap : Tensor or float
        Means over all images (a float, or ``K`` values).
    class_counts : Tensor
        ``C`` images per class.
    """

    iou_per_class: torch.Tensor
    ap_per_class: torch.Tensor
    iou: torch.Tensor | float
    ap: torch.Tensor | float
    class_counts: torch.Tensor


class LocalizationAccumulator:
    """Stream per-image IoUs and class labels into the App. H tables.

    Parameters
    ----------
    num_classes : int
        Number of classes ``C``.
    min_iou : float
        The ``n %`` of APn as a fraction (0.5 for AP50): a hit is ``IoU ≥ min_iou``.
    """

    def __init__(self, num_classes: int, min_iou: float = 0.5) -> None:
        self.num_classes = num_classes
        self.min_iou = min_iou
        self.iou_sum_: torch.Tensor | None = None
        self.hit_sum_: torch.Tensor | None = None
        self.counts_: torch.Tensor | None = None
        self.single_ = False

    def update(self, ious: torch.Tensor, labels: torch.Tensor) -> LocalizationAccumulator:
        """Add ``N`` (one map per image) or ``N x K`` (``K`` filters) IoUs with ``N`` labels.

        Returns
        -------
        LocalizationAccumulator
            ``self``.
        """
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if not 0.0 <= self.min_iou <= 1.0:
            raise InputError(f"min_iou must lie in [0, 1] (0.5 for AP50), got {self.min_iou}")
        x = _as_maps(ious, "ious", ndims=(1, 2), expected="N or N x K")
        single = x.dim() == 1
        x = x[:, None] if single else x
        y = _as_labels(labels, x.shape[0]).to(x.device)
        if y.numel() and int(y.max()) >= self.num_classes:
            raise InputError(f"labels must be < num_classes = {self.num_classes}")
        c, k = self.num_classes, x.shape[1]
        if self.iou_sum_ is None:
            dev = x.device
            self.iou_sum_ = torch.zeros(k, c, dtype=torch.float64, device=dev)
            self.hit_sum_ = torch.zeros(k, c, dtype=torch.float64, device=dev)
            self.counts_ = torch.zeros(c, dtype=torch.float64, device=dev)
            self.single_ = single
        elif self.iou_sum_.shape[0] != k:
            raise InputError(
                f"ious have {k} columns but earlier batches had {self.iou_sum_.shape[0]}"
            )
        x = x.double().to(self.iou_sum_.device)
        y = y.to(self.iou_sum_.device)
        self.iou_sum_.index_add_(1, y, x.T)
        self.hit_sum_.index_add_(1, y, (x >= self.min_iou).double().T)
        self.counts_.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))
        return self

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.counts_ is None or float(self.counts_.sum()) == 0:
            raise InputError("no IoUs were added; call update() first")
        cnt = self.counts_
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=cnt.device)
        iou_c = torch.where(cnt > 0, self.iou_sum_ / cnt.clamp_min(1), nan)
        ap_c = torch.where(cnt > 0, self.hit_sum_ / cnt.clamp_min(1), nan)
        return iou_c, ap_c, cnt

    def filter_result(self) -> FilterLocalization:
        """The per-filter tables of App. H.1."""
        iou_c, ap_c, cnt = self._tables()
        # lexicographic argmax: APn first, IoU on ties, the first class on ties of both
        ap_key = torch.where(cnt > 0, ap_c, -torch.inf)
        top = ap_key == ap_key.max(1, keepdim=True).values
        best = torch.where(top & (cnt > 0), iou_c, -torch.inf).argmax(1)
        iou_k = iou_c.gather(1, best[:, None])[:, 0]
        ap_k = ap_c.gather(1, best[:, None])[:, 0]
        c = self.num_classes
        focus = torch.nn.functional.one_hot(best, c).double()  # K x C
        n_f = focus.sum(0)
        nan = torch.full((c,), float("nan"), dtype=torch.float64, device=cnt.device)
        iou_by = torch.where(n_f > 0, (focus * iou_k[:, None]).sum(0) / n_f.clamp_min(1), nan)
        ap_by = torch.where(n_f > 0, (focus * ap_k[:, None]).sum(0) / n_f.clamp_min(1), nan)
        return FilterLocalization(
            iou_per_class=iou_c,
            ap_per_class=ap_c,
            best_class=best,
            iou_per_filter=iou_k,
            ap_per_filter=ap_k,
            iou_by_class=iou_by,
            ap_by_class=ap_by,
            iou=float(iou_k.mean()),
            ap=float(ap_k.mean()),
            class_counts=cnt.long(),
        )

    def class_result(self) -> ClassLocalization:
        """The per-class and overall scores of App. H.2 (one map per image)."""
        iou_c, ap_c, cnt = self._tables()
        total = cnt.sum()
        iou_all = self.iou_sum_.sum(1) / total
        ap_all = self.hit_sum_.sum(1) / total
        if self.single_:
            return ClassLocalization(
                iou_per_class=iou_c[0],
                ap_per_class=ap_c[0],
                iou=float(iou_all[0]),
                ap=float(ap_all[0]),
                class_counts=cnt.long(),
            )
        return ClassLocalization(iou_c, ap_c, iou_all, ap_all, cnt.long())


def filter_localization(
    ious: torch.Tensor, labels: torch.Tensor, num_classes: int, min_iou: float = 0.5
) -> FilterLocalization:
    """Localization with one filter (Liang et al. 2020 App. H.1) from per-image IoUs.

    Parameters
    ----------
    ious : Tensor
        ``N x K``: IoU of filter ``k``'s segmentation on image ``n`` (from :func:`iou`).
    labels : Tensor
        ``N`` class of each image.
    num_classes : int
        ``C``.
    min_iou : float
        APn threshold as a fraction (0.5 for AP50).

    Returns
    -------
    FilterLocalization
    """
    return LocalizationAccumulator(num_classes, min_iou).update(ious, labels).filter_result()


def class_localization(
    ious: torch.Tensor, labels: torch.Tensor, num_classes: int, min_iou: float = 0.5
) -> ClassLocalization:
    """Localization with all filters, e.g. CAM (Liang et al. 2020 App. H.2), from per-image IoUs.

    Parameters
    ----------
    ious : Tensor
        ``N`` IoU of each image's map (or ``N x K`` for ``K`` methods side by side).
    labels : Tensor
        ``N`` class of each image.
    num_classes : int
        ``C``.
    min_iou : float
        APn threshold as a fraction.

    Returns
    -------
    ClassLocalization
    """
    return LocalizationAccumulator(num_classes, min_iou).update(ious, labels).class_result()


# --------------------------------------------------------------------------- gates


#: Filter maps of :func:`gate_localization`.
MAP_METHODS = ("activmap", "gradmap")


@dataclass
class GateLocalization:
    """Localization of class-specific filters vs all filters of the layer (Liang et al. 2020 App.
    H).

    Filter maps are read from the STD path (ungated), as at test time (:doc:`/methods/gates`). The
    *gated* selection keeps, for each class ``c``, its class-specific filters (see
    :meth:`~xnn_toolkit.heads.ClassSpecificGates.class_filters`) and scores each on the
    images of class ``c``;
    the *ungated* baseline scores every filter of the layer on the class it localizes best
    (App. H.1, ``c* = argmax_c APn_c^k``, ties by the higher IoU), which favours the baseline.

    The paper's own comparison (Liang et al. 2020 §5.1) is between networks: :attr:`all_iou` and
    :attr:`all_ap` of a CSG fine-tune against those of the same fine-tune without gating,
    ``ClassSpecificGates(recipe="finetune", lambda1=0.0, lambda2=0.0)`` with the same
    ``random_state`` (``bench/gates.py --finetune`` runs both).

    Attributes
    ----------
    method : str
        ``"activmap"`` or ``"gradmap"``.
    min_iou : float
        The ``n %`` of APn as a fraction (0.5: AP50).
    filters : FilterLocalization
        App. H.1 tables over all ``K`` filters (``xnn_toolkit.metrics.localization``).
    specific_class : Tensor
        ``K`` int64: the class a filter is specific to, ``-1`` for none.
    specific_iou_per_filter, specific_ap_per_filter : Tensor
        ``K`` float64: ``IoU_c^k`` and ``APn_c^k`` on the filter's gated class (NaN for
        non-specific filters).
    specific_iou, specific_ap : float
        Means over the class-specific filters (NaN when there is none).
    all_iou, all_ap : float
        Means over all filters of ``IoU^k`` and ``APn^k`` (App. H.1: each filter on the class
        it localizes best).
    pooled_iou, pooled_ap : float
        Every filter on every image, with no class assigned (a filter without a gate serves
        all classes): the mean IoU and the share of IoUs ``>= min_iou`` over all ``N x K``
        pairs.
    n_specific : int
        Number of class-specific filters.
    cam, cam_gated : ClassLocalization or None
        App. H.2 for CAM ``Σ_k W_yk A_k`` with the head's weights for the true class, and for
        the gated CAM ``Σ_k W_yk G_yk A_k`` (None when no head weights are known).
    ious : Tensor
        ``N x K`` per-image, per-filter IoU.
    areas : Tensor
        ``N x K`` share of each image's pixels in each filter's segment.
    """

    method: str
    min_iou: float
    filters: Any
    specific_class: torch.Tensor
    specific_iou_per_filter: torch.Tensor
    specific_ap_per_filter: torch.Tensor
    specific_iou: float
    specific_ap: float
    all_iou: float
    all_ap: float
    pooled_iou: float
    pooled_ap: float
    n_specific: int
    cam: Any = None
    cam_gated: Any = None
    ious: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    areas: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def gate_localization(
    gates: Any,
    model: nn.Module | None,
    images: torch.Tensor,
    masks: Any,
    labels: torch.Tensor | None = None,
    *,
    layer: LayerSpec | None = None,
    head_weight: torch.Tensor | None = None,
    method: str = "activmap",
    top: float = 0.3,
    min_iou: float = 0.5,
    sigma: float = 5.0,
    level: float = 1.0,
    threshold: float = 0.5,
    others: float = 0.2,
    batch_size: int = 32,
) -> GateLocalization:
    """Per-filter IoU / APn of gated class-specific filters vs the layer's filters ungated.

    Liang et al. 2020 App. G (maps) and H (metrics); :doc:`/methods/gates`. The filter maps
    are those of :mod:`xnn_toolkit.attribution.filters`: ActivMap segments the bilinearly
    upsampled activation above the filter's top-``top`` threshold over the whole image set
    (:func:`~xnn_toolkit.attribution.filters.activation_thresholds`, exact here); GradMap
    calls :class:`~xnn_toolkit.attribution.filters.GradMap` for every filter, sharing one
    forward pass per batch. CAM: ``Σ_k W_yk A_k`` upsampled, top ``top`` pixels of each map;
    gated CAM uses ``W_yk G_yk``. IoU and APn come from this module.

    Parameters
    ----------
    gates : ClassSpecificGates or Tensor
        A fitted estimator (its layer, network and head are used by default) or a ``C x K``
        gate matrix (then ``model`` and ``layer`` are needed).
    model : nn.Module or None
        The network whose filters are scored; default the estimator's ``network_``. Left
        unchanged.
    images : Tensor
        ``N x C x H x W`` model inputs.
    masks : Tensor or PartBatch
        ``N x H x W`` bool object masks at the images' size (a PartBatch gives its
        ``object_mask`` and, when ``labels`` is None, its labels).
    labels : Tensor, optional
        ``N`` classes.
    layer : layer spec, optional
        The gated layer (default: the estimator's).
    head_weight : Tensor, optional
        ``C x K`` CAM weights (default: the estimator's head).
    method : {"activmap", "gradmap"}
    top : float
        Fraction for the ActivMap threshold and the CAM segmentation (0.3).
    min_iou : float
        APn threshold as a fraction (0.5 for AP50).
    sigma, level : float
        GradMap blur (pixels) and segmentation level.
    threshold, others : float
        Class-specific filter rule (:meth:`~xnn_toolkit.heads.ClassSpecificGates.class_filters`).
    batch_size : int

    Returns
    -------
    GateLocalization
    """
    import torch.nn.functional as F

    from .._device import model_device
    from .._guard import model_guard
    from ..attribution._capture import shared_passes
    from ..attribution.filters import GradMap, activmap_masks, top_share_thresholds
    from ..datafit import as_labels
    from ..heads._gate_data import _check_images, _layer_maps
    from ..heads.gate_objective import _check_label_range, _class_filters
    from ..heads.gates import ClassSpecificGates
    from ..layers import resolve_layer
    from .ranking import top_pixels

    if method not in MAP_METHODS:
        raise InputError(f"method must be one of {MAP_METHODS}, got {method!r}")
    if not 0 < top < 1:
        raise InputError(f"top must lie in (0, 1), got {top}")
    if isinstance(gates, ClassSpecificGates):
        gates._check_fitted()
        g = gates.gates_
        if model is None:
            gates._check_fitted(need_network=True)
            model = gates.network_
        layer_name = resolve_layer(model, layer if layer is not None else gates.layer_)[0]
        if head_weight is None:
            head_weight = gates.head_.weight.detach()
    else:
        g = torch.as_tensor(gates)
        if model is None or layer is None:
            raise InputError("with a gate tensor, pass model= and layer= too")
        layer_name = resolve_layer(model, layer)[0]
    if g.dim() != 2:
        raise InputError(f"gates must be C x K, got shape {tuple(g.shape)}")
    c, k = g.shape
    images = _check_images(images)
    n = images.shape[0]
    if isinstance(masks, PartBatch):
        if labels is None:
            labels = masks.labels
        if masks.object_mask is None:
            raise InputError("this PartBatch has no object_mask; pass N x H x W masks")
        masks = masks.object_mask
    if labels is None:
        raise InputError("labels= is needed (the class of each image)")
    y = as_labels(labels).reshape(-1)
    masks = torch.as_tensor(masks)
    if y.shape[0] != n or masks.shape != (n, *images.shape[-2:]):
        raise InputError(
            f"expected N = {n} labels and N x H x W = {(n, *images.shape[-2:])} masks, got "
            f"{tuple(y.shape)} and {tuple(masks.shape)}"
        )
    _check_label_range(y, c)
    masks = masks.bool()

    acts = _layer_maps(model, layer_name, images, batch_size)  # N x K x h x w
    if acts.shape[1] != k:
        raise InputError(
            f"layer {layer_name!r} has {acts.shape[1]} channels but the gates have K = {k}"
        )
    size = tuple(images.shape[-2:])
    # every position of every image: the exact top-``top`` threshold of each filter
    thr = top_share_thresholds(acts.transpose(0, 1).reshape(k, -1), top)
    gradmap = GradMap(model, layer_name, sigma=sigma, threshold=level)
    w = None
    if head_weight is not None:
        w = torch.as_tensor(head_weight).detach().float().cpu()
        if w.shape != (c, k):
            raise InputError(f"head_weight must be C x K = {(c, k)}, got {tuple(w.shape)}")
    gf = g.detach().float().cpu()
    ious, areas, cam_ious, camg_ious = [], [], [], []
    with model_guard(model):
        for i in range(0, n, batch_size):
            a = acts[i : i + batch_size]
            m = masks[i : i + batch_size]
            yb = y[i : i + batch_size]
            if method == "activmap":
                up = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                seg = activmap_masks(up, thr[None, :])
            else:  # one forward, one backward per filter
                xb = images[i : i + batch_size].to(model_device(model))
                with shared_passes(xb):
                    seg = torch.stack([gradmap.attribute(xb, f).mask.cpu() for f in range(k)], 1)
            ious.append(iou(seg, m))
            areas.append(seg.float().mean((-2, -1)))
            if w is not None:
                for weights, out in ((w[yb], cam_ious), (w[yb] * gf[yb], camg_ious)):
                    cam = (a * weights[:, :, None, None]).sum(1, keepdim=True)
                    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
                    out.append(iou(top_pixels(cam[:, 0], float(top)), m))
    ious_t = torch.cat(ious)
    table = filter_localization(ious_t, y, c, min_iou)
    spec_class = torch.full((k,), -1, dtype=torch.long)
    for ci in range(c):
        spec_class[_class_filters(gf, ci, threshold, others)] = ci
    sel = spec_class >= 0
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    rows = torch.arange(k)
    cls = spec_class.clamp_min(0)
    s_iou = torch.where(sel, table.iou_per_class[rows, cls].cpu(), nan)
    s_ap = torch.where(sel, table.ap_per_class[rows, cls].cpu(), nan)
    n_spec = int(sel.sum())
    return GateLocalization(
        method=method,
        min_iou=min_iou,
        filters=table,
        specific_class=spec_class,
        specific_iou_per_filter=s_iou,
        specific_ap_per_filter=s_ap,
        specific_iou=float(s_iou[sel].mean()) if n_spec else float("nan"),
        specific_ap=float(s_ap[sel].mean()) if n_spec else float("nan"),
        all_iou=table.iou,
        all_ap=table.ap,
        pooled_iou=float(ious_t.double().mean()),
        pooled_ap=float((ious_t >= min_iou).double().mean()),
        n_specific=n_spec,
        cam=class_localization(torch.cat(cam_ious), y, c, min_iou) if w is not None else None,
        cam_gated=(
            class_localization(torch.cat(camg_ious), y, c, min_iou) if w is not None else None
        ),
        ious=ious_t,
        areas=torch.cat(areas),
    )
