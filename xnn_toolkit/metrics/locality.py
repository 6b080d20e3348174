"""Part probabilities of heatmaps and the locality entropy (:doc:`/methods/metrics`, Khorram 2020
§3.3.2, App. A).

Given the heatmap ``C^{n,m}`` of x-feature ``n`` on image ``m``:

- pixel-to-part (pixel-level) probability: ``S^{n,m}_{ij} = C^{n,m}_{ij} / Σ_{ij} C^{n,m}_{ij}``
  (:func:`pixel_probabilities`), read at each part's keypoint (:func:`keypoint_probabilities`);
- Voronoi part probability (thesis Algorithm 3): the object's bounding box is cut into the
  Voronoi cells ``G_p`` of the visible keypoints; inside ``G_p`` the distance ``d_ijp`` to the
  keypoint is normalised by the cell's largest distance, outside it ``d̄_ijp = 1``;
  ``S_p^{n,m} = Σ_ij (1 − d̄_ijp) S_ij^{n,m}``; the heatmap mass outside the box is one more
  part, *context* (:func:`voronoi_part_probabilities`);
- object-mask part probability: ``S_p^{n,m} = Σ_{(i,j) ∈ part p} S_ij^{n,m}``
  (:func:`mask_part_probabilities`);
- locality of x-feature ``n``: the histogram ``S̄_p^n = 1/M Σ_m S_p^{n,m}`` normalised to
  ``s_p``, and its entropy ``H_n = −Σ_p s_p log s_p`` (natural log); the reported score is the
  mean over x-features (lower = more local) (:func:`locality`, :class:`LocalityAccumulator`).

Conventions and edge cases (all tested):

- heatmaps are clamped at 0 before normalising (c-MWP maps are, :doc:`/methods/excitation`); a map
with no
  positive mass (e.g. all zero) has probability 0 everywhere, so it adds nothing to any part;
- keypoints are ``(x, y)`` pixel coordinates (x = column, y = row, pixel centres at integers);
  distances are measured from pixel centres to the exact keypoint; invisible keypoints and
  keypoints with non-finite coordinates take no part (their part gets 0); an image without any
  visible keypoint gives 0 to every part, and only its context is scored;
- Voronoi ties (a pixel equally far from two keypoints) go to the lower part index;
- a cell whose largest distance is 0 (a single pixel on its keypoint) has ``d̄ = 0``, weight 1;
- a box pixel is a pixel centre ``(j, i)`` with ``x0 <= j <= x1`` and ``y0 <= i <= y1``;
- the heatmaps' spatial size must equal the ground truth's (:class:`InputError` otherwise;
  see :func:`xnn_toolkit.metrics.resize_heatmaps`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data.types import PartBatch
from ..errors import InputError
from ._inputs import (
    _as_maps,
    _as_tensor,
    _box_masks,
    _check_batch,
    _check_boxes,
    _check_size,
)

__all__ = [
    "Locality",
    "LocalityAccumulator",
    "VoronoiCells",
    "keypoint_probabilities",
    "locality",
    "mask_part_probabilities",
    "pixel_probabilities",
    "voronoi_cells",
    "voronoi_part_probabilities",
]


def pixel_probabilities(heatmaps: torch.Tensor) -> torch.Tensor:
    """Pixel-to-part probabilities ``S_ij = C_ij / Σ C`` of each heatmap (:doc:`/methods/metrics`).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x n x H x W``.

    Returns
    -------
    Tensor
        Same shape and dtype; each map clamped at 0 and normalised to sum 1, or all zero
        when it has no positive mass.
    """
    return _normalise(_as_maps(heatmaps))


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    pos = maps.clamp_min(0)
    total = pos.sum((-2, -1), keepdim=True)
    return pos / torch.where(total > 0, total, 1)  # an all-zero map stays all zero


def _keypoint_inputs(
    parts: PartBatch | None,
    keypoints: torch.Tensor | None,
    visible: torch.Tensor | None,
    n: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    if parts is not None:
        if keypoints is not None or visible is not None:
            raise InputError("pass either parts (a PartBatch) or keypoints/visible, not both")
        keypoints, visible = parts.keypoints, parts.visible
    if keypoints is None:
        raise InputError("keypoints are missing: pass parts=PartBatch or keypoints=N x P x 2")
    kp = _as_tensor(keypoints, "keypoints")
    if kp.dim() != 3 or kp.shape[0] != n or kp.shape[2] != 2:
        raise InputError(f"keypoints must be N x P x 2 (x, y) with N = {n}, got {tuple(kp.shape)}")
    kp = kp.to(device=device, dtype=torch.float64)
    vis = torch.ones(kp.shape[:2], dtype=torch.bool, device=device)
    if visible is not None:
        v = _as_tensor(visible, "visible")
        if tuple(v.shape) != tuple(kp.shape[:2]):
            raise InputError(f"visible must be N x P = {tuple(kp.shape[:2])}, got {tuple(v.shape)}")
        vis = v.to(device) != 0
    vis = vis & torch.isfinite(kp).all(-1)
    return kp, vis


def keypoint_probabilities(
    heatmaps: torch.Tensor,
    parts: PartBatch | None = None,
    *,
    keypoints: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pixel-level part probability ``S_{i_p, j_p}``: the normalised heatmap at each keypoint.

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x n x H x W``.
    parts : PartBatch, optional
        Ground truth (its ``keypoints`` and ``visible`` are used).
    keypoints, visible : Tensor, optional
        ``N x P x 2`` ``(x, y)`` and ``N x P`` bool, instead of ``parts``.

    Returns
    -------
    Tensor
        ``N x P`` or ``N x n x P``: ``S`` at the pixel nearest each keypoint (coordinates
        rounded half up); 0 for invisible keypoints and keypoints outside the image.
    """
    maps = _as_maps(heatmaps)
    s = _normalise(maps)
    n, (h, w) = maps.shape[0], maps.shape[-2:]
    kp, vis = _keypoint_inputs(parts, keypoints, visible, n, maps.device)
    col = torch.floor(torch.nan_to_num(kp[..., 0], nan=-1.0) + 0.5)
    row = torch.floor(torch.nan_to_num(kp[..., 1], nan=-1.0) + 0.5)
    ok = vis & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    flat = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()  # N x P
    sf = s.reshape(*s.shape[:-2], h * w)
    if maps.dim() == 4:
        idx = flat[:, None, :].expand(n, maps.shape[1], flat.shape[1])
        okb = ok[:, None, :]
    else:
        idx, okb = flat, ok
    return torch.where(okb, sf.gather(-1, idx), 0)


@dataclass
class VoronoiCells:
    """The Voronoi geometry of Algorithm 3 for ``N`` images (computed once per image).

    Attributes
    ----------
    owner : Tensor
        ``N x H x W`` int64: the part whose cell holds each pixel, ``-1`` outside the box or
        when the image has no visible keypoint.
    weights : Tensor
        ``N x P x H x W``: ``P(part_p | pixel) = 1 − d̄_ijp`` (0 outside ``G_p``).
    box : Tensor
        ``N x H x W`` bool: pixels inside the bounding box.
    """

    owner: torch.Tensor
    weights: torch.Tensor
    box: torch.Tensor


_BLOCK = 256


def _voronoi_pixels(
    kp: torch.Tensor, vis: torch.Tensor, box: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel: the owning part (``P`` = none) and ``1 − d̄`` (0 outside every cell).

    Every pixel belongs to at most one cell, so the geometry is kept per pixel
    (``N x H x W``) rather than per part; only the nearest-keypoint search touches ``P``.
    """
    n, p = vis.shape
    h, w = box.shape[-2:]
    dev = box.device
    inside = box & vis.any(1)[:, None, None]
    owner = torch.full((n, h, w), p, dtype=torch.long, device=dev)
    d = torch.zeros(n, h, w, dtype=torch.float64, device=dev)
    rows = inside.any(2).any(0).nonzero()
    cols = inside.any(1).any(0).nonzero()
    if rows.numel():
        # only the rows / columns that some box of the chunk covers need distances
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        # float64 geometry: the nearest-keypoint decision (and its ties) must not depend on
        # the heatmaps' precision. Parts last, so the search reduces a contiguous axis.
        ys = torch.arange(r0, r1, device=dev, dtype=torch.float64)
        xs = torch.arange(c0, c1, device=dev, dtype=torch.float64)
        # an invisible keypoint sits at infinity: it never wins a pixel
        far = torch.where(vis[..., None], kp, math.inf)
        dy = ys[None, :, None] - far[:, None, :, 1]  # N x h' x P
        dx = xs[None, :, None] - far[:, None, :, 0]  # N x w' x P
        d2 = (dy * dy)[:, :, None] + (dx * dx)[:, None]  # N x h' x w' x P
        nearest, near = d2.min(-1)  # first minimum (documented): ties go to the lower part
        crop = inside[:, r0:r1, c0:c1]
        owner[:, r0:r1, c0:c1] = torch.where(crop, near, p)
        d[:, r0:r1, c0:c1] = torch.where(crop, nearest, 0).sqrt()
    flat_owner = owner.reshape(n, -1)
    dmax = torch.zeros(n, p + 1, dtype=d.dtype, device=dev)
    dmax = dmax.scatter_reduce(1, flat_owner, d.reshape(n, -1), "amax", include_self=True)
    dmax = dmax.gather(1, flat_owner).reshape(n, h, w)
    dbar = torch.where(dmax > 0, d / torch.where(dmax > 0, dmax, 1), 0)
    return owner, torch.where(inside, 1 - dbar, 0)


def _box_inputs(parts: PartBatch | None, bbox: torch.Tensor | None, n: int) -> torch.Tensor:
    if parts is not None:
        if bbox is not None:
            raise InputError("pass either parts (a PartBatch) or bbox, not both")
        bbox = parts.bbox
    if bbox is None:
        raise InputError("bbox is missing: pass parts=PartBatch or bbox=N x 4 (x0, y0, x1, y1)")
    return _check_boxes(bbox, n)


def voronoi_cells(
    parts: PartBatch | None = None,
    *,
    size: tuple[int, int],
    keypoints: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
    bbox: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> VoronoiCells:
    """Voronoi cells of the visible keypoints inside each bounding box (thesis Algorithm 3).

    Parameters
    ----------
    parts : PartBatch, optional
        Ground truth (``keypoints``, ``visible``, ``bbox``).
    size : (int, int)
        Image size ``(H, W)``.
    keypoints, visible, bbox : Tensor, optional
        ``N x P x 2`` ``(x, y)``, ``N x P`` bool, ``N x 4`` inclusive ``(x0, y0, x1, y1)``,
        instead of ``parts``.
    device : device, optional
        Where to compute (default: the keypoints' device).
    dtype : torch.dtype
        dtype of the returned weights.

    Returns
    -------
    VoronoiCells
    """
    src = parts.keypoints if parts is not None else keypoints
    if src is None:
        raise InputError("keypoints are missing: pass parts=PartBatch or keypoints=N x P x 2")
    n = int(_as_tensor(src, "keypoints").shape[0])
    dev = torch.device(device) if device is not None else _as_tensor(src, "keypoints").device
    kp, vis = _keypoint_inputs(parts, keypoints, visible, n, dev)
    box = _box_masks(_box_inputs(parts, bbox, n), tuple(size), dev)
    p = kp.shape[1]
    owner, weight = _voronoi_pixels(kp, vis, box)
    cell = owner[:, None] == torch.arange(p, device=dev)[None, :, None, None]
    weights = torch.where(cell, weight[:, None], 0).to(dtype)
    return VoronoiCells(owner=torch.where(owner < p, owner, -1), weights=weights, box=box)


def voronoi_part_probabilities(
    heatmaps: torch.Tensor,
    parts: PartBatch | None = None,
    *,
    keypoints: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
    bbox: torch.Tensor | None = None,
    context: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Voronoi part probabilities ``S_p^{n,m}`` of thesis Algorithm 3, plus *context*.

    ``S_p = Σ_ij (1 − d̄_ijp) S_ij`` with ``S`` from :func:`pixel_probabilities`; the
    Voronoi geometry is computed once per image and shared by its ``n`` heatmaps.

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x n x H x W``.
    parts : PartBatch, optional
        Ground truth (``keypoints``, ``visible``, ``bbox``).
    keypoints, visible, bbox : Tensor, optional
        Instead of ``parts``: ``N x P x 2`` ``(x, y)``, ``N x P`` bool (default all visible),
        ``N x 4`` inclusive ``(x0, y0, x1, y1)``.
    context : bool
        Append the context part: the heatmap mass outside the box (default, as in the
        thesis's 16th part).
    chunk_size : int, optional
        Images per vectorised chunk (bounds the ``chunk x H x W x P`` float64 distances);
        default: as many as fit in about 128 MB.

    Returns
    -------
    Tensor
        ``N x (P + 1)`` or ``N x n x (P + 1)`` (``P`` without context), heatmap dtype.
    """
    maps = _as_maps(heatmaps)
    n, (h, w) = maps.shape[0], tuple(maps.shape[-2:])
    kp, vis = _keypoint_inputs(parts, keypoints, visible, n, maps.device)
    boxes = _box_inputs(parts, bbox, n)
    c4 = (maps if maps.dim() == 4 else maps[:, None]).clamp_min(0)
    p = kp.shape[1]
    step = chunk_size or max(1, (1 << 24) // max(1, p * h * w))
    out = []
    for a in range(0, n, step):
        box = _box_masks(boxes[a : a + step], (h, w), maps.device)
        owner, weight = _voronoi_pixels(kp[a : a + step], vis[a : a + step], box)
        # one pass over the maps: column p is "in the box, no cell" (weight 0), column
        # p + 1 the context (weight 1); the normalisation by Σ C comes last
        owner = torch.where(box, owner, p + 1)
        weight = torch.where(box, weight, 1).to(c4.dtype)
        cc = c4[a : a + step]
        m, k = cc.shape[:2]
        # Sums over runs of _BLOCK pixels first, then over runs in float64: a float32 map
        # keeps float32 speed without a 50 000-term float32 accumulation.
        hw = h * w
        blk = torch.arange(hw, device=maps.device) // _BLOCK
        nblk = (hw + _BLOCK - 1) // _BLOCK
        idx = (blk * (p + 2) + owner.reshape(m, -1)).reshape(m, 1, -1).expand(m, k, hw)
        flat = cc.reshape(m, k, -1)
        sums = flat.new_zeros(m, k, nblk * (p + 2))
        sums.scatter_add_(2, idx, flat * weight.reshape(m, 1, -1))
        sums = sums.reshape(m, k, nblk, p + 2).double().sum(2)
        total = flat.sum(-1, keepdim=True, dtype=torch.float64)
        probs = (sums / torch.where(total > 0, total, 1)).to(cc.dtype)  # all-zero map: zeros
        keep = list(range(p)) + ([p + 1] if context else [])
        out.append(probs[..., keep])
    res = torch.cat(out) if out else c4.new_zeros(0, c4.shape[1], p + int(context))
    return res if maps.dim() == 4 else res[:, 0]


def mask_part_probabilities(
    heatmaps: torch.Tensor,
    masks: PartBatch | torch.Tensor,
    num_parts: int | None = None,
    *,
    context: bool = False,
) -> torch.Tensor:
    """Object-mask part probabilities ``S_p = Σ_{(i,j) ∈ part p} S_ij`` (:doc:`/methods/metrics`).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x n x H x W``.
    masks : PartBatch or Tensor
        A :class:`PartBatch` (its ``part_mask``), an ``N x H x W`` int64 label map with 0 = no
        part and ``p + 1`` = part ``p``, or an ``N x H x W`` bool object mask (one part).
    num_parts : int, optional
        Number of parts ``P``; required for a label-map tensor (so that every batch gives
        the same histogram width), implied by a PartBatch (``P`` keypoints) or a bool mask (1).
    context : bool
        Append the mass on pixels of no part as a last column (default False, as in the
        thesis's object form).

    Returns
    -------
    Tensor
        ``N x P`` or ``N x n x P`` (``P + 1`` columns with context), heatmap dtype.
    """
    maps = _as_maps(heatmaps)
    if isinstance(masks, PartBatch):
        if masks.part_mask is None:
            raise InputError(
                "this PartBatch has no part_mask; use voronoi_part_probabilities for "
                "keypoint-only ground truth"
            )
        num_parts = masks.keypoints.shape[1] if num_parts is None else num_parts
        labels = masks.part_mask
    else:
        labels = _as_tensor(masks, "masks")
        if labels.dtype == torch.bool:
            num_parts = 1 if num_parts is None else num_parts
        elif num_parts is None:
            raise InputError(
                "num_parts is required with a label-map tensor (0 = none, p + 1 = part p), "
                "so that every batch gives the same number of parts"
            )
    if labels.dim() != 3:
        raise InputError(f"masks must be N x H x W, got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise InputError("a part mask must be integer labels (0 = none, p + 1 = part p) or bool")
    _check_batch(maps, labels.shape[0], "masks")
    _check_size(maps, tuple(labels.shape[-2:]), "the part mask")
    lab = labels.to(maps.device).long()
    if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) > num_parts):
        raise InputError(
            f"part labels must lie in [0, {num_parts}] (0 = none, p + 1 = part p), got "
            f"[{int(lab.min())}, {int(lab.max())}]; check num_parts"
        )
    s = _normalise(maps)
    s3 = s.reshape(*s.shape[:-2], -1)
    flat = lab.reshape(lab.shape[0], -1)
    idx = (flat[:, None] if maps.dim() == 4 else flat).expand_as(s3)
    acc = s3.new_zeros(*s3.shape[:-1], num_parts + 1).scatter_add_(-1, idx, s3)
    parts_ = acc[..., 1:]
    return torch.cat([parts_, acc[..., :1]], -1) if context else parts_


@dataclass
class Locality:
    """Locality of ``n`` heatmap sources (x-features, dimensions of Z, or the 1-heatmap).

    Attributes
    ----------
    histograms : Tensor
        ``n x B`` normalised part histograms ``s_p`` (float64).
    entropy : Tensor
        ``n`` entropies ``H_n = −Σ_p s_p log s_p`` in nats.
    mean : float
        Mean entropy over sources: the reported locality (lower = more local).
    """

    histograms: torch.Tensor
    entropy: torch.Tensor
    mean: float


def _entropy(hist: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row after normalisation; an all-zero row counts as uniform."""
    total = hist.sum(-1, keepdim=True)
    b = hist.shape[-1]
    s = torch.where(total > 0, hist / torch.where(total > 0, total, 1), 1.0 / b)
    return -(torch.where(s > 0, s * torch.log(torch.where(s > 0, s, 1)), 0)).sum(-1)


class LocalityAccumulator:
    """Average part probabilities over batches of images, then take the locality entropy.

    A source whose maps never had positive mass has an all-zero histogram; it is scored as
    the uniform histogram (entropy ``log B``, the worst value), never as perfectly local.

    Examples
    --------
    >>> acc = LocalityAccumulator()
    >>> for maps, parts in batches:                                 # doctest: +SKIP
    ...     acc.update(voronoi_part_probabilities(maps, parts))     # N x n x (P + 1)
    >>> acc.result().mean                                           # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.sum_: torch.Tensor | None = None
        self.count_ = 0

    def update(self, part_probs: torch.Tensor) -> LocalityAccumulator:
        """Add ``M x n x B`` (or ``M x B`` for one source) part probabilities.

        Returns
        -------
        LocalityAccumulator
            ``self``.
        """
        pp = _as_maps(part_probs, "part_probs", ndims=(2, 3), expected="M x B or M x n x B")
        pp = pp[:, None] if pp.dim() == 2 else pp
        if bool((pp < 0).any()):
            raise InputError("part_probs must be >= 0 (probabilities of parts)")
        s = pp.double().sum(0)
        if self.sum_ is not None and s.shape != self.sum_.shape:
            raise InputError(
                f"part_probs have {tuple(s.shape)} (n x B) but earlier batches had "
                f"{tuple(self.sum_.shape)}"
            )
        self.sum_ = s if self.sum_ is None else self.sum_ + s.to(self.sum_.device)
        self.count_ += pp.shape[0]
        return self

    def result(self) -> Locality:
        """The normalised histograms, entropies and their mean."""
        if self.sum_ is None or self.count_ == 0:
            raise InputError("no part probabilities were added; call update() first")
        hist = self.sum_ / self.count_
        total = hist.sum(-1, keepdim=True)
        b = hist.shape[-1]
        norm = torch.where(total > 0, hist / torch.where(total > 0, total, 1), 1.0 / b)
        ent = _entropy(hist)
        return Locality(histograms=norm, entropy=ent, mean=float(ent.mean()))


def locality(part_probs: torch.Tensor) -> Locality:
    """Locality entropy of part probabilities held in memory (:doc:`/methods/metrics`).

    Parameters
    ----------
    part_probs : Tensor
        ``M x n x B``: part probabilities of ``n`` sources on ``M`` images (from
        :func:`voronoi_part_probabilities`, :func:`mask_part_probabilities` or
        :func:`keypoint_probabilities`); ``M x B`` for a single source (the 1-heatmap).

    Returns
    -------
    Locality
    """
    return LocalityAccumulator().update(part_probs).result()
