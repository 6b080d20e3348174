"""Checking and shaping the arrays that the metrics receive.

Conventions shared by every metric (see also :mod:`xnn_toolkit.data.types`):

- heatmaps are float tensors ``N x H x W`` (one map per image) or ``N x K x H x W`` (``K``
  maps per image: x-features, filters, classes); integer or bool maps are converted to
  ``float32``; NaN or infinite values are an error;
- ground-truth masks are ``N x H x W`` (bool, or int64 part labels) and must have the heatmaps'
  spatial size. A size mismatch is an :class:`~xnn_toolkit.errors.InputError`, never a
  silent resize: resizing changes the score and must be the caller's visible choice. Use
  :func:`resize_heatmaps` to bring maps to the mask size first;
- results are computed on the heatmaps' device; annotations are moved there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError

__all__ = ["resize_heatmaps"]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"{name} must be a tensor or array, got {type(x).__name__}; "
            "pass a torch.Tensor (or a numpy array)"
        ) from exc


def _as_maps(
    x: Any,
    name: str = "heatmaps",
    ndims: tuple[int, ...] = (3, 4),
    expected: str | None = None,
) -> torch.Tensor:
    """Return ``x`` as a floating tensor with one of the allowed numbers of dimensions."""
    t = _as_tensor(x, name)
    if t.dim() not in ndims:
        shapes = expected or " or ".join(
            {2: "N x D", 3: "N x H x W", 4: "N x K x H x W"}.get(d, f"{d}-D") for d in ndims
        )
        raise InputError(
            f"{name} must be {shapes}, got shape {tuple(t.shape)}; add or remove the "
            "leading batch / feature dimension (e.g. heatmaps[:, None] or heatmaps[:, 0])"
        )
    if t.numel() == 0:
        raise InputError(
            f"{name} is empty (shape {tuple(t.shape)}); pass at least one map of at least 1 x 1"
        )
    if not t.is_floating_point():
        t = t.float()
    # one reduction in the common case: a finite sum means no NaN / inf (the full check
    # runs only to confirm, e.g. when a sum of huge finite values overflows)
    if t.numel() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise InputError(
            f"{name} contains NaN or infinite values; clean them (e.g. torch.nan_to_num) "
            "before scoring"
        )
    return t


def _as_labels(x: Any, n: int, name: str = "labels") -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 1 or t.shape[0] != n:
        raise InputError(f"{name} must be a 1-D tensor of length {n}, got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        if t.dtype == torch.bool or not bool((t == t.round()).all()):
            raise InputError(f"{name} must hold integer class indices, got dtype {t.dtype}")
    t = t.long()
    if t.numel() and int(t.min()) < 0:
        raise InputError(f"{name} must be >= 0, got a minimum of {int(t.min())}")
    return t


def _check_size(maps: torch.Tensor, size: tuple[int, int], what: str) -> None:
    if tuple(maps.shape[-2:]) != tuple(size):
        raise InputError(
            f"heatmaps are {tuple(maps.shape[-2:])} (H x W) but {what} is {tuple(size)}; "
            "resize the heatmaps first, e.g. "
            f"xnn_toolkit.metrics.resize_heatmaps(heatmaps, {tuple(size)})"
        )


def _check_batch(maps: torch.Tensor, n: int, what: str) -> None:
    if maps.shape[0] != n:
        raise InputError(
            f"heatmaps hold {maps.shape[0]} images but {what} holds {n}; pass the same batch"
        )


def _as_masks(x: Any, maps: torch.Tensor, name: str = "masks") -> torch.Tensor:
    """Boolean ``N x H x W`` masks that match the heatmaps, on their device."""
    m = _as_tensor(x, name)
    if m.dim() == 2:
        m = m[None]
    if m.dim() != 3:
        raise InputError(f"{name} must be N x H x W, got shape {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.is_floating_point() and not bool(((m == 0) | (m == 1)).all()):
            raise InputError(f"{name} must be binary (bool or 0/1), got other values")
        m = m != 0
    _check_batch(maps, m.shape[0], name)
    _check_size(maps, tuple(m.shape[-2:]), name)
    return m.to(maps.device)


def _per_image(mask: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """View an ``N x H x W`` tensor so it broadcasts against ``N x H x W`` or ``N x K x H x W``."""
    return mask if maps.dim() == 3 else mask[:, None]


def _box_masks(bbox: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``N x H x W`` bool: pixel centres inside each inclusive box ``(x0, y0, x1, y1)``."""
    b = bbox.to(device=device, dtype=torch.float64)
    h, w = size
    ys = torch.arange(h, device=device, dtype=torch.float64)
    xs = torch.arange(w, device=device, dtype=torch.float64)
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] <= b[:, 3:4])
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] <= b[:, 2:3])
    return in_y[:, :, None] & in_x[:, None, :]


def _check_boxes(bbox: Any, n: int) -> torch.Tensor:
    b = _as_tensor(bbox, "bbox")
    if b.dim() != 2 or tuple(b.shape) != (n, 4):
        raise InputError(f"bbox must be N x 4 (x0, y0, x1, y1) with N = {n}, got {tuple(b.shape)}")
    b = b.double()
    if not bool(torch.isfinite(b).all()):
        raise InputError("bbox contains NaN or infinite values")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise InputError(
            f"bbox {i} is {b[i].tolist()}: x1 < x0 or y1 < y0; boxes are inclusive "
            "(x0, y0, x1, y1) with x0 <= x1 and y0 <= y1"
        )
    return b


def resize_heatmaps(
    heatmaps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear"
) -> torch.Tensor:
    """Resize heatmaps to a ground-truth size (the metrics never do it silently).

    Parameters
    ----------
    heatmaps : Tensor
        ``N x H x W`` or ``N x K x H x W``.
    size : (int, int)
        Target ``(H', W')``.
    mode : str
        ``"bilinear"`` (default, ``align_corners=False``) or ``"nearest"``.

    Returns
    -------
    Tensor
        ``N x H' x W'`` or ``N x K x H' x W'``, same dtype and device.
    """
    maps = _as_maps(heatmaps)
    if mode not in ("bilinear", "nearest"):
        raise InputError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    x = maps[:, None] if maps.dim() == 3 else maps
    kw = {"align_corners": False} if mode == "bilinear" else {}
    out = F.interpolate(x, size=tuple(size), mode=mode, **kw)
    return out[:, 0] if maps.dim() == 3 else out
