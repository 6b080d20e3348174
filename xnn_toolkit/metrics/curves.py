"""Perturbation curves: deletion / insertion (Petsiuk et al., RISE) and the masking test.

- Deletion: pixels are replaced by a baseline in order of decreasing heatmap value; at step
  ``k`` of ``S`` the top ``floor(k·H·W / S)`` pixels are replaced and the model's score for the
  target is recorded. A faithful heatmap makes the score fall fast (small area, lower is
  better).
- Insertion: the image starts as the baseline and the same pixels are put back in the same
  order (large area, higher is better).
- Area under a curve: trapezoidal rule over the fractions ``k / S`` in [0, 1].
- Masking test (Khorram 2020 App. A.2, Table A.2): keep the top-``n`` pixels of a heatmap, paint
  the rest with ``fill`` (black), optionally inpaint, re-classify; accuracy vs ``n``.

Pixel order: decreasing heatmap value, ties in row-major order
(:func:`xnn_toolkit.metrics.pixel_ranks`). A "pixel" covers all channels. The model runs in
eval mode without gradients inside :func:`~xnn_toolkit._guard.model_guard` and is left
exactly as it was; perturbed images are built and scored in batches of ``batch_size``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .._guard import model_guard
from ..errors import InputError
from ._inputs import _as_labels, _as_maps, _as_tensor, _check_batch, _check_size
from .ranking import pixel_ranks

__all__ = ["Curve", "MaskingResult", "deletion_curve", "insertion_curve", "masking_test"]

Baseline = float | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Curve:
    """A deletion or insertion curve for each heatmap.

    Attributes
    ----------
    fractions : Tensor
        ``S + 1`` fractions of the pixels perturbed, ``0, 1/S, ..., 1``.
    counts : Tensor
        ``S + 1`` int64 pixel counts at each step, ``floor(k·H·W / S)``.
    scores : Tensor
        ``N x (S + 1)`` (or ``N x K x (S + 1)``) target scores at each step.
    auc : Tensor
        ``N`` (or ``N x K``) areas under the curves (trapezoidal rule).
    """

    fractions: torch.Tensor
    counts: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


@dataclass
class MaskingResult:
    """Accuracy of the model on images reduced to their top-``n`` heatmap pixels.

    Attributes
    ----------
    n_pixels : Tensor
        ``L`` int64 pixel counts kept.
    accuracy : Tensor
        ``L`` (or ``K x L`` for ``K`` heatmaps per image) share of correct predictions.
    correct : Tensor
        ``N x L`` (or ``N x K x L``) bool.
    """

    n_pixels: torch.Tensor
    accuracy: torch.Tensor
    correct: torch.Tensor


def _check_images(model: nn.Module, inputs: torch.Tensor, heatmaps: torch.Tensor):
    if not isinstance(model, nn.Module) and not callable(model):
        raise InputError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    x = _as_maps(inputs, "inputs", ndims=(4,), expected="N x C x H x W")
    maps = _as_maps(heatmaps).to(x.device)
    _check_batch(maps, x.shape[0], "inputs")
    _check_size(maps, tuple(x.shape[-2:]), "the input images")
    return x, maps


def _baseline(baseline: Baseline, x: torch.Tensor) -> torch.Tensor:
    b = baseline(x) if callable(baseline) else baseline
    b = _as_tensor(b, "baseline").to(device=x.device, dtype=x.dtype)
    try:
        return torch.broadcast_to(b, x.shape)
    except RuntimeError:
        raise InputError(
            f"baseline of shape {tuple(b.shape)} does not broadcast to the inputs "
            f"{tuple(x.shape)}; pass a scalar, a C x 1 x 1 / C x H x W / N x C x H x W tensor "
            "or a callable returning one"
        ) from None


def _score(out: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    if out.dim() != 2:
        raise InputError(f"the model must return N x classes logits, got {tuple(out.shape)}")
    if score == "probability":
        out = out.softmax(1)
    return out.gather(1, target[:, None])[:, 0]


def _run(
    model: nn.Module | Callable,
    x: torch.Tensor,
    other: torch.Tensor,
    ranks: torch.Tensor,
    counts: torch.Tensor,
    keep_top: bool,
    batch_size: int,
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    finish: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Evaluate ``fn(images, job_image, job_map)`` for every (map, step) job.

    Job ``j`` takes map ``j // S'`` (``S' = len(counts)``) of the flattened ``N·K`` maps and
    step ``j % S'``; pixels with rank ``< counts[step]`` come from ``x`` when ``keep_top``
    (else from ``other``), the rest from the other source.
    """
    n_maps = ranks.shape[0]
    k = n_maps // x.shape[0]
    steps = counts.shape[0]
    flat_ranks = ranks.reshape(n_maps, 1, *ranks.shape[-2:])
    out = []
    guard = model_guard(model) if isinstance(model, nn.Module) else _null()
    with guard, torch.no_grad():
        for start in range(0, n_maps * steps, batch_size):
            job = torch.arange(start, min(start + batch_size, n_maps * steps), device=x.device)
            m, s = job // steps, job % steps
            img = m // k
            top = flat_ranks[m] < counts[s].view(-1, 1, 1, 1)
            first, second = (x[img], other[img]) if keep_top else (other[img], x[img])
            batch = torch.where(top, first, second)
            if finish is not None:
                batch = finish(batch, top)
            out.append(fn(model(batch), img, m))
    return torch.cat(out).reshape(n_maps, steps)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _targets(target: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    t = _as_tensor(target, "target")
    if t.dim() == 0:
        t = t.expand(n)
    return _as_labels(t, n, "target").to(device)


def _curve(model, inputs, heatmaps, target, baseline, steps, score, batch_size, insertion) -> Curve:
    x, maps = _check_images(model, inputs, heatmaps)
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a positive int, got {steps!r}")
    if score not in ("probability", "logit"):
        raise InputError(f"score must be 'probability' or 'logit', got {score!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    tgt = _targets(target, n, x.device)
    base = _baseline(baseline, x)
    hw = x.shape[-1] * x.shape[-2]
    counts = (torch.arange(steps + 1, device=x.device) * hw) // steps
    ranks = pixel_ranks(maps).reshape(-1, *maps.shape[-2:])

    def fn(out, img, _m):
        return _score(out, tgt[img], score)

    # Deletion keeps the *remaining* pixels of x: the top ones come from the baseline.
    scores = _run(model, x, base, ranks, counts, insertion, batch_size, fn)
    scores = scores.reshape(*maps.shape[:-2], steps + 1)
    fractions = torch.arange(steps + 1, dtype=scores.dtype, device=x.device) / steps
    auc = torch.trapezoid(scores, fractions, dim=-1)
    return Curve(fractions=fractions, counts=counts, scores=scores, auc=auc)


def deletion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    heatmaps: torch.Tensor,
    target: int | torch.Tensor,
    *,
    baseline: Baseline = 0.0,
    steps: int = 20,
    score: Literal["probability", "logit"] = "probability",
    batch_size: int = 64,
) -> Curve:
    """Deletion curve and its area: remove the most relevant pixels first.

    Parameters
    ----------
    model : nn.Module
        Classifier returning ``N x classes`` logits (left unchanged).
    inputs : Tensor
        ``N x C x H x W`` images, in the model's input space.
    heatmaps : Tensor
        ``N x H x W`` (or ``N x K x H x W``: ``K`` maps per image, each its own curve).
    target : int or Tensor
        Class scored, one for all or ``N`` per image.
    baseline : float, Tensor or callable
        Value of deleted pixels: a scalar, a tensor broadcastable to ``inputs``, or
        ``fn(inputs) -> tensor`` (e.g. a blur). Default 0 (in the model's input space).
    steps : int
        Number of steps ``S``; ``S + 1`` points from 0 to all pixels deleted.
    score : {"probability", "logit"}
        Softmax probability of the target (RISE) or its logit.
    batch_size : int
        Perturbed images per forward pass.

    Returns
    -------
    Curve
        Fractions, counts, ``N (x K) x (S + 1)`` scores and ``N (x K)`` areas (lower is better).
    """
    return _curve(model, inputs, heatmaps, target, baseline, steps, score, batch_size, False)


def insertion_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    heatmaps: torch.Tensor,
    target: int | torch.Tensor,
    *,
    baseline: Baseline = 0.0,
    steps: int = 20,
    score: Literal["probability", "logit"] = "probability",
    batch_size: int = 64,
) -> Curve:
    """Insertion curve and its area: reveal the most relevant pixels first.

    Starts from the baseline image (RISE uses a blurred copy: pass a callable) and puts the
    pixels of ``inputs`` back in order of decreasing heatmap value. Parameters as in
    :func:`deletion_curve`.

    Returns
    -------
    Curve
        Fractions, counts, ``N (x K) x (S + 1)`` scores and areas (higher is better).
    """
    return _curve(model, inputs, heatmaps, target, baseline, steps, score, batch_size, True)


def masking_test(
    model: nn.Module,
    inputs: torch.Tensor,
    heatmaps: torch.Tensor,
    labels: torch.Tensor,
    n_pixels: Sequence[int],
    *,
    fill: Baseline = 0.0,
    inpaint: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 64,
) -> MaskingResult:
    """Masking test of Khorram 2020 App. A.2: classify images reduced to their top-n pixels.

    Parameters
    ----------
    model : nn.Module
        Classifier returning ``N x classes`` logits (left unchanged).
    inputs : Tensor
        ``N x C x H x W`` images in the model's input space.
    heatmaps : Tensor
        ``N x H x W`` (the 1-heatmap) or ``N x K x H x W`` (e.g. one map per x-feature;
        accuracy per map), same ``H x W`` as the inputs.
    labels : Tensor
        ``N`` true classes.
    n_pixels : sequence of int
        Pixel counts to keep (e.g. 300, 500, 1000 as in Table A.2), each in ``[0, H·W]``.
    fill : float, Tensor or callable
        What masked pixels become, in the model's input space: painting "black" on a
        normalised model is ``(0 − mean) / std`` per channel, a ``C x 1 x 1`` tensor.
    inpaint : callable, optional
        ``inpaint(images, keep) -> images`` applied to the masked batch (``keep`` is
        ``B x 1 x H x W`` bool), as the thesis inpaints before classifying. Default none.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    MaskingResult
        Accuracy per pixel count (and per map when ``K`` maps per image).
    """
    x, maps = _check_images(model, inputs, heatmaps)
    n = x.shape[0]
    y = _as_labels(labels, n).to(x.device)
    hw = x.shape[-1] * x.shape[-2]
    counts = torch.as_tensor(list(n_pixels), dtype=torch.long, device=x.device).reshape(-1)
    if counts.numel() == 0 or int(counts.min()) < 0 or int(counts.max()) > hw:
        raise InputError(
            f"n_pixels must be a non-empty list of counts in [0, {hw}], got {n_pixels}"
        )
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if inpaint is not None and not callable(inpaint):
        raise InputError("inpaint must be a callable inpaint(images, keep) -> images")
    base = _baseline(fill, x)
    ranks = pixel_ranks(maps).reshape(-1, *maps.shape[-2:])

    def fn(out, img, _m):
        if out.dim() != 2:
            raise InputError(f"the model must return N x classes logits, got {tuple(out.shape)}")
        return out.argmax(1) == y[img]

    correct = _run(model, x, base, ranks, counts, True, batch_size, fn, inpaint)
    correct = correct.reshape(*maps.shape[:-2], counts.numel())
    return MaskingResult(n_pixels=counts, accuracy=correct.float().mean(0), correct=correct)
