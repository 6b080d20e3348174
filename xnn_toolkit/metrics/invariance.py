"""Post-hoc invariance and disentanglement scores (:doc:`/methods/invariance`, Robert 2019).

- Class-conditional entropy of unit ``i`` (SHADE, Robert 2019 §2.3, eqs. 2.15–2.21) under the
  Gaussian bound: ``H(H_i | Y) ≈ Σ_y p(y) ½ log(2πe Var(H_i | Y = y))``, reported with
  ``Var(H_i)`` and the scale-free ratio ``E_y Var(H_i | Y = y) / Var(H_i)`` (the share of the
  unit's variance left within classes) (:func:`class_conditional_entropy`).
- Per-layer split ``H(H) = I(H; Y) + H(H | Y)`` with a binned plug-in estimator, unit by unit
  (every term ≥ 0); layer totals are sums over units, the unit-wise upper bound of Robert 2019
  eq. A.3 (:func:`entropy_split`).
- SHADE surrogate (eq. 2.20) with the binary latent ``p(Z = 1 | h) = sigmoid(h)``:
  ``Σ_z p(z) Var(H | Z = z) = 1/K Σ_k Σ_z p(z | h_k) (h_k − μ^z)²`` with
  ``μ^z = Σ_k p(z | h_k) h_k / Σ_k p(z | h_k)`` taken over the whole data (the thesis's moving
  averages are a training-time device) (:func:`shade_surrogate`).
- Binarised-activation test (App. A.2.2): replace a layer's activation by
  ``BinAct(h) = 0 if h ≤ 0 else the unit's mean positive activation`` and measure the accuracy
  change (post hoc: the layers above are not fine-tuned, unlike the thesis's Table A.1)
  (:func:`binarized_activation_test`).
- Decodability probes (DualDis, §4.5.2): accuracy of linear probes within two subspaces for
  their own labels, error of non-linear probes across, their mean, and the label-prior
  ceilings of the errors (:func:`decodability_probes`).

Activations are ``N x D`` (one unit per column); ``N x C x H x W`` maps are flattened so that
every neuron is a unit (pass pooled ``N x C`` activations for per-channel scores). Statistics
are accumulated in float64 with pairwise (Chan et al.) merges, so every score streams.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..hooks import intervene, record
from ..layers import LayerSpec
from ._binning import _bin_index, _entropy_split, _equal_width_edges, _joint_counts
from ._inputs import _as_labels, _as_maps, _as_tensor

__all__ = [
    "BinarizationResult",
    "ClassConditionalAccumulator",
    "EntropySplit",
    "EntropySplitAccumulator",
    "ProbeReport",
    "ShadeAccumulator",
    "UnitInvariance",
    "binarized_activation_test",
    "class_conditional_entropy",
    "decodability_probes",
    "entropy_split",
    "shade_surrogate",
]


def _units(h: torch.Tensor, name: str = "activations") -> torch.Tensor:
    a = _as_maps(h, name, ndims=(2, 3, 4, 5), expected="N x D or N x C x H x W")
    return a.reshape(a.shape[0], -1)


def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Pairwise merge of (count, mean, sum of squared deviations); counts may be 0."""
    n = n_a + n_b
    safe = torch.where(n > 0, n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, mean, m2


@dataclass
class UnitInvariance:
    """Class-conditional statistics of ``D`` units.

    Attributes
    ----------
    conditional_entropy : Tensor
        ``D`` Gaussian-bound ``H(H_i | Y)`` in nats.
    variance : Tensor
        ``D`` ``Var(H_i)`` over all samples (population variance).
    variance_ratio : Tensor
        ``D`` ``E_y Var(H_i | Y = y) / Var(H_i)`` in [0, 1]; 1 for a constant unit.
    class_counts : Tensor
        ``C`` samples per class (classes without samples have ``p(y) = 0``).
    """

    conditional_entropy: torch.Tensor
    variance: torch.Tensor
    variance_ratio: torch.Tensor
    class_counts: torch.Tensor


class ClassConditionalAccumulator:
    """Per-class means and variances of ``D`` units over batches.

    Parameters
    ----------
    num_classes : int
        ``C``.
    eps : float
        Floor of a within-class variance inside the log (a class with one sample, or a unit
        constant within a class, would give ``log 0``).
    """

    def __init__(self, num_classes: int, eps: float = 1e-12) -> None:
        self.num_classes = num_classes
        self.eps = eps
        self.count_: torch.Tensor | None = None
        self.mean_: torch.Tensor | None = None
        self.m2_: torch.Tensor | None = None

    def update(
        self, activations: torch.Tensor, labels: torch.Tensor
    ) -> ClassConditionalAccumulator:
        """Add ``N x D`` activations (or ``N x C x H x W``) with ``N`` labels; returns ``self``."""
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {self.num_classes!r}")
        h = _units(activations).double()
        y = _as_labels(labels, h.shape[0]).to(h.device)
        c = self.num_classes
        if y.numel() and int(y.max()) >= c:
            raise InputError(f"labels must be < num_classes = {c}")
        d = h.shape[1]
        if self.mean_ is not None and self.mean_.shape[1] != d:
            raise InputError(
                f"activations have {d} units but earlier batches had {self.mean_.shape[1]}"
            )
        n_b = torch.zeros(c, dtype=torch.float64, device=h.device).index_add_(
            0, y, torch.ones_like(y, dtype=torch.float64)
        )
        s_b = torch.zeros(c, d, dtype=torch.float64, device=h.device).index_add_(0, y, h)
        mean_b = s_b / torch.where(n_b > 0, n_b, 1)[:, None]
        dev = h - mean_b[y]
        m2_b = torch.zeros_like(s_b).index_add_(0, y, dev * dev)
        if self.mean_ is None:
            self.count_, self.mean_, self.m2_ = n_b, mean_b, m2_b
        else:
            self.count_, self.mean_, self.m2_ = _merge(
                self.count_[:, None],
                self.mean_,
                self.m2_,
                n_b[:, None].to(self.mean_.device),
                mean_b.to(self.mean_.device),
                m2_b.to(self.mean_.device),
            )
            self.count_ = self.count_[:, 0]
        return self

    def result(self) -> UnitInvariance:
        """Conditional entropies, variances and variance ratios of the units."""
        if self.count_ is None or float(self.count_.sum()) == 0:
            raise InputError("no activations were added; call update() first")
        n_c = self.count_
        total = n_c.sum()
        p = n_c / total  # C
        safe = torch.where(n_c > 0, n_c, 1)[:, None]
        var_c = self.m2_ / safe  # C x D
        log_term = 0.5 * torch.log(2 * math.pi * math.e * var_c.clamp_min(self.eps))
        cond_h = (torch.where(n_c[:, None] > 0, log_term, 0) * p[:, None]).sum(0)
        mean = (self.mean_ * n_c[:, None]).sum(0) / total
        m2 = self.m2_.sum(0) + (n_c[:, None] * (self.mean_ - mean) ** 2).sum(0)
        var = m2 / total
        within = (p[:, None] * var_c).sum(0)
        scale = var.abs().max().clamp_min(1e-300)
        constant = var <= scale * 1e-12
        ratio = torch.where(constant, 1.0, within / torch.where(constant, 1.0, var)).clamp(0, 1)
        return UnitInvariance(cond_h, var, ratio, n_c.long())


def class_conditional_entropy(
    activations: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None
) -> UnitInvariance:
    """Gaussian-bound class-conditional entropy of each unit (:doc:`/methods/invariance`, Robert
    2019 eq. 2.19).

    Parameters
    ----------
    activations : Tensor
        ``N x D`` (pre-activation values by default in :doc:`/methods/invariance`; the caller
        chooses the
        layer), or ``N x C x H x W`` (every neuron a unit).
    labels : Tensor
        ``N`` class indices.
    num_classes : int, optional
        ``C``; default ``labels.max() + 1``.

    Returns
    -------
    UnitInvariance
    """
    h = _units(activations)
    y = _as_labels(labels, h.shape[0])
    c = int(y.max()) + 1 if num_classes is None and y.numel() else num_classes or 1
    return ClassConditionalAccumulator(c).update(h, y).result()


@dataclass
class EntropySplit:
    """Binned ``H(H) = I(H; Y) + H(H | Y)`` per unit and per layer (nats).

    Attributes
    ----------
    entropy, mutual_information, conditional_entropy : Tensor
        ``D`` per-unit terms, each ≥ 0.
    layer_entropy, layer_mutual_information, layer_conditional_entropy : float
        Sums over the layer's units (the unit-wise bound of Robert 2019 eq. A.3).
    """

    entropy: torch.Tensor
    mutual_information: torch.Tensor
    conditional_entropy: torch.Tensor
    layer_entropy: float
    layer_mutual_information: float
    layer_conditional_entropy: float


class EntropySplitAccumulator:
    """Joint (bin, class) counts of ``D`` units over batches, with fixed bin edges.

    Parameters
    ----------
    edges : Tensor
        ``D x (B + 1)`` increasing bin edges per unit (e.g. equal-width edges over a first
        batch or a known range); values outside fall into the end bins.
    num_classes : int
        ``C``.
    """

    def __init__(self, edges: torch.Tensor, num_classes: int) -> None:
        self.edges = edges
        self.num_classes = num_classes
        self.counts_: torch.Tensor | None = None

    def update(self, activations: torch.Tensor, labels: torch.Tensor) -> EntropySplitAccumulator:
        """Add ``N x D`` activations with ``N`` labels; returns ``self``."""
        h = _units(activations)
        edges = _as_tensor(self.edges, "edges").double().to(h.device)
        if edges.dim() != 2 or edges.shape[0] != h.shape[1] or edges.shape[1] < 2:
            raise InputError(
                f"edges must be D x (B + 1) with D = {h.shape[1]}, got {tuple(edges.shape)}"
            )
        y = _as_labels(labels, h.shape[0]).to(h.device)
        if y.numel() and int(y.max()) >= self.num_classes:
            raise InputError(f"labels must be < num_classes = {self.num_classes}")
        bins = edges.shape[1] - 1
        counts = _joint_counts(_bin_index(h, edges), y, bins, self.num_classes)
        self.counts_ = (
            counts if self.counts_ is None else self.counts_ + counts.to(self.counts_.device)
        )
        return self

    def result(self) -> EntropySplit:
        """The per-unit and per-layer split."""
        if self.counts_ is None or float(self.counts_.sum()) == 0:
            raise InputError("no activations were added; call update() first")
        h, mi, hc = _entropy_split(self.counts_)
        return EntropySplit(h, mi, hc, float(h.sum()), float(mi.sum()), float(hc.sum()))


def entropy_split(
    activations: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    bins: int = 16,
) -> EntropySplit:
    """Binned split ``H(H) = I(H; Y) + H(H | Y)`` of a layer, unit by unit.

    See :doc:`/methods/invariance`.

    Parameters
    ----------
    activations : Tensor
        ``N x D`` or ``N x C x H x W`` (every neuron a unit).
    labels : Tensor
        ``N`` class indices.
    num_classes : int, optional
        ``C``; default ``labels.max() + 1``.
    bins : int
        Equal-width bins per unit over its observed range. Use
        :class:`EntropySplitAccumulator` with fixed edges to stream.

    Returns
    -------
    EntropySplit
    """
    h = _units(activations)
    y = _as_labels(labels, h.shape[0])
    c = int(y.max()) + 1 if num_classes is None and y.numel() else num_classes or 1
    return EntropySplitAccumulator(_equal_width_edges(h, bins), c).update(h, y).result()


class ShadeAccumulator:
    """Weighted statistics of the SHADE surrogate (eq. 2.20) over batches."""

    def __init__(self) -> None:
        self.count_ = 0
        self.weight_: torch.Tensor | None = None  # 2 x D
        self.mean_: torch.Tensor | None = None
        self.m2_: torch.Tensor | None = None

    def update(self, activations: torch.Tensor) -> ShadeAccumulator:
        """Add ``N x D`` activations (pre-non-linearity values ``h``); returns ``self``."""
        h = _units(activations).double()
        p1 = torch.sigmoid(h)
        w = torch.stack([1 - p1, p1])  # 2 x N x D: p(z | h_k)
        w_b = w.sum(1)
        mean_b = (w * h).sum(1) / torch.where(w_b > 0, w_b, 1)
        m2_b = (w * (h - mean_b[:, None]) ** 2).sum(1)
        if self.weight_ is None:
            self.weight_, self.mean_, self.m2_ = w_b, mean_b, m2_b
        else:
            if self.weight_.shape != w_b.shape:
                raise InputError(
                    f"activations have {h.shape[1]} units but earlier batches had "
                    f"{self.weight_.shape[1]}"
                )
            dev = self.weight_.device
            self.weight_, self.mean_, self.m2_ = _merge(
                self.weight_, self.mean_, self.m2_, w_b.to(dev), mean_b.to(dev), m2_b.to(dev)
            )
        self.count_ += h.shape[0]
        return self

    def result(self) -> torch.Tensor:
        """``D`` surrogate values ``Σ_z p(z) Var(H | Z = z)``."""
        if self.m2_ is None or self.count_ == 0:
            raise InputError("no activations were added; call update() first")
        return self.m2_.sum(0) / self.count_


def shade_surrogate(activations: torch.Tensor) -> torch.Tensor:
    """SHADE's conditional-variance surrogate per unit (:doc:`/methods/invariance`, Robert 2019 eq.
    2.20).

    Parameters
    ----------
    activations : Tensor
        ``N x D`` pre-activation values ``h`` (or ``N x C x H x W``).

    Returns
    -------
    Tensor
        ``D`` float64 ``Σ_z p(z) Var(H | Z = z)`` with ``p(Z = 1 | h) = sigmoid(h)``.
    """
    return ShadeAccumulator().update(activations).result()


@dataclass
class BinarizationResult:
    """Outcome of the binarised-activation test.

    Attributes
    ----------
    layer : str
        The binarised layer.
    accuracy : float
        Accuracy of the unmodified model.
    binarized_accuracy : float
        Accuracy with ``BinAct`` at the layer.
    change : float
        ``binarized_accuracy − accuracy``.
    unit_means : Tensor
        The units' mean positive activations ``mean(h | h > 0)`` (0 for a unit never
        positive): ``C`` per channel or the activation's shape without ``N`` per neuron.
    """

    layer: str
    accuracy: float
    binarized_accuracy: float
    change: float
    unit_means: torch.Tensor


def _batches(data) -> Iterable:
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
        and data[0].dim() >= 2
        and data[1].dim() == 1
    ):
        return [data]
    return data


def binarized_activation_test(
    model: nn.Module,
    layer: LayerSpec,
    data: Iterable | tuple[torch.Tensor, torch.Tensor],
    *,
    per: str = "channel",
    device: torch.device | str | None = None,
) -> BinarizationResult:
    """Accuracy change when a layer's activation is binarised (Robert 2019 App. A.2.2, eq. A.11).

    Two passes over ``data``: the first records the layer and computes each unit's mean
    positive activation ``H̄⁺`` (and the model's accuracy), the second replaces the layer's
    output ``h`` by ``0 if h ≤ 0 else H̄⁺`` and measures the accuracy again.

    Parameters
    ----------
    model : nn.Module
        Classifier returning ``N x classes`` logits (left exactly as it was).
    layer : layer spec
        The layer to binarise (see :func:`xnn_toolkit.layers.resolve_layer`).
    data : iterable of (inputs, labels), or one (inputs, labels) pair
        E.g. a DataLoader.
    per : {"channel", "neuron"}
        A unit is a channel (dim 1; one mean per channel) or every neuron of the activation.
    device : device, optional
        Where to run; default the model's parameters' device.

    Returns
    -------
    BinarizationResult
    """
    if per not in ("channel", "neuron"):
        raise InputError(f"per must be 'channel' or 'neuron', got {per!r}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    pos_sum = pos_cnt = None
    correct = total = 0
    with record(model, layer) as rec, torch.no_grad():
        name = rec.layers[0]
        for x, y in _batches(data):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.shape[0])
            a = rec.activations[name].double()
            dims = [0] + list(range(2, a.dim())) if per == "channel" else [0]
            s = torch.where(a > 0, a, 0).sum(dims)
            k = (a > 0).double().sum(dims)
            pos_sum = s if pos_sum is None else pos_sum + s
            pos_cnt = k if pos_cnt is None else pos_cnt + k
    if total == 0:
        raise InputError("data yielded no examples")
    means = torch.where(pos_cnt > 0, pos_sum / pos_cnt.clamp_min(1), 0)

    def binact(h: torch.Tensor) -> torch.Tensor:
        m = means.to(h.dtype)
        if per == "channel":
            m = m.view(1, -1, *([1] * (h.dim() - 2)))
        return torch.where(h > 0, m.expand_as(h), torch.zeros_like(h))

    bin_correct = 0
    with intervene(model, {name: binact}), torch.no_grad():
        for x, y in _batches(data):
            x, y = x.to(device), torch.as_tensor(y).to(device)
            bin_correct += int((model(x).argmax(1) == y).sum())
    acc, bacc = correct / total, bin_correct / total
    return BinarizationResult(name, acc, bacc, bacc - acc, means)


@dataclass
class ProbeReport:
    """Decodability of two label sets from two subspaces (DualDis §4.5.2), on a held-out split.

    Attributes
    ----------
    accuracy_a, accuracy_b : float
        Linear-probe accuracy of labels ``y_a`` from subspace ``a`` and ``y_b`` from ``b``.
    error_a_from_b, error_b_from_a : float
        Non-linear-probe error rate of ``y_a`` from ``b`` and of ``y_b`` from ``a``
        (disentanglement: higher is better).
    aggregate : float
        Mean of the four numbers above.
    ceiling_a, ceiling_b : float
        Label-prior ceilings of the two errors: ``1 − max_k p(y = k)`` on the test split.
    """

    accuracy_a: float
    accuracy_b: float
    error_a_from_b: float
    error_b_from_a: float
    aggregate: float
    ceiling_a: float
    ceiling_b: float


def _probe(kind: str, random_state: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "linear":
        est = LogisticRegression(max_iter=2000)
    else:
        est = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=random_state)
    return make_pipeline(StandardScaler(), est)


def decodability_probes(
    subspace_a: torch.Tensor,
    subspace_b: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    *,
    test_size: float = 0.25,
    random_state: int = 0,
) -> ProbeReport:
    """Linear probes within and non-linear probes across two subspaces (:doc:`/methods/invariance`).

    Subspace ``a`` should carry labels ``a`` (e.g. x-features → class) and not labels ``b``
    (e.g. a nuisance such as pose or background); subspace ``b`` the reverse (e.g. the
    residual of Z). Probes are scikit-learn pipelines (standardisation, then
    ``LogisticRegression`` or a one-hidden-layer ``MLPClassifier``), fitted on a stratified
    split of the examples and scored on the rest.

    Parameters
    ----------
    subspace_a, subspace_b : Tensor
        ``N x D_a`` and ``N x D_b`` features of the same ``N`` examples.
    labels_a, labels_b : Tensor
        ``N`` integer labels of the two label sets.
    test_size : float
        Held-out share.
    random_state : int
        Seed of the split and of the non-linear probes.

    Returns
    -------
    ProbeReport
    """
    from sklearn.model_selection import train_test_split

    a = _as_maps(subspace_a, "subspace_a", ndims=(2,), expected="N x D_a")
    b = _as_maps(subspace_b, "subspace_b", ndims=(2,), expected="N x D_b")
    n = a.shape[0]
    if b.shape[0] != n:
        raise InputError(f"subspace_a has {n} examples but subspace_b has {b.shape[0]}")
    ya = _as_labels(labels_a, n, "labels_a").cpu().numpy()
    yb = _as_labels(labels_b, n, "labels_b").cpu().numpy()
    if len(set(ya.tolist())) < 2 or len(set(yb.tolist())) < 2:
        raise InputError("each label set needs at least two classes to probe")
    idx = list(range(n))
    try:
        tr, te = train_test_split(idx, test_size=test_size, random_state=random_state, stratify=ya)
    except ValueError:
        tr, te = train_test_split(idx, test_size=test_size, random_state=random_state)
    an, bn = a.detach().cpu().double().numpy(), b.detach().cpu().double().numpy()

    def score(x, y, kind):
        return float(_probe(kind, random_state).fit(x[tr], y[tr]).score(x[te], y[te]))

    acc_a = score(an, ya, "linear")
    acc_b = score(bn, yb, "linear")
    err_ab = 1.0 - score(bn, ya, "nonlinear")
    err_ba = 1.0 - score(an, yb, "nonlinear")

    def ceiling(y):
        _, counts = torch.unique(torch.as_tensor(y[te]), return_counts=True)
        return 1.0 - float(counts.max()) / len(te)

    return ProbeReport(
        accuracy_a=acc_a,
        accuracy_b=acc_b,
        error_a_from_b=err_ab,
        error_b_from_a=err_ba,
        aggregate=(acc_a + acc_b + err_ab + err_ba) / 4,
        ceiling_a=ceiling(ya),
        ceiling_b=ceiling(yb),
    )
