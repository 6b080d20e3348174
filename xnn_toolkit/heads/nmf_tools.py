"""NMF beyond one factorisation: per-class NMF, rank selection, concept maps and top images.

:doc:`/methods/nmf`. :class:`PerClassNMF` fits one :class:`~xnn_toolkit.heads.NMFConcepts`
per class; :func:`select_rank` tabulates the reconstruction error against the rank;
:func:`concept_maps` upsamples the concept maps to image size and :func:`top_images`
ranks the images of each concept.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.base import clone

from ..datafit import as_labels
from ..errors import AssetError, InputError, NotFittedError
from ._base import Head, keeps_global_rng
from .nmf import (
    NMFConcepts,
    _is_bank,
    _read_safetensors,
    _Source,
    _source,
    _write_safetensors,
)

__all__ = ["PerClassNMF", "RankTable", "concept_maps", "select_rank", "top_images"]


class _LabelSubset:
    """A bank seen through a label filter (rows with ``keep`` True), batch by batch."""

    def __init__(self, bank: Any, keep: torch.Tensor) -> None:
        self._bank, self._keep = bank, keep
        self.layers = list(bank.layers)
        self.labels = torch.as_tensor(bank.labels)[keep]

    def __len__(self) -> int:
        return int(self._keep.sum())

    def activations(self, layer: str) -> torch.Tensor:
        return torch.as_tensor(self._bank.activations(layer))[self._keep]

    def iter_batches(self, layer: str, batch_size: int) -> Iterator[torch.Tensor]:
        start = 0
        for b in self._bank.iter_batches(layer, batch_size):
            b = torch.as_tensor(b)
            sel = self._keep[start : start + b.shape[0]]
            start += b.shape[0]
            if bool(sel.any()):
                yield b[sel.to(b.device)]


class PerClassNMF(Head):
    """One NMF per class: concepts of the activations of each class separately.

    Parameters
    ----------
    estimator : NMFConcepts, optional
        Template (cloned per class with its hyperparameters); default ``NMFConcepts()``.
    min_samples : int
        Classes with fewer examples raise :class:`~xnn_toolkit.errors.InputError`.

    Attributes
    ----------
    classes_ : Tensor, ``K``
        Sorted class labels.
    estimators_ : list of NMFConcepts
        The fitted factorisation of each class, aligned with ``classes_``.
    components_ : Tensor, ``K x C x r``
        The stacked bases.
    """

    def __init__(self, estimator: NMFConcepts | None = None, *, min_samples: int = 1) -> None:
        self.estimator = estimator
        self.min_samples = min_samples

    def _template(self) -> NMFConcepts:
        return clone(self.estimator) if self.estimator is not None else NMFConcepts()

    @staticmethod
    def _labels(src: _Source, y: object, n: int | None) -> torch.Tensor:
        if y is None:
            y = src.labels()
            if y is None:
                raise InputError("labels are needed: pass y=... (one class label per example)")
        y = as_labels(y).reshape(-1).cpu()
        if n is not None and y.numel() != n:
            raise InputError(f"y has {y.numel()} labels for {n} examples; give one per example")
        if bool((y < 0).any()):
            raise InputError("y has negative labels (unlabelled examples); drop them first")
        return y

    @keeps_global_rng
    def fit(self, X: object, y: object = None, *, layer: str | None = None) -> PerClassNMF:
        """Fit one :class:`NMFConcepts` per class.

        Parameters
        ----------
        X : Tensor or activation bank
            As :meth:`NMFConcepts.fit`.
        y : Tensor, optional
            ``N`` class labels; default: the bank's ``labels``.
        layer : str, optional
            Bank layer.

        Returns
        -------
        PerClassNMF
            ``self``.
        """
        src = _source(X, layer)
        template = self._template()
        if src.tensor is not None or not template.online:
            a = src.full()
            labels = self._labels(src, y, a.shape[0])
            data = None
        else:
            a = None
            labels = self._labels(src, y, len(src.bank) if hasattr(src.bank, "__len__") else None)
            data = src.bank
        classes = torch.unique(labels)
        if classes.numel() == 0:
            raise InputError("no labelled examples to fit")
        estimators = []
        for c in classes.tolist():
            keep = labels == c
            if int(keep.sum()) < self.min_samples:
                raise InputError(
                    f"class {c} has {int(keep.sum())} examples, fewer than min_samples="
                    f"{self.min_samples}"
                )
            est = clone(template)
            if a is not None:
                est.fit(a[keep.to(a.device)], layer=src.layer)
            else:
                est.fit(_LabelSubset(data, keep), layer=src.layer)
            estimators.append(est)
        self.classes_ = classes
        self.estimators_ = estimators
        self.components_ = torch.stack([e.components_ for e in estimators])
        self.layer_ = src.layer
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "estimators_"):
            raise NotFittedError("this PerClassNMF is not fitted yet; call fit(X, y) first")

    def _index(self, labels: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        known = set(self.classes_.tolist())
        unknown = sorted(set(labels.tolist()) - known)
        if unknown:
            raise InputError(
                f"labels {unknown[:5]} have no fitted factorisation; fitted classes: "
                f"{sorted(known)[:10]}"
            )
        return [(i, labels == c) for i, c in enumerate(self.classes_.tolist())]

    def transform(self, X: object, y: object = None, *, layer: str | None = None) -> torch.Tensor:
        """Scores of each example under its own class's basis.

        Parameters
        ----------
        X : Tensor or activation bank
        y : Tensor, optional
            ``N`` labels choosing the basis of each example (default: the bank's labels).

        Returns
        -------
        Tensor
            ``N x r x H x W`` or ``N x r``.
        """
        self._check_fitted()
        src = _source(X, layer if layer is not None or not _is_bank(X) else self.layer_)
        a = src.full()
        labels = self._labels(src, y, a.shape[0])
        out: torch.Tensor | None = None
        for i, keep in self._index(labels):
            if not bool(keep.any()):
                continue
            s = self.estimators_[i].transform(a[keep.to(a.device)])
            if out is None:
                out = torch.zeros((a.shape[0], *s.shape[1:]), device=s.device, dtype=s.dtype)
            out[keep.to(s.device)] = s
        assert out is not None
        return out

    def inverse_transform(self, S: torch.Tensor, y: object) -> torch.Tensor:
        """``M_y S`` per example with its class's basis ``M_y``.

        Parameters
        ----------
        S : Tensor, ``N x r x H x W`` or ``N x r``
        y : Tensor, ``N``

        Returns
        -------
        Tensor, ``N x C x H x W`` or ``N x C``
        """
        self._check_fitted()
        labels = as_labels(y).reshape(-1).cpu()
        if labels.numel() != S.shape[0]:
            raise InputError(f"y has {labels.numel()} labels for {S.shape[0]} score maps")
        out: torch.Tensor | None = None
        for i, keep in self._index(labels):
            if not bool(keep.any()):
                continue
            rec = self.estimators_[i].inverse_transform(S[keep.to(S.device)])
            if out is None:
                out = torch.zeros((S.shape[0], *rec.shape[1:]), device=S.device, dtype=S.dtype)
            out[keep.to(S.device)] = rec
        assert out is not None
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write all classes' bases to one ``.safetensors`` file (JSON metadata, no pickle)."""
        self._check_fitted()
        tensors: dict[str, torch.Tensor] = {}
        attrs = []
        for i, est in enumerate(self.estimators_):
            t, a = est._state()
            tensors.update({f"class.{i}.{k}": v for k, v in t.items()})
            attrs.append(a)
        params = {
            "estimator": self._template()._json_params(),
            "min_samples": self.min_samples,
            "classes": self.classes_.tolist(),
            "layer_": self.layer_,
        }
        _write_safetensors(path, tensors, "PerClassNMF", params, attrs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PerClassNMF:
        """Read a :class:`PerClassNMF` written by :meth:`save`."""
        tensors, meta = _read_safetensors(path, "PerClassNMF")
        params, attrs = meta["params"], meta["attrs"]
        try:
            template = NMFConcepts(**params["estimator"])
            obj = cls(template, min_samples=params["min_samples"])
            estimators = []
            for i, a in enumerate(attrs):
                est = clone(template)
                est._restore({k: tensors[f"class.{i}.{k}"] for k in ("components", "shift")}, a)
                estimators.append(est)
        except KeyError as exc:
            raise AssetError(f"{os.fspath(path)!r} is missing {exc} for a PerClassNMF") from exc
        obj.classes_ = torch.tensor(params["classes"], dtype=torch.long)
        obj.estimators_ = estimators
        obj.components_ = torch.stack([e.components_ for e in estimators])
        obj.layer_ = params["layer_"]
        return obj


@dataclass
class RankTable:
    """Reconstruction error of NMF against the rank (from :func:`select_rank`).

    Attributes
    ----------
    ranks : list of int
    reconstruction_err : list of float
        ``||X − MS||_F`` at each rank.
    relative_err : list of float
        ``||X − MS||_F / ||X||_F``.
    explained : list of float
        ``1 − relative_err²``: share of ``||X||²`` reconstructed.
    n_iter : list of int
    seconds : list of float
        Fit wall time.
    """

    ranks: list[int] = field(default_factory=list)
    reconstruction_err: list[float] = field(default_factory=list)
    relative_err: list[float] = field(default_factory=list)
    explained: list[float] = field(default_factory=list)
    n_iter: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The table as Markdown, one row per rank."""
        lines = [
            "| rank | reconstruction error | relative error | explained | iterations | s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for i, r in enumerate(self.ranks):
            lines.append(
                f"| {r} | {self.reconstruction_err[i]:.4g} | {self.relative_err[i]:.4f} | "
                f"{self.explained[i]:.4f} | {self.n_iter[i]} | {self.seconds[i]:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def select_rank(
    X: object,
    ranks: Sequence[int] = (2, 4, 8, 16, 32),
    *,
    estimator: NMFConcepts | None = None,
    layer: str | None = None,
) -> RankTable:
    """Fit NMF at several ranks and tabulate the reconstruction error.

    Parameters
    ----------
    X : Tensor or activation bank
        As :meth:`NMFConcepts.fit`.
    ranks : sequence of int
        Ranks to try (each ``< C``).
    estimator : NMFConcepts, optional
        Template for the other hyperparameters (cloned; its ``rank`` is replaced).
    layer : str, optional
        Bank layer.

    Returns
    -------
    RankTable
        One row per rank, in the order given. Look for the elbow of ``relative_err``.
    """
    template = estimator if estimator is not None else NMFConcepts()
    ranks = list(ranks)
    if not ranks:
        raise InputError("ranks is empty; give the ranks to try, e.g. (2, 4, 8, 16, 32)")
    table = RankTable()
    for r in ranks:
        est = clone(template).set_params(rank=r)
        t0 = time.perf_counter()
        est.fit(X, layer=layer)
        table.ranks.append(int(r))
        table.reconstruction_err.append(est.reconstruction_err_)
        table.relative_err.append(est.relative_err_)
        table.explained.append(1.0 - est.relative_err_**2)
        table.n_iter.append(est.n_iter_)
        table.seconds.append(time.perf_counter() - t0)
    return table


def concept_maps(
    scores: torch.Tensor,
    size: int | tuple[int, int],
    *,
    mode: str = "bilinear",
    normalize: bool = False,
) -> torch.Tensor:
    """Concept score maps upsampled to image size (:doc:`/methods/nmf`, second bullet).

    Parameters
    ----------
    scores : Tensor, ``N x r x h x w``
        From :meth:`NMFConcepts.transform`.
    size : int or (H, W)
        Image size.
    mode : str
        Interpolation (``"bilinear"``, as Collins et al.; ``"nearest"`` for blocky maps).
    normalize : bool
        Divide each concept by its maximum over the batch, so maps lie in ``[0, 1]`` and are
        comparable across images.

    Returns
    -------
    Tensor, ``N x r x H x W``, non-negative
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim != 4:
        raise InputError(
            f"scores must be N x r x h x w concept maps, got "
            f"{getattr(scores, 'shape', type(scores).__name__)}"
        )
    hw = (size, size) if isinstance(size, int) else tuple(size)
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    maps = F.interpolate(scores.float(), size=hw, mode=mode, **kw).clamp_min_(0)
    if normalize:
        peak = maps.amax(dim=(0, 2, 3), keepdim=True)
        maps = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    return maps


def top_images(
    scores: torch.Tensor, k: int = 8, *, reduce: str = "max"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images where each concept is strongest.

    Parameters
    ----------
    scores : Tensor, ``N x r x h x w`` or ``N x r``
    k : int
        Images per concept (at most ``N``).
    reduce : {"max", "mean"}
        Spatial reduction of a concept's map to one number per image.

    Returns
    -------
    values : Tensor, ``r x k``
        The reduced scores, descending.
    indices : Tensor, ``r x k`` (int64)
        Image indices, best first.
    """
    if not isinstance(scores, torch.Tensor) or scores.ndim not in (2, 4):
        raise InputError("scores must be N x r x h x w or N x r")
    if reduce not in ("max", "mean"):
        raise InputError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    per_image = scores
    if scores.ndim == 4:
        flat = scores.flatten(2)
        per_image = flat.amax(dim=2) if reduce == "max" else flat.mean(dim=2)
    k = min(int(k), per_image.shape[0])
    values, indices = per_image.T.topk(k, dim=1)
    return values, indices
