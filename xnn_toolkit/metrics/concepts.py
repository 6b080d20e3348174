"""What NMF concepts do to the model: faithfulness of the factorisation and concept importance.

:doc:`/methods/nmf`. :func:`nmf_faithfulness` replaces a layer's activation by its NMF
reconstruction in the forward pass and measures how the predictions and logits change;
:func:`concept_importance` removes one concept at a time from the reconstruction and
measures the drop of the explained logit. Both run the model (left exactly as it was) and
take a fitted :class:`~xnn_toolkit.heads.NMFConcepts` or :class:`~xnn_toolkit.heads.PerClassNMF`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._guard import model_guard
from ..datafit import as_labels
from ..errors import InputError
from ..hooks import intervene
from ..layers import LayerSpec, resolve_layer

if TYPE_CHECKING:
    from ..heads.nmf import NMFConcepts
    from ..heads.nmf_tools import PerClassNMF

__all__ = ["NMFFaithfulness", "concept_importance", "nmf_faithfulness"]


def _per_class_type() -> type:
    from ..heads.nmf_tools import PerClassNMF  # the heads import the metrics: import late

    return PerClassNMF


def _nmf_types() -> tuple[type, type]:
    from ..heads.nmf import NMFConcepts

    return NMFConcepts, _per_class_type()


@dataclass(frozen=True)
class NMFFaithfulness:
    """How well the network's predictions survive replacing a layer by its NMF reconstruction.

    Attributes
    ----------
    agreement : float
        Share of images whose predicted class (argmax logit) is unchanged, in ``[0, 1]``.
    logit_mae : float
        Mean over images and classes of ``|ŷ(MS) − ŷ(X)|`` (:doc:`/methods/metrics` ``F_reg`` form).
    logit_rel_err : float
        ``||ŷ(MS) − ŷ(X)||_F / ||ŷ(X)||_F`` over all images.
    activation_rel_err : float
        ``||X − MS||_F / ||X||_F`` at the layer, over all images.
    n_images : int
    layer : str
    """

    agreement: float
    logit_mae: float
    logit_rel_err: float
    activation_rel_err: float
    n_images: int
    layer: str


def _batches(x: object, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Inputs as ``(x, y)`` batches from a tensor or an iterable of tensors / pairs."""
    if isinstance(x, torch.Tensor):
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], None
        return
    try:
        it = iter(x)  # type: ignore[call-overload]
    except TypeError as exc:
        raise InputError(
            f"x must be a tensor or an iterable of batches, got {type(x).__name__}"
        ) from exc
    for item in it:
        if isinstance(item, torch.Tensor):
            yield item, None
        elif isinstance(item, list | tuple) and item and isinstance(item[0], torch.Tensor):
            y = item[1] if len(item) > 1 and isinstance(item[1], torch.Tensor) else None
            yield item[0], y
        else:
            raise InputError("each batch must be a tensor or an (x, y) pair of tensors")


def _resolve_nmf_layer(model: nn.Module, nmf: object, layer: LayerSpec | None) -> str:
    if not isinstance(nmf, _nmf_types()):
        raise InputError(f"nmf must be a fitted NMFConcepts or PerClassNMF, got {type(nmf)}")
    nmf._check_fitted()
    spec = layer if layer is not None else getattr(nmf, "layer_", None)
    if spec is None:
        raise InputError(
            "which layer does the factorisation belong to? pass layer=... (or fit from a "
            "bank / with fit(X, layer=...) so that nmf.layer_ is set)"
        )
    return resolve_layer(model, spec)[0]


def _codec(
    nmf: NMFConcepts | PerClassNMF, labels: torch.Tensor | None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """(encode, decode) for one batch; per-class factorisations use ``labels``."""
    if isinstance(nmf, _per_class_type()):
        assert labels is not None
        return (lambda a: nmf.transform(a, labels)), (lambda s: nmf.inverse_transform(s, labels))
    return nmf.transform, nmf.inverse_transform


def nmf_faithfulness(
    model: nn.Module,
    x: torch.Tensor | Iterable[Any],
    nmf: NMFConcepts | PerClassNMF,
    *,
    layer: LayerSpec | None = None,
    y: torch.Tensor | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> NMFFaithfulness:
    """Run the network with the layer's activation replaced by ``M S`` (:doc:`/methods/nmf`).

    For every batch: the plain forward gives logits ``ŷ``; the forward inside
    :func:`xnn_toolkit.hooks.intervene` replaces the layer output ``X`` by
    ``nmf.reconstruct(X)`` (NNLS scores with the basis fixed, then ``M S``) and gives
    ``ŷ(MS)``. The model is left exactly as it was (modes, hooks, flags), also on errors.

    Parameters
    ----------
    model : nn.Module
    x : Tensor or iterable of batches
        Images ``N x 3 x H x W``, or a DataLoader-like iterable of tensors or ``(x, y)``.
    nmf : NMFConcepts or PerClassNMF
        Fitted on this layer's activations. A :class:`PerClassNMF` uses each image's class:
        ``y`` when given (or the batches' labels), otherwise the model's own prediction.
    layer : layer spec, optional
        Default: ``nmf.layer_``.
    y : Tensor, optional
        ``N`` labels (only used by a :class:`PerClassNMF`).
    batch_size : int
    device : optional
        Where to run; default: the model's device.

    Returns
    -------
    NMFFaithfulness
    """
    name = _resolve_nmf_layer(model, nmf, layer)
    dev = torch.device(device) if device is not None else model_device(model)
    n = agree = 0
    abs_sum = d2 = y2 = x2 = r2 = 0.0
    n_logits = 0
    start = 0
    for xb, yb in _batches(x, batch_size):
        xb = xb.to(dev)
        with torch.no_grad(), model_guard(model):
            logits = model(xb)
        labels = _batch_labels(nmf, y, yb, start, xb.shape[0], logits)
        encode, decode = _codec(nmf, labels)
        errs: list[float] = []

        def edit(a: torch.Tensor, encode=encode, decode=decode, errs=errs) -> torch.Tensor:
            rec = decode(encode(a)).to(device=a.device, dtype=a.dtype)
            errs.append(float(((a - rec).double() ** 2).sum()))
            errs.append(float((a.double() ** 2).sum()))
            return rec

        with torch.no_grad(), intervene(model, {name: edit}):
            rec_logits = model(xb)
        diff = (rec_logits - logits).double()
        n += xb.shape[0]
        start += xb.shape[0]
        agree += int((rec_logits.argmax(1) == logits.argmax(1)).sum())
        abs_sum += float(diff.abs().sum())
        n_logits += diff.numel()
        d2 += float((diff**2).sum())
        y2 += float((logits.double() ** 2).sum())
        r2 += errs[0]
        x2 += errs[1]
    if n == 0:
        raise InputError("x is empty: no images to run")
    return NMFFaithfulness(
        agreement=agree / n,
        logit_mae=abs_sum / n_logits,
        logit_rel_err=math.sqrt(d2 / y2) if y2 > 0 else 0.0,
        activation_rel_err=math.sqrt(r2 / x2) if x2 > 0 else 0.0,
        n_images=n,
        layer=name,
    )


def _batch_labels(
    nmf: object,
    y: torch.Tensor | None,
    yb: torch.Tensor | None,
    start: int,
    n: int,
    logits: torch.Tensor,
) -> torch.Tensor | None:
    if not isinstance(nmf, _per_class_type()):
        return None
    if y is not None:
        return as_labels(y).reshape(-1)[start : start + n].cpu()
    if yb is not None:
        return yb.reshape(-1).long().cpu()
    return logits.argmax(1).cpu()


def concept_importance(
    model: nn.Module,
    x: torch.Tensor | Iterable[Any],
    nmf: NMFConcepts | PerClassNMF,
    *,
    layer: LayerSpec | None = None,
    y: torch.Tensor | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Importance of each concept for each class: the logit drop when it is removed.

    With ``X ≈ M S`` at the layer, concept ``k`` is removed by zeroing its score row:
    ``X̃_k = M S_{−k}``. ``drop[k, c] = mean_i (ŷ_c(M S) − ŷ_c(M S_{−k}))`` — the baseline is
    the full reconstruction, so the reconstruction error does not count as importance.
    With ``y`` (or labelled batches) column ``c`` averages over the images of class ``c``
    only (the concept's importance for recognising that class; NaN for classes without
    images); otherwise over all images.

    Parameters
    ----------
    model, x, nmf, layer, batch_size, device
        As :func:`nmf_faithfulness`.
    y : Tensor, optional
        ``N`` class labels.

    Returns
    -------
    Tensor, ``r x K`` (float64, CPU)
        ``K`` = number of logits.
    """
    name = _resolve_nmf_layer(model, nmf, layer)
    dev = torch.device(device) if device is not None else model_device(model)
    rank = nmf.estimators_[0].rank if isinstance(nmf, _per_class_type()) else nmf.rank
    total: torch.Tensor | None = None
    count: torch.Tensor | None = None
    per_class: bool | None = None
    start = 0
    for xb, yb in _batches(x, batch_size):
        xb = xb.to(dev)
        n = xb.shape[0]
        with torch.no_grad(), model_guard(model):
            logits = model(xb)
        encode, decode = _codec(nmf, _batch_labels(nmf, y, yb, start, n, logits))
        store: dict[str, torch.Tensor] = {}

        def full(a: torch.Tensor, encode=encode, decode=decode, store=store) -> torch.Tensor:
            store["S"] = encode(a)
            return decode(store["S"]).to(device=a.device, dtype=a.dtype)

        with torch.no_grad(), intervene(model, {name: full}):
            base = model(xb).double()
        drops = []
        for k in range(rank):

            def without(a: torch.Tensor, k=k, decode=decode, store=store) -> torch.Tensor:
                S = store["S"].clone()
                S[:, k] = 0
                return decode(S).to(device=a.device, dtype=a.dtype)

            with torch.no_grad(), intervene(model, {name: without}):
                drops.append(base - model(xb).double())
        D = torch.stack(drops).cpu()  # r x n x K
        if total is None or count is None:
            total = torch.zeros(rank, D.shape[2], dtype=torch.float64)
            count = torch.zeros(D.shape[2], dtype=torch.float64)
        if y is not None:
            lab = as_labels(y).reshape(-1)[start : start + n].cpu()
        else:
            lab = yb.reshape(-1).long().cpu() if yb is not None else None
        if per_class is not None and per_class != (lab is not None):
            raise InputError("either every batch carries labels or none does")
        per_class = lab is not None
        if lab is not None:
            onehot = F.one_hot(lab, D.shape[2]).double()  # n x K
            total += (D * onehot[None]).sum(dim=1)
            count += onehot.sum(dim=0)
        else:
            total += D.sum(dim=1)
            count += n
        start += n
    if total is None or count is None:
        raise InputError("x is empty: no images to run")
    return total / torch.where(count > 0, count, torch.full_like(count, float("nan")))
