"""Class-specific gates (CSG) fitted post hoc on a pretrained CNN.

:doc:`/methods/gates` (Liang et al. 2020 and the authors' code), localization per §2.2 and §6 (Liang
et al. 2020
App. G and H). A gate matrix ``G ∈ [0, 1]^{C x K}`` sits on one conv layer with ``K``
channels ("filters"). The *CSG path* multiplies the channels of an image of class ``y`` by
the row ``G_y``; the *STD path* is the ungated network, and it is the only path used at test
time. The gated layer is read by a **new head**, global average pooling followed by a linear
layer, so both paths share the head and the STD accuracy reported is the new head's.

Two recipes (``recipe=``):

- ``"frozen"`` (a): the backbone is frozen; the pooled activations of the gated layer are
  computed once and ``G`` and the new head are learned on them. Because the gate is a
  per-channel constant, gating the map and then pooling equals pooling and then gating.
- ``"finetune"`` (b): a deep copy of the network is made and the blocks named in
  ``finetune`` are trained too (the paper's ResNet152 / PASCAL setting). The user's model is
  never modified. The copy runs in eval mode (BatchNorm statistics frozen, dropout off):
  batch statistics of the few small batches of a post-hoc fit would drift from the running
  ones.

Objective (:doc:`/methods/gates`). In a CSG epoch, with ``h`` the new head and ``a`` the pooled
activations::

    paper form (default):  CE(h(a), y) + λ₁ CE(h(a ⊙ G_y), y) + λ₂ max(0, ‖G‖₁ − g)
    code form:             CE(h(a ⊙ G_y), y) + λ₂ max(0, ‖G‖₁ − g)

and ``CE(h(a), y)`` in an STD epoch (both forms). After every CSG step ``G`` is projected
onto ``{G ∈ [0, 1]^{C x K} : ‖G^k‖_∞ = 1}`` by :func:`project_gates`. The first ``warmup``
epochs are STD epochs; after them, of every ``csg_every`` epochs the first ``csg_ratio`` are
CSG epochs: one in three by default, two in three for the paper's ResNet152. (The authors'
code puts them at the end of each period, ``epoch % mask_period >= mask_epoch_min``; putting
them first lets short post-hoc fits start gating right after the warm-up and end on STD
epochs.) Adam optimises the head (``lr``), the
fine-tuned blocks (``lr_backbone``) and the gates (``lr_gates``, stepped in CSG epochs
only).

Defaults that differ from the authors' code, and why:

- ``lr_gates = 1e-2`` instead of ``1e-3`` and no step decay (the code multiplies every step
  size by 0.1 at 40, 60 and 80 % of the epochs: ``lr_milestones=(0.4, 0.6, 0.8)``): a
  post-hoc fit runs hundreds, not tens of thousands, of gate steps, and each step moves a
  gate by about ``lr_gates`` under Adam, so with the code's values the gates would barely
  leave their start. A larger ``λ₂`` does not help: it pushes every gate of a column down
  alike, which the projection undoes; columns sparsify through the differences of the CE
  gradients;
- ``g = None`` means ``max(0.2·C·K, 2·K)`` (capped at ``C·K``) instead of ``0.2·C·K``: the
  two agree for ``C ≥ 10``; below, ``0.2·C·K`` is infeasible (``‖G‖₁ ≥ K`` always) or forces
  one-hot columns, so at least two classes per filter on average are allowed;
- the gate initialisation is ``init = 0.5`` as in the code (the first projection makes
  every column all ones up to the first step's changes).

Class-specific filters (:meth:`ClassSpecificGates.class_filters`): filter ``k`` belongs to
class ``c`` when ``G[c, k] > threshold`` (0.5), no other class's gate exceeds ``threshold``,
and the mean gate of the other classes is at most ``others`` (0.2) — the column is high for
``c`` and mostly zero elsewhere. Each filter belongs to at most one class.

The localization of the gated filters (Liang et al. 2020 App. G, H) is a metric:
:func:`xnn_toolkit.metrics.gate_localization`, with the filter maps of
:mod:`xnn_toolkit.attribution.filters`.

Mutual-information score (:doc:`/methods/gates`): per channel ``k`` and class ``c`` the mutual
information between the pooled activation and the indicator ``[y = c]``; the score is
``mean_k max_c``, computed by :func:`xnn_toolkit.metrics.mutual_information_score` (binned
plug-in estimate by default, the authors' k-NN estimator with ``mi_estimator="knn"``).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._guard import model_guard
from .._io import checked_load, load_estimator_files, loaded_params, save_estimator_files
from ..datafit import as_labels, data_fit
from ..errors import AssetError, InputError, LayerNotFoundError, NotFittedError
from ..hooks import record
from ..layers import LayerSpec, resolve_layer, stages
from ..metrics.information import MI_ESTIMATORS, mutual_information_score
from ._base import Head, keeps_global_rng

__all__ = [
    "ClassSpecificGates",
    "GateScores",
    "project_gates",
    "sparsity_penalty",
    "l1_density",
    "density_bounds",
    "default_g",
    "gate_similarity",
    "block_order",
]

RECIPES = ("frozen", "finetune")
OBJECTIVES = ("paper", "code")
HEAD_INITS = ("auto", "model", "random")


# --------------------------------------------------------------------------- formulas


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


# --------------------------------------------------------------------------- data


def _collate_xy(batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the first two items (image, label) of dataset samples; drop the rest."""
    try:
        xs = torch.stack([torch.as_tensor(s[0]) for s in batch])
        ys = as_labels([s[1] for s in batch])
    except (TypeError, IndexError, ValueError, RuntimeError) as exc:
        raise InputError(
            "dataset samples must be (image, label, ...) with C x H x W images of one size; "
            f"got {type(batch[0]).__name__}: {exc}"
        ) from exc
    return xs, ys


class _Source:
    """Batches of ``(images, labels)`` from tensors, a Dataset or an iterable of batches."""

    def __init__(self, data: Any, labels: Any, batch_size: int) -> None:
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dataset = None
        self.iterable = None
        self.door: Any = None  # the model's check of every image batch (datafit)
        if isinstance(data, torch.Tensor):
            if labels is None:
                raise InputError(
                    "images were given as a tensor but labels= is missing; pass "
                    "fit(model, images, labels) or fit(model, (images, labels))"
                )
            self.tensors = (data, as_labels(labels))
        elif isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor):
            if len(data) < 2:
                raise InputError("a tuple of data must be (images, labels, ...)")
            self._no_labels(labels)
            self.tensors = (data[0], as_labels(data[1]))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._no_labels(labels)
            self.dataset = data
        elif isinstance(data, Iterable):
            self._no_labels(labels)
            self.iterable = data
        else:
            raise InputError(
                f"data must be (images, labels) tensors, a Dataset of (image, label, ...) "
                f"samples or an iterable of (images, labels, ...) batches; got "
                f"{type(data).__name__}"
            )
        if self.tensors is not None:
            x, y = self.tensors
            if x.dim() != 4:
                raise InputError(f"images must be N x C x H x W, got shape {tuple(x.shape)}")
            y = y.reshape(-1)
            if y.shape[0] != x.shape[0]:
                raise InputError(f"labels must have N = {x.shape[0]} entries, got {y.shape[0]}")
            self.tensors = (x, y.long())

    @staticmethod
    def _no_labels(labels: Any) -> None:
        if labels is not None:
            raise InputError("labels= is only used when the images are given as a tensor")

    @property
    def reiterable(self) -> bool:
        return self.iterable is None or iter(self.iterable) is not self.iterable

    def batches(
        self, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for x, y in self._batches(shuffle, generator):
            yield (x if self.door is None else self.door(x, seen)), y
            seen += int(x.shape[0])

    def _batches(
        self, shuffle: bool, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.tensors is not None:
            x, y = self.tensors
            n = x.shape[0]
            order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield x[idx], y[idx]
            return
        if self.dataset is not None:
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_size=self.batch_size,
                shuffle=shuffle,
                generator=generator if shuffle else None,
                collate_fn=_collate_xy,
            )
            yield from loader
            return
        for batch in self.iterable:
            if not isinstance(batch, tuple | list) or len(batch) < 2:
                raise InputError(
                    f"every batch must be (images, labels, ...); got {type(batch).__name__}"
                )
            x, y = batch[0], as_labels(batch[1]).reshape(-1)
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or y.shape[0] != x.shape[0]:
                raise InputError(
                    "every batch must hold N x C x H x W images and N labels; got "
                    f"{getattr(x, 'shape', type(x).__name__)} and {tuple(y.shape)}"
                )
            yield x, y


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"the model returned {type(output).__name__}, not logits")


def _check_conv(name: str, a: torch.Tensor) -> None:
    if a.dim() != 4:
        raise InputError(
            f"layer {name!r} outputs shape {tuple(a.shape)}, which has no channels to gate: "
            "class-specific gates act on the K channels of a conv layer (N x K x H x W); "
            "pass layer= a conv stage, e.g. one of the names in xnn_toolkit.stages(model)"
        )


@dataclass
class _Extracted:
    features: torch.Tensor  # N x K pooled activations
    labels: torch.Tensor  # N
    model_pred: torch.Tensor | None  # N, argmax of the model's own logits
    n_logits: int = -1  # number of the network's outputs (-1: not N x C logits)


def _extract(network: nn.Module, layer: str, source: _Source, device: torch.device) -> _Extracted:
    """Pooled activations of ``layer`` (and the network's predictions) over all the data."""
    feats, labels, preds = [], [], []
    n_logits = -1
    net_dev = model_device(network)
    with record(network, layer) as rec, torch.no_grad():
        for x, y in source.batches():
            logits = _first_tensor(network(x.to(net_dev)))
            a = rec.activations[layer]
            _check_conv(layer, a)
            feats.append(a.float().mean((2, 3)).to(device))
            labels.append(y.to(device))
            preds.append(logits.argmax(1).to(device) if logits.dim() == 2 else None)
            n_logits = int(logits.shape[1]) if logits.dim() == 2 else -1
            rec.clear()
    if not feats:
        raise InputError("the data is empty: no batch was produced")
    pred = None if any(p is None for p in preds) else torch.cat(preds)
    return _Extracted(torch.cat(feats), torch.cat(labels), pred, n_logits)


def _num_logits(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, int]:
    """Probe one batch: ``(K, number of logits)`` (``-1`` when the output is not N x C)."""
    with record(model, layer) as rec, torch.no_grad():
        out = _first_tensor(model(x[:2].to(model_device(model))))
        a = rec.activations[layer]
    _check_conv(layer, a)
    n_out = int(out.shape[1]) if out.dim() == 2 else -1
    return int(a.shape[1]), n_out


# --------------------------------------------------------------------------- estimator


@dataclass
class GateScores:
    """What :meth:`ClassSpecificGates.evaluate` measures on a dataset (:doc:`/methods/gates`).

    Attributes
    ----------
    n_samples : int
    std_accuracy : float
        Accuracy of the STD path (new head on ungated features).
    csg_accuracy : float
        Accuracy of the CSG path, gated by the *true* class's row (uses the labels; a
        reference, not a test-time accuracy).
    model_accuracy : float or None
        Accuracy of the network's own logits; None when its output count is not ``C`` and
        for the fine-tune recipe (the copy's classifier is not the user's model).
    density : float
        L1-density of the gates.
    density_bounds : (float, float)
        ``[1/C, g/(CK)]``.
    mutual_information : float
        Mean of :func:`xnn_toolkit.metrics.mutual_information_score` on the network's pooled
        activations.
    s_tp, s_fn : Tensor
        ``C x C`` similarity matrices of :func:`gate_similarity` (STD-path predictions).
    """

    n_samples: int
    std_accuracy: float
    csg_accuracy: float
    model_accuracy: float | None
    density: float
    density_bounds: tuple[float, float]
    mutual_information: float
    s_tp: torch.Tensor
    s_fn: torch.Tensor


class ClassSpecificGates(Head):
    """Class-specific gate matrix with a new linear head, fitted post hoc (:doc:`/methods/gates`).

    Parameters
    ----------
    layer : layer spec, optional
        The gated conv layer (see :func:`xnn_toolkit.layers.resolve_layer`); default: the
        last stage, ``xnn_toolkit.layers.stages(model)[-1]``.
    recipe : {"frozen", "finetune"}
        (a) frozen backbone, learn ``G`` and a new head; (b) also fine-tune ``finetune``
        blocks of a deep copy.
    finetune : sequence of layer specs, optional
        Blocks to fine-tune with ``recipe="finetune"`` (dotted names or stage indices); they
        must run before (or be, or contain) the gated layer. Default: the gated layer's own
        module when it has parameters (``"layer4"`` of a ResNet); otherwise the last module
        holding a convolution before it, plus the modules with parameters between them (a
        VGG's last conv before the gated pooling layer).
    objective : {"paper", "code"}
        Loss of a CSG epoch: the paper's ``CE(STD) + λ₁ CE(CSG) + λ₂ d`` or the code's
        ``CE(CSG) + λ₂ d``.
    lambda1 : float
        Weight ``λ₁`` of the CSG cross-entropy (paper form).
    lambda2 : float
        Weight ``λ₂`` of the hinge ``max(0, ‖G‖₁ − g)`` (code: ``lambda_reg = 1e-3``).
    g : float, optional
        Bound of ``‖G‖₁``; must be ``>= K`` (every column's maximum is 1). Default
        :func:`default_g`.
    num_classes : int, optional
        ``C``; default the number of the model's logits. Labels must be ``< C``.
    epochs, warmup, csg_every, csg_ratio : int
        Schedule: ``warmup`` STD epochs, then of every ``csg_every`` epochs the first
        ``csg_ratio`` are CSG epochs (``warmup < epochs``).
    batch_size : int
    lr, lr_gates, lr_backbone : float
        Adam step sizes of the head, the gates and the fine-tuned blocks.
    lr_milestones : sequence of float
        Fractions of ``epochs`` after which every step size is multiplied by ``lr_gamma``
        (the code's ``(0.4, 0.6, 0.8)``; none by default, see the module docstring).
    lr_gamma : float
    init : float
        Initial gate value (code: 0.5).
    head_init : {"auto", "model", "random"}
        Start the new head from the model's own last linear layer when it is exactly
        ``global-average-pool → linear`` on the gated layer (``"auto"`` checks this on the
        first batch and falls back to a random start; ``"model"`` requires it).
    mi_estimator : {"binned", "knn"}
    mi_bins : int
    random_state : int
        Seeds the head's initialisation and the shuffling.
    device : str or torch.device, optional
        Where the head, the gates (and the fine-tuned copy) live; default the model's device.
    verbose : bool
        Print one line per epoch.

    Attributes
    ----------
    gates_ : Tensor
        ``C x K`` gate matrix (CPU).
    head_ : nn.Linear
        The new head ``K → C``.
    layer_ : str
        Dotted name of the gated layer.
    network_ : nn.Module
        The network that feeds the head: the user's model (frozen recipe, never modified) or
        the fine-tuned copy.
    finetune_ : list of str
        Fine-tuned module names (empty for the frozen recipe).
    n_classes_, n_filters_ : int
    g_ : float
    density_ : float
    class_specific_filters_ : list of Tensor
        ``C`` int64 tensors: :meth:`class_filters` of each class with the default rule.
    std_accuracy_, csg_accuracy_ : float
        On the fitting data.
    model_accuracy_ : float or None
        The original model's accuracy on the fitting data.
    head_from_model_ : bool
        Whether the head started from the model's own classifier.
    history_ : list of dict
        Per epoch: ``epoch``, ``path`` ("std" / "csg"), ``loss``, ``ce_std``, ``ce_csg``,
        ``penalty``, ``density``, ``std_accuracy`` (running, on the batches).
    """

    def __init__(
        self,
        layer: LayerSpec | None = None,
        recipe: str = "frozen",
        finetune: Sequence[LayerSpec] | None = None,
        *,
        objective: str = "paper",
        lambda1: float = 1.0,
        lambda2: float = 1e-3,
        g: float | None = None,
        num_classes: int | None = None,
        epochs: int = 60,
        warmup: int = 3,
        csg_every: int = 3,
        csg_ratio: int = 1,
        batch_size: int = 64,
        lr: float = 1e-3,
        lr_gates: float = 1e-2,
        lr_backbone: float = 1e-4,
        lr_milestones: Sequence[float] = (),
        lr_gamma: float = 0.1,
        init: float = 0.5,
        head_init: str = "auto",
        mi_estimator: str = "binned",
        mi_bins: int = 16,
        random_state: int = 0,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.layer = layer
        self.recipe = recipe
        self.finetune = finetune
        self.objective = objective
        self.lambda1 = lambda1
        self.lambda2 = lambda2
        self.g = g
        self.num_classes = num_classes
        self.epochs = epochs
        self.warmup = warmup
        self.csg_every = csg_every
        self.csg_ratio = csg_ratio
        self.batch_size = batch_size
        self.lr = lr
        self.lr_gates = lr_gates
        self.lr_backbone = lr_backbone
        self.lr_milestones = lr_milestones
        self.lr_gamma = lr_gamma
        self.init = init
        self.head_init = head_init
        self.mi_estimator = mi_estimator
        self.mi_bins = mi_bins
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ---------------------------------------------------------------- parameters
    _PARAM_KEYS = (
        "layer",
        "recipe",
        "finetune",
        "objective",
        "lambda1",
        "lambda2",
        "g",
        "num_classes",
        "epochs",
        "warmup",
        "csg_every",
        "csg_ratio",
        "batch_size",
        "lr",
        "lr_gates",
        "lr_backbone",
        "lr_milestones",
        "lr_gamma",
        "init",
        "head_init",
        "mi_estimator",
        "mi_bins",
        "random_state",
        "device",
        "verbose",
    )

    def _saved_params(self) -> dict[str, Any]:
        """Hyperparameters as given to ``__init__``."""
        return {k: getattr(self, k) for k in self._PARAM_KEYS}

    def _validate_params(self) -> None:
        def positive_int(name: str, lo: int = 1) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InputError(f"{name} must be an int >= {lo}, got {v!r}")
            return v

        def positive(name: str, zero_ok: bool = False) -> None:
            v = getattr(self, name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (v == 0 and not zero_ok):
                what = ">= 0" if zero_ok else "> 0"
                raise InputError(f"{name} must be a finite number {what}, got {v!r}")

        for name, options in (
            ("recipe", RECIPES),
            ("objective", OBJECTIVES),
            ("head_init", HEAD_INITS),
            ("mi_estimator", MI_ESTIMATORS),
        ):
            if getattr(self, name) not in options:
                raise InputError(f"{name} must be one of {options}, got {getattr(self, name)!r}")
        epochs = positive_int("epochs")
        warmup = positive_int("warmup", 0)
        every = positive_int("csg_every")
        ratio = positive_int("csg_ratio")
        positive_int("batch_size")
        positive_int("mi_bins", 2)
        if ratio > every:
            raise InputError(
                f"csg_ratio (CSG epochs per cycle) must be <= csg_every = {every}, got {ratio}"
            )
        if warmup >= epochs:
            raise InputError(
                f"with epochs={epochs} and warmup={warmup} no CSG epoch would run; raise "
                "epochs or lower warmup"
            )
        for name in ("lr", "lr_gates", "lr_backbone"):
            positive(name)
        for name in ("lambda1", "lambda2"):
            positive(name, zero_ok=True)
        if not (isinstance(self.init, int | float) and 0 < self.init <= 1):
            raise InputError(f"init must lie in (0, 1], got {self.init!r}")
        if not (isinstance(self.lr_gamma, int | float) and 0 < self.lr_gamma <= 1):
            raise InputError(f"lr_gamma must lie in (0, 1], got {self.lr_gamma!r}")
        if any(not 0 <= float(m) <= 1 for m in self.lr_milestones):
            raise InputError(
                f"lr_milestones are fractions of epochs in [0, 1], got {list(self.lr_milestones)}"
            )
        if self.recipe == "frozen" and self.finetune:
            raise InputError(
                "finetune= names blocks to train, which only recipe='finetune' does; "
                "drop finetune= or set recipe='finetune'"
            )
        if self.num_classes is not None:
            positive_int("num_classes", 2)
        if self.g is not None:
            positive("g")

    def _is_csg_epoch(self, epoch: int) -> bool:
        if epoch < self.warmup:
            return False
        return (epoch - self.warmup) % self.csg_every < self.csg_ratio

    def _lr_factor(self, epoch: int) -> float:
        passed = sum(epoch >= int(round(float(m) * self.epochs)) for m in self.lr_milestones)
        return float(self.lr_gamma) ** passed

    # ---------------------------------------------------------------- fitting
    @keeps_global_rng
    def fit(self, model: nn.Module, data: Any, labels: Any = None) -> ClassSpecificGates:
        """Learn the gates (and the new head, and fine-tuned blocks) on labelled images.

        Parameters
        ----------
        model : nn.Module
            The pretrained network. It is left exactly as it was (parameters, buffers,
            modes, ``requires_grad`` and hooks), also when ``fit`` raises.
        data : tensors, Dataset or iterable
            ``(images, labels)`` tensors (``N x C x H x W``, ``N``), images with
            ``labels=``, a Dataset of ``(image, label, ...)`` samples, or an iterable of
            ``(images, labels, ...)`` batches (e.g. a DataLoader; one that can be iterated
            again each epoch for ``recipe="finetune"``). Images are preprocessed as the
            model expects.
        labels : Tensor, optional
            ``N`` labels when ``data`` is an image tensor.

        Returns
        -------
        ClassSpecificGates
            ``self``.

        Raises
        ------
        InputError
            Bad hyperparameters, a layer without channels, infeasible ``g`` (``< K``),
            labels outside ``[0, C)``, a ``num_classes`` that disagrees with a model head
            required by ``head_init="model"``, or fine-tuned blocks after the gated layer.
        LayerNotFoundError
            Unknown layer or fine-tune block names.
        """
        self._validate_params()
        door = data_fit(model, data, arg="data").images
        model = getattr(model, "model", model)  # a LoadedModel normalised raw data at the door
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        source = _Source(data, labels, self.batch_size)
        source.door = door
        if self.recipe == "finetune" and not source.reiterable:
            raise InputError(
                "recipe='finetune' goes over the data once per epoch; pass tensors, a Dataset "
                "or a DataLoader, not a one-shot iterator"
            )
        layer = self._resolve_layer(model)
        device = torch.device(self.device) if self.device is not None else model_device(model)
        gen = torch.Generator().manual_seed(int(self.random_state))

        first = next(iter(source.batches()), None)
        if first is None:
            raise InputError("the data is empty: no batch was produced")
        k, n_out = _num_logits(model, layer, first[0])
        c = self._num_classes(n_out)
        g = default_g(c, k) if self.g is None else float(self.g)
        if g < k:
            raise InputError(
                f"g = {g:g} is below its feasible minimum K = {k}: every filter's column has "
                f"maximum 1, so ‖G‖₁ >= K; pass g >= {k} (e.g. g = 0.2·C·K = {0.2 * c * k:g} "
                f"for C >= 5, or leave g=None for {default_g(c, k):g})"
            )

        with model_guard(model):
            if self.recipe == "frozen":
                network, modules = model, []
                net_params: list[nn.Parameter] = []
            else:
                modules = self._finetune_modules(model, layer, first[0])
                network = copy.deepcopy(model).to(device)
                network.eval()
                for p in network.parameters():
                    p.requires_grad_(False)
                net_params = []
                for name in modules:
                    for p in network.get_submodule(name).parameters():
                        if not p.requires_grad:
                            p.requires_grad_(True)
                            net_params.append(p)

            head, from_model = self._make_head(model, layer, first, k, c, device, gen)
            gates = nn.Parameter(torch.full((c, k), float(self.init), device=device))
            opt_head = torch.optim.Adam(head.parameters(), lr=self.lr)
            opt_gates = torch.optim.Adam([gates], lr=self.lr_gates)
            opt_net = torch.optim.Adam(net_params, lr=self.lr_backbone) if net_params else None
            history: list[dict[str, float | str | int]] = []

            if self.recipe == "frozen":
                ext = _extract(model, layer, source, device)
                _check_label_range(ext.labels, c)
                self._train_frozen(ext, head, gates, g, opt_head, opt_gates, gen, history)
            else:
                self._train_finetune(
                    network,
                    layer,
                    source,
                    head,
                    gates,
                    g,
                    c,
                    (opt_head, opt_gates, opt_net),
                    device,
                    gen,
                    history,
                )
                network.eval()
                for p in network.parameters():
                    p.requires_grad_(False)
                ext = _extract(network, layer, source, device)
                if n_out == c:
                    base = _extract(model, layer, source, device)
                    ext.model_pred = base.model_pred
                else:
                    ext.model_pred = None

        self.layer_ = layer
        self.network_ = network
        self.finetune_ = list(modules)
        self.n_classes_ = c
        self.n_filters_ = k
        self.g_ = g
        self.device_ = device
        self.head_ = head.eval()
        for p in self.head_.parameters():
            p.requires_grad_(False)
        self.gates_ = gates.detach().cpu().clone()
        self.head_from_model_ = from_model
        self.history_ = history
        self._set_summaries(ext, n_out)
        return self

    def _resolve_layer(self, model: nn.Module) -> str:
        if self.layer is None:
            st = stages(model)
            if not st:
                raise LayerNotFoundError(
                    f"could not find the stages of {type(model).__name__}; pass layer= "
                    "the conv layer to gate"
                )
            return resolve_layer(model, st[-1].name)[0]
        return resolve_layer(model, self.layer)[0]

    def _num_classes(self, n_out: int) -> int:
        if self.num_classes is not None:
            return int(self.num_classes)
        if n_out < 2:
            raise InputError(
                f"the model's output is not N x C logits (got {n_out} outputs); pass num_classes="
            )
        return n_out

    def _finetune_modules(self, model: nn.Module, layer: str, x: torch.Tensor) -> list[str]:
        """Resolve and check the blocks to fine-tune (they must feed the gated layer)."""
        modules = dict(model.named_modules())
        order: list[str] = []  # names in the order their forward calls complete
        handles = [
            m.register_forward_hook(lambda *_a, _n=name: order.append(_n))
            for name, m in modules.items()
            if name
        ]
        try:
            with torch.no_grad():
                model(x[:2].to(model_device(model)))
        finally:
            for h in handles:
                h.remove()
        if layer not in order:
            raise InputError(f"the gated layer {layer!r} did not run in a forward pass")
        t_layer = order.index(layer)

        def feeds(name: str) -> bool:
            contains = layer == name or layer.startswith(name + ".")
            return name in order and (order.index(name) <= t_layer or contains)

        def trainable(name: str) -> bool:
            return any(p.numel() for p in modules[name].parameters())

        if not self.finetune:
            # the gated module itself when it has parameters (a ResNet's "layer4"); else the
            # last module holding a convolution before it, and the modules with parameters
            # between the two (the conv, its BatchNorm, ... before a pooling layer)
            if trainable(layer):
                return [layer]
            before = list(dict.fromkeys(order[:t_layer]))
            convs = [
                i
                for i, n in enumerate(before)
                if any(isinstance(m, nn.Conv2d) for m in modules[n].modules())
            ]
            if not convs:
                raise InputError(
                    f"no convolution runs before the gated layer {layer!r}; pass finetune= "
                    "the blocks to train"
                )
            first = before[convs[-1]]
            rest = [
                n for n in before[convs[-1] + 1 :] if trainable(n) and not n.startswith(first + ".")
            ]
            return [first, *rest]
        names = [resolve_layer(model, s)[0] for s in self.finetune]
        for name in names:
            if not trainable(name):
                raise InputError(f"fine-tune block {name!r} has no parameters to train")
            if not feeds(name):
                raise InputError(
                    f"fine-tune block {name!r} runs after the gated layer {layer!r} (or not at "
                    "all), so it cannot change what the gates see; name blocks up to the gated "
                    "layer"
                )
        return list(dict.fromkeys(names))

    def _make_head(
        self,
        model: nn.Module,
        layer: str,
        first: tuple[torch.Tensor, torch.Tensor],
        k: int,
        c: int,
        device: torch.device,
        gen: torch.Generator,
    ) -> tuple[nn.Linear, bool]:
        head = nn.Linear(k, c).to(device)
        bound = 1.0 / math.sqrt(k)
        with torch.no_grad():
            head.weight.copy_(torch.empty(c, k).uniform_(-bound, bound, generator=gen))
            head.bias.copy_(torch.empty(c).uniform_(-bound, bound, generator=gen))
        if self.head_init == "random":
            return head, False
        src = self._model_classifier(model, layer, first[0], k, c)
        if src is None:
            if self.head_init == "model":
                raise InputError(
                    f"head_init='model' needs the model to end in global-average-pool → "
                    f"linear ({k} → {c}) on layer {layer!r}; it does not (or num_classes "
                    "differs from its outputs); use head_init='auto' or 'random'"
                )
            return head, False
        with torch.no_grad():
            head.weight.copy_(src.weight.to(device))
            head.bias.copy_(src.bias.to(device) if src.bias is not None else 0.0)
        return head, True

    @staticmethod
    def _model_classifier(
        model: nn.Module, layer: str, x: torch.Tensor, k: int, c: int
    ) -> nn.Linear | None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None
        lin = linears[-1]
        if lin.in_features != k or lin.out_features != c:
            return None
        with record(model, layer) as rec, torch.no_grad():
            logits = _first_tensor(model(x.to(model_device(model))))
            a = rec.activations[layer]
            ours = F.linear(a.mean((2, 3)), lin.weight, lin.bias)
        if ours.shape != logits.shape:
            return None
        scale = float(logits.abs().max().clamp_min(1.0))
        if not torch.allclose(ours, logits, rtol=1e-4, atol=1e-4 * scale):
            return None
        return lin

    def _step(
        self,
        f: torch.Tensor,
        y: torch.Tensor,
        csg: bool,
        head: nn.Linear,
        gates: nn.Parameter,
        g: float,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer, Any],
    ) -> dict[str, float]:
        """One step on pooled features ``f`` (``B x K``) with labels ``y``
        (:doc:`/methods/gates`)."""
        opt_head, opt_gates, opt_net = optimizers
        logits = head(f)
        ce_std = F.cross_entropy(logits, y)
        out = {"ce_std": float(ce_std.detach()), "ce_csg": float("nan"), "penalty": float("nan")}
        if csg:
            ce_csg = F.cross_entropy(head(f * gates[y]), y)
            pen = sparsity_penalty(gates, g)
            main = ce_std + self.lambda1 * ce_csg if self.objective == "paper" else ce_csg
            loss = main + self.lambda2 * pen
            out.update(ce_csg=float(ce_csg.detach()), penalty=float(pen.detach()))
        else:
            loss = ce_std
        opt_head.zero_grad(set_to_none=True)
        opt_gates.zero_grad(set_to_none=True)
        if opt_net is not None:
            opt_net.zero_grad(set_to_none=True)
        loss.backward()
        opt_head.step()
        if opt_net is not None:
            opt_net.step()
        if csg:
            opt_gates.step()
            with torch.no_grad():
                gates.copy_(project_gates(gates))
        out["loss"] = float(loss.detach())
        out["correct"] = float((logits.detach().argmax(1) == y).sum())
        return out

    def _set_lr(self, epoch: int, optimizers: Sequence[Any]) -> None:
        factor = self._lr_factor(epoch)
        bases = (self.lr, self.lr_gates, self.lr_backbone)
        for opt, base in zip(optimizers, bases):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * factor

    def _log(self, history: list, epoch: int, csg: bool, stats: list, n: int, gates) -> None:
        mean = {
            key: float(np.mean([s[key] for s in stats])) if stats else float("nan")
            for key in ("loss", "ce_std", "ce_csg", "penalty")
        }
        row = {
            "epoch": epoch,
            "path": "csg" if csg else "std",
            **mean,
            "density": l1_density(gates),
            "std_accuracy": sum(s["correct"] for s in stats) / max(n, 1),
        }
        history.append(row)
        if self.verbose:
            print(
                f"epoch {epoch:3d} {row['path']}: loss {row['loss']:.4f} "
                f"acc {row['std_accuracy']:.4f} density {row['density']:.4f}"
            )

    def _train_frozen(self, ext, head, gates, g, opt_head, opt_gates, gen, history) -> None:
        feats, y = ext.features, ext.labels
        n = feats.shape[0]
        optimizers = (opt_head, opt_gates, None)
        head.train()
        for epoch in range(self.epochs):
            self._set_lr(epoch, optimizers)
            csg = self._is_csg_epoch(epoch)
            order = torch.randperm(n, generator=gen).to(feats.device)
            stats = []
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                stats.append(self._step(feats[idx], y[idx], csg, head, gates, g, optimizers))
            self._log(history, epoch, csg, stats, n, gates)

    def _train_finetune(
        self, network, layer, source, head, gates, g, c, optimizers, device, gen, history
    ) -> None:
        head.train()
        with record(network, layer, detach=False, eval_mode=False) as rec:
            for epoch in range(self.epochs):
                self._set_lr(epoch, optimizers)
                csg = self._is_csg_epoch(epoch)
                stats, n = [], 0
                for x, y in source.batches(shuffle=True, generator=gen):
                    y = y.to(device)
                    _check_label_range(y, c)
                    network(x.to(device))
                    f = rec.activations[layer].float().mean((2, 3))
                    rec.clear()
                    stats.append(self._step(f, y, csg, head, gates, g, optimizers))
                    n += int(y.shape[0])
                self._log(history, epoch, csg, stats, n, gates)

    def _set_summaries(self, ext: _Extracted, n_out: int) -> None:
        with torch.no_grad():
            pred = self.head_(ext.features).argmax(1)
            gated = self.head_(ext.features * self.gates_.to(ext.features.device)[ext.labels])
        self.std_accuracy_ = float((pred == ext.labels).float().mean())
        self.csg_accuracy_ = float((gated.argmax(1) == ext.labels).float().mean())
        self.model_accuracy_ = (
            float((ext.model_pred == ext.labels).float().mean())
            if ext.model_pred is not None and n_out == self.n_classes_
            else None
        )
        self.density_ = l1_density(self.gates_)
        self.class_specific_filters_ = [self.class_filters(c) for c in range(self.n_classes_)]

    # ---------------------------------------------------------------- results
    def _check_fitted(self, need_network: bool = False) -> None:
        if not hasattr(self, "gates_"):
            raise NotFittedError(
                "this ClassSpecificGates is not fitted yet; call fit(model, data) first"
            )
        if need_network and getattr(self, "network_", None) is None:
            raise InputError(
                "these gates were loaded without a network; load them with "
                "ClassSpecificGates.load(path, model=...) to compute features"
            )

    def _check_class(self, c: int) -> int:
        if isinstance(c, bool) or not isinstance(c, int | np.integer):
            raise InputError(f"class index must be an int, got {type(c).__name__}")
        if not 0 <= int(c) < self.n_classes_:
            raise InputError(f"class index must lie in [0, {self.n_classes_}), got {c}")
        return int(c)

    def class_filters(self, c: int, threshold: float = 0.5, others: float = 0.2) -> torch.Tensor:
        """Filters specific to class ``c``, by decreasing gate, then most exclusive first.

        Rule (module docstring): ``G[c, k] > threshold``, ``G[c', k] <= threshold`` for
        every other class ``c'``, and ``mean_{c' ≠ c} G[c', k] <= others``.

        Parameters
        ----------
        c : int
            Class index.
        threshold : float
            A gate above it opens the filter for the class.
        others : float
            Largest mean gate of the other classes.

        Returns
        -------
        Tensor
            int64 filter indices.
        """
        self._check_fitted()
        c = self._check_class(c)
        return _class_filters(self.gates_, c, threshold, others)

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled activations of the gated layer (ungated), ``N x C x H x W`` → ``N x K``."""
        self._check_fitted(need_network=True)
        images = _check_images(images)
        ext = _extract(
            self.network_,
            self.layer_,
            _Source(images, torch.zeros(len(images), dtype=torch.long), self.batch_size),
            self.device_,
        )
        return ext.features

    def decision_function(
        self, images: torch.Tensor, gate_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits of the new head: the STD path, or the CSG path gated by ``gate_labels``.

        Parameters
        ----------
        images : Tensor
            ``N x C x H x W``, preprocessed as the model expects.
        gate_labels : Tensor, optional
            ``N`` classes whose gate rows multiply the channels (CSG path).

        Returns
        -------
        Tensor
            ``N x C`` logits.
        """
        f = self.transform(images)
        with torch.no_grad():
            if gate_labels is None:
                return self.head_(f)
            y = torch.as_tensor(gate_labels).reshape(-1).long().to(f.device)
            if y.shape[0] != f.shape[0]:
                raise InputError(f"gate_labels must have N = {f.shape[0]} entries")
            _check_label_range(y, self.n_classes_)
            return self.head_(f * self.gates_.to(f.device)[y])

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """STD-path predictions ``N`` (int64) of the new head (the only test-time path)."""
        return self.decision_function(images).argmax(1)

    def evaluate(self, data: Any, labels: Any = None) -> GateScores:
        """Accuracies, density, mutual information and similarities on a dataset
        (:doc:`/methods/gates`).

        Parameters
        ----------
        data, labels
            As in :meth:`fit`.

        Returns
        -------
        GateScores
        """
        self._check_fitted(need_network=True)
        source = _Source(data, labels, self.batch_size)
        ext = _extract(self.network_, self.layer_, source, self.device_)
        _check_label_range(ext.labels, self.n_classes_)
        model_pred = ext.model_pred
        if self.finetune_ or ext.n_logits != self.n_classes_:
            # the fine-tuned copy's own classifier is not the user's model
            model_pred = None
        with torch.no_grad():
            pred = self.head_(ext.features).argmax(1)
            gated = self.head_(ext.features * self.gates_.to(ext.features.device)[ext.labels])
        y = ext.labels
        s_tp, s_fn = gate_similarity(ext.features, y, pred, self.gates_)
        return GateScores(
            n_samples=int(y.shape[0]),
            std_accuracy=float((pred == y).float().mean()),
            csg_accuracy=float((gated.argmax(1) == y).float().mean()),
            model_accuracy=(
                float((model_pred == y).float().mean()) if model_pred is not None else None
            ),
            density=l1_density(self.gates_),
            density_bounds=density_bounds(self.n_classes_, self.n_filters_, self.g_),
            mutual_information=mutual_information_score(
                ext.features,
                y,
                self.n_classes_,
                bins=self.mi_bins,
                estimator=self.mi_estimator,
                random_state=self.random_state,
            ).mean,
            s_tp=s_tp,
            s_fn=s_fn,
        )

    def score(self, data: Any, labels: Any = None) -> float:
        """STD-path accuracy on a dataset (scikit-learn's ``score``)."""
        self._check_fitted(need_network=True)
        ext = _extract(
            self.network_, self.layer_, _Source(data, labels, self.batch_size), self.device_
        )
        _check_label_range(ext.labels, self.n_classes_)
        with torch.no_grad():
            return float((self.head_(ext.features).argmax(1) == ext.labels).float().mean())

    def filter_maps(
        self, images: torch.Tensor, filters: Sequence[int] | torch.Tensor
    ) -> torch.Tensor:
        """ActivMaps (Liang et al. 2020 App. G) of some filters: activations upsampled bilinearly.

        Parameters
        ----------
        images : Tensor
            ``N x C x H x W``.
        filters : sequence of int
            ``F`` filter indices.

        Returns
        -------
        Tensor
            ``N x F x H x W`` float32 (not thresholded), on the CPU.
        """
        self._check_fitted(need_network=True)
        images = _check_images(images)
        idx = torch.as_tensor(list(filters) if not isinstance(filters, torch.Tensor) else filters)
        idx = idx.long().reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.n_filters_):
            raise InputError(f"filter indices must lie in [0, {self.n_filters_})")
        acts = _layer_maps(self.network_, self.layer_, images, self.batch_size)
        return F.interpolate(
            acts[:, idx], size=images.shape[-2:], mode="bilinear", align_corners=False
        )

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (gates, head, fine-tuned blocks) and ``<path>.json``.

        Both files are written atomically. The frozen backbone is not saved: pass the same
        model to :meth:`load`.
        """
        self._check_fitted(need_network=bool(self.finetune_))
        path = os.fspath(path)
        params = self._saved_params()
        params["layer"] = self.layer_
        params["finetune"] = list(self.finetune_) or None
        params["device"] = None
        params["lr_milestones"] = [float(m) for m in self.lr_milestones]
        meta = {
            "type": "ClassSpecificGates",
            "params": params,
            "layer_": self.layer_,
            "finetune_": self.finetune_,
            "n_classes_": self.n_classes_,
            "n_filters_": self.n_filters_,
            "g_": self.g_,
            "std_accuracy_": self.std_accuracy_,
            "csg_accuracy_": self.csg_accuracy_,
            "model_accuracy_": self.model_accuracy_,
            "head_from_model_": self.head_from_model_,
            "history_": self.history_,
        }
        tensors = {
            "gates": self.gates_.contiguous(),
            "head.weight": self.head_.weight.detach().cpu().contiguous(),
            "head.bias": self.head_.bias.detach().cpu().contiguous(),
        }
        if self.finetune_:
            state = self.network_.state_dict()
            for key, value in state.items():
                if any(key.startswith(m + ".") for m in self.finetune_):
                    tensors["network." + key] = value.detach().cpu().contiguous()
        save_estimator_files(path, tensors, meta)

    @classmethod
    @checked_load("the gates")
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module | None = None,
        device: str | torch.device | None = None,
    ) -> ClassSpecificGates:
        """Read gates written by :meth:`save`.

        Parameters
        ----------
        path : path without extension
        model : nn.Module, optional
            The network the gates were fitted on; needed for everything that computes
            features. For the fine-tune recipe a deep copy receives the saved blocks (the
            model itself is not modified).
        device : optional
            Where to put the head (and the fine-tuned copy); default the model's device.

        Returns
        -------
        ClassSpecificGates
        """
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "ClassSpecificGates", "the gates")
        self = loaded_params(cls, meta["params"], path, "the gates")
        c, k = int(meta["n_classes_"]), int(meta["n_filters_"])
        gates = tensors.get("gates")
        if gates is None or tuple(gates.shape) != (c, k):
            raise AssetError(f"{path}.safetensors holds no C x K = {c} x {k} gate matrix")
        if model is not None:
            dev = torch.device(device) if device is not None else model_device(model)
        else:
            dev = torch.device(device or "cpu")
        head = nn.Linear(k, c)
        try:
            head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        except (KeyError, RuntimeError) as exc:
            raise AssetError(f"{path}.safetensors has no matching head: {exc}") from exc
        network = None
        if model is not None:
            layer = meta["layer_"]
            if layer not in dict(model.named_modules()):
                raise InputError(
                    f"the gates were fitted on layer {layer!r}, which this model lacks; pass "
                    "the model they were fitted on"
                )
            network = model
            if meta["finetune_"]:
                network = copy.deepcopy(model).to(dev).eval()
                state = {
                    key[len("network.") :]: v
                    for key, v in tensors.items()
                    if key.startswith("network.")
                }
                try:
                    missing = network.load_state_dict(state, strict=False)
                except RuntimeError as exc:
                    raise AssetError(
                        f"the saved fine-tuned blocks do not fit this model: {exc}"
                    ) from exc
                if missing.unexpected_keys:
                    raise AssetError(
                        f"the saved fine-tuned blocks do not fit this model: unexpected "
                        f"{missing.unexpected_keys[:5]}"
                    )
                for p in network.parameters():
                    p.requires_grad_(False)
        self.layer_ = meta["layer_"]
        self.finetune_ = list(meta["finetune_"])
        self.n_classes_, self.n_filters_ = c, k
        self.g_ = float(meta["g_"])
        self.device_ = dev
        self.network_ = network
        self.head_ = head.to(dev).eval()
        for p in self.head_.parameters():
            p.requires_grad_(False)
        self.gates_ = gates.float().clone()
        self.std_accuracy_ = meta["std_accuracy_"]
        self.csg_accuracy_ = meta["csg_accuracy_"]
        self.model_accuracy_ = meta["model_accuracy_"]
        self.head_from_model_ = meta["head_from_model_"]
        self.history_ = meta["history_"]
        self.density_ = l1_density(self.gates_)
        self.class_specific_filters_ = [self.class_filters(i) for i in range(c)]
        return self


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


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputError(
            f"images must be an N x C x H x W tensor, got {getattr(images, 'shape', type(images))}"
        )
    return images


def _layer_maps(
    network: nn.Module, layer: str, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Low-resolution activation maps ``N x K x h x w`` of ``layer`` (float32, CPU)."""
    out = []
    dev = model_device(network)
    with record(network, layer) as rec, torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            network(images[i : i + batch_size].to(dev))
            a = rec.activations[layer]
            _check_conv(layer, a)
            out.append(a.float().cpu())
            rec.clear()
    return torch.cat(out)
