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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._guard import model_guard
from ..datafit import data_fit
from ..errors import InputError, LayerNotFoundError, NotFittedError
from ..layers import LayerSpec, resolve_layer, stages
from ..metrics.information import MI_ESTIMATORS, mutual_information_score
from ._base import Head, keeps_global_rng
from ._gate_data import (
    _check_images,
    _extract,
    _Extracted,
    _layer_maps,
    _num_logits,
    _Source,
)
from ._gate_io import _GateIO
from ._gate_training import _GateTraining
from .gate_objective import (
    _check_label_range,
    _class_filters,
    default_g,
    density_bounds,
    gate_similarity,
    l1_density,
)

__all__ = ["ClassSpecificGates", "GateScores"]

RECIPES = ("frozen", "finetune")
OBJECTIVES = ("paper", "code")
HEAD_INITS = ("auto", "model", "random")


# --------------------------------------------------------------------------- formulas


# --------------------------------------------------------------------------- data


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


class ClassSpecificGates(_GateIO, _GateTraining, Head):
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
        Where the head computes (its gates, classifier and fine-tuned copy live there);
        ``None``: where its input is (the model's device). The user's model is never moved;
        the frozen recipe's pooled features are moved to this device.
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

    # ---------------------------------------------------------------- fitting
    @keeps_global_rng
    def fit(self, model: nn.Module, data: Any) -> ClassSpecificGates:
        """Learn the gates (and the new head, and fine-tuned blocks) on labelled images.

        Parameters
        ----------
        model : nn.Module
            The pretrained network. It is left exactly as it was (parameters, buffers,
            modes, ``requires_grad`` and hooks), also when ``fit`` raises.
        data : tensors, Dataset or iterable
            ``(images, labels)`` tensors (``N x C x H x W``, ``N``), a Dataset of
            ``(image, label, ...)`` samples, or an iterable of ``(images, labels, ...)``
            batches (e.g. a DataLoader; one that can be iterated again each epoch for
            ``recipe="finetune"``), as :meth:`ClassPaths.fit
            <xnn_toolkit.heads.ClassPaths.fit>` takes them. Images are preprocessed as the
            model expects.

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
        source = _Source(data, None, self.batch_size, fitting=True)
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
