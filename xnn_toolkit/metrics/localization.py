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

from dataclasses import dataclass

import torch

from ..data.types import PartBatch
from ..errors import InputError
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
    "LocalizationAccumulator",
    "box_masks",
    "class_localization",
    "energy_pointing_game",
    "filter_localization",
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
