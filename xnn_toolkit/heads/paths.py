"""Information-bottleneck class paths (NAD) on a frozen network, all classes in one pass.

:doc:`/methods/paths` (Hu et al. 2021, the supplement of Hu et al., ICCV 2021, and the official NAD
code).
For every class ``c`` and every masked layer ``i`` a channel mask ``μ_i^c = sigmoid(m_i^c)``
of shape ``1 x C_i x 1 x 1`` multiplies the layer's output, ``r̃_i = μ_i^c · r_i``; the
backbone is frozen and in eval mode. A channel is on the class's path when ``μ > 0.5``.

One pass trains every class: each image of a batch uses its own class's masks, gathered by
label (``masks[labels] -> B x C_i x 1 x 1``), and the batch loss is the sum over the classes
present of each class's mean loss, so the gradient that reaches class ``c``'s masks is
exactly that of a one-class fit on the class-``c`` images of the batch (the network is in
eval mode: images do not interact). The optimisers update only the rows of classes present
in the batch (:class:`_RowOptimizer`), so a fit of all classes follows, class by class, the
same trajectory as fits of one class at a time over the same batches.

Objectives (per class ``c``; ``B_c`` its images in the batch, ``L`` the number of masked
layers, ``mean_e`` a mean over the ``C_i·H_i·W_i`` elements of a layer's output):

``objective="paper"`` (supplement eq. 14 per hidden layer, eq. 15 for the output)::

    L_c = mean_{b ∈ B_c} [ Σ_i ( β·mean_e((r_i μ_i)²) + mean_e((r_i − μ_i r_i)²) )
                           − log ỹ_c ]

where ``r_i`` is the output of layer ``i`` in the masked forward (masks of earlier layers
applied), before its own mask, and ``ỹ_c = softmax(masked logits)_c`` is the network's own
probability of class ``c``, so the Bernoulli log-likelihood of eq. 15 with ``y_c = 1`` is the
cross-entropy. Eq. 14 is a per-unit expression (univariate Gaussians, eq. 11-13); we average
it over the units of a layer instead of summing, so that both terms of a layer share one
reduction (``β`` keeps the paper's meaning, the per-unit trade-off, and the minimiser of the
layer term alone is ``μ = 1/(1+β)`` for any ``r ≠ 0``) and a layer's weight does not grow
with its size; the layers are summed, the images of a class averaged.

``objective="code"`` (official code)::

    L_c = [ CE(masked logits, c) + Σ_i MSE(μ_i r_i, r_i⁰) ] / L + β Σ_i mean_C(μ_i²) / L

with ``r_i⁰`` the activation of the unmasked network, the MSE averaged over the elements of
the class's images that the unmasked network classifies correctly (0 when there are none)
and the CE over all its images.

β in the paper (chosen by the elbow of reconstruction vs regularisation loss, supplement B):
see :data:`PAPER_BETAS`. With the per-unit means above, values on a different network or
data set must be re-chosen the same way.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._guard import model_guard
from .._io import checked_load, load_estimator_files, loaded_params, save_estimator_files
from ..datafit import as_labels
from ..errors import AssetError, InputError, NotFittedError
from ..hooks import intervene
from ._base import Head, keeps_global_rng
from ._training import (
    _batches,
    _check_pair,
    _class_mean,
    _expand,
    _is_dataset,
    _is_pair,
    _RowOptimizer,
    _split_batch,
    check_counts,
    epoch_loop,
    known_counts,
    prepare,
)
from .path_analysis import (
    HitRates,
    Misclassification,
    composite_2x2,
    hit_rate,
    misclassification_analysis,
    path_similarity,
)

__all__ = [
    "PAPER_BETAS",
    "ClassPaths",
    "binarize",
    "code_objective",
    "mask_from_logit",
    "paper_objective",
]

#: β of the NAD paper (supplement B), per network and data set.
PAPER_BETAS: dict[str, float] = {
    "vgg16/imagenet": 4.5,
    "vgg16/places365": 5.0,
    "resnet50/imagenet": 0.02,
    "resnet50/places365": 0.02,
    "densenet121/imagenet": 0.02,
    "densenet121/places365": 0.02,
    "darts/imagenet": 0.45,
    "darts/places365": 0.20,
}

OBJECTIVES = ("paper", "code")
OPTIMIZERS = ("adam", "normalized")


# --------------------------------------------------------------------------- formulas


def mask_from_logit(logit: torch.Tensor) -> torch.Tensor:
    """``μ = sigmoid(m)``: mask values in (0, 1) from their logits (:doc:`/methods/paths`)."""
    return torch.sigmoid(logit)


def binarize(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Channels on the path: ``μ > threshold`` (:doc:`/methods/paths`: ``μ > 0.5``), as bool."""
    return masks > threshold


def _flat_mean_sq(x: torch.Tensor) -> torch.Tensor:
    """``B x ...`` -> ``B``: mean of squares over everything but the batch dimension."""
    return x.pow(2).flatten(1).mean(1)


def paper_objective(
    pre: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    n_rows: int,
    beta: float,
) -> dict[str, torch.Tensor]:
    r"""The paper's objective per class (:doc:`/methods/paths`; supplement eq. 14 and 15).

    ``L_c = mean_{b∈c} [Σ_i (β·mean_e((r_i μ_i)²) + mean_e((r_i − μ_i r_i)²)) − log ỹ_c]``
    with ``ỹ_c = softmax(masked logits)_c`` (see the module docstring for the reductions).

    Parameters
    ----------
    pre : sequence of Tensor
        Per masked layer, ``B x C_i x H_i x W_i`` (or ``B x C_i``): ``r_i``, the layer's
        output in the masked forward before its own mask.
    masks : sequence of Tensor
        Per layer, ``B x C_i``: each image's class mask ``μ_i``.
    logits : Tensor
        ``B x K`` logits of the masked network.
    labels : Tensor
        ``B`` class (logit) index of each image.
    rows : Tensor
        ``B`` row of each image's class among the ``n_rows`` fitted classes.
    n_rows : int
    beta : float

    Returns
    -------
    dict of str to Tensor
        ``n_rows`` vectors: ``"total"``, ``"kl"`` (the β-weighted terms), ``"rec"`` and
        ``"bce"``; rows without images are 0.
    """
    kl = logits.new_zeros(len(labels))
    rec = logits.new_zeros(len(labels))
    for r, mu in zip(pre, masks):
        m = _expand(mu, r)
        kl = kl + beta * _flat_mean_sq(r * m)
        rec = rec + _flat_mean_sq(r - m * r)
    bce = F.cross_entropy(logits, labels, reduction="none")
    out = {
        "kl": _class_mean(kl, rows, n_rows),
        "rec": _class_mean(rec, rows, n_rows),
        "bce": _class_mean(bce, rows, n_rows),
    }
    out["total"] = out["kl"] + out["rec"] + out["bce"]
    return out


def code_objective(
    post: Sequence[torch.Tensor],
    original: Sequence[torch.Tensor],
    row_masks: Sequence[torch.Tensor],
    logits: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    correct: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    r"""The official code's objective per class (:doc:`/methods/paths`).

    ``L_c = [CE_c + Σ_i MSE_ic] / L + β Σ_i mean_C(μ_ic²) / L`` where ``CE_c`` is the mean
    cross-entropy of the masked logits over the class's images and ``MSE_ic`` the mean of
    ``(μ_i r_i − r_i⁰)²`` over the elements of the class's correctly classified images.

    Parameters
    ----------
    post : sequence of Tensor
        Per layer, ``B x C_i x ...``: the masked activations ``μ_i r_i``.
    original : sequence of Tensor
        Per layer, the same shape: ``r_i⁰`` of the unmasked network.
    row_masks : sequence of Tensor
        Per layer, ``R x C_i``: the masks of every fitted class (``R = n_rows``).
    logits : Tensor
        ``B x K`` masked logits.
    labels, rows : Tensor
        ``B`` logit index and row of each image's class.
    correct : Tensor
        ``B`` bool, the unmasked network's prediction is right.
    beta : float

    Returns
    -------
    dict of str to Tensor
        ``R`` vectors ``"total"``, ``"ce"``, ``"mse"``, ``"reg"`` (each already divided by
        ``L``); rows without images are 0.
    """
    n_rows = row_masks[0].shape[0]
    n_layers = len(post)
    present = torch.zeros(n_rows, dtype=torch.bool, device=logits.device)
    present[rows] = True
    ce = _class_mean(F.cross_entropy(logits, labels, reduction="none"), rows, n_rows)
    mse = logits.new_zeros(n_rows)
    reg = logits.new_zeros(n_rows)
    for p, o, mu in zip(post, original, row_masks):
        mse = mse + _class_mean(_flat_mean_sq(p - o), rows, n_rows, weight=correct)
        reg = reg + mu.pow(2).mean(1)
    out = {
        "ce": ce / n_layers,
        "mse": mse / n_layers,
        "reg": beta * reg * present / n_layers,
    }
    out["total"] = out["ce"] + out["mse"] + out["reg"]
    return out


# --------------------------------------------------------------------------- analyses


# --------------------------------------------------------------------------- masked runs


class _MaskRun:
    """State shared by the forward edits of one :func:`intervene` block.

    ``mode`` is ``"off"`` (pass through, record the output when ``record`` is set) or
    ``"mask"`` (multiply by the masks of ``rows``, keep the pre- and post-mask outputs).
    """

    def __init__(self) -> None:
        self.mode = "off"
        self.rows: torch.Tensor | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self.pre: dict[str, torch.Tensor] = {}
        self.post: dict[str, torch.Tensor] = {}
        self.record = False

    def edit(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            if self.record:
                self.pre[name] = out.detach().clone()
            return out
        m = self.masks[name][self.rows]
        post = out * _expand(m, out)
        self.pre[name] = out
        self.post[name] = post
        # Hand the rest of the network a copy: an in-place op downstream (ReLU(inplace),
        # ``x += shortcut``) must not change the tensor the loss reads.
        return post.clone()


class ClassPaths(Head):
    """Information-bottleneck class paths of a frozen network (:doc:`/methods/paths`, NAD).

    Parameters
    ----------
    layers : "auto" or sequence of layer specs
        Where to put masks. ``"auto"``: after every ReLU'd conv (after the pool when one
        follows) of a plain network, after the stem and every residual block of a ResNet,
        after every dense block and transition of a DenseNet. Or dotted names / modules.
        Conv outputs ``N x C x H x W`` get masks ``1 x C x 1 x 1``; fully connected outputs
        ``N x D`` get masks ``1 x D`` (each unit is a "channel"). Other shapes are an error.
    objective : {"paper", "code"}
        The supplement's eq. 14/15 or the official code's loss (module docstring).
    beta : float
        Weight of the information (regularisation) term; the paper's values are in
        :data:`PAPER_BETAS` (VGG16 4.5 / 5.0, ResNet50 and DenseNet121 0.02, DARTS 0.45 /
        0.20 on ImageNet / Places365).
    optimizer : {"adam", "normalized"}
        Adam, or the official code's ``m ← m − lr · g / ||g||`` (per class and layer).
    lr : float
        Step size on the mask logits (official code: 0.1 with normalised steps).
    epochs : int
        Passes over the data (official code: about 20).
    batch_size : int
        Images per step, all classes mixed (official code: 16 images of one class).
    classes : sequence of int, optional
        Which classes (logit indices) get paths; default: every class present in the data.
        Images of other classes are skipped.
    min_images : int
        A class with fewer images is an error.
    init : float
        Initial mask value ``μ₀`` in (0, 1) (default 0.5: a channel that never receives a
        gradient, e.g. one that is zero on every image of the class under the paper's
        objective, stays at 0.5 and is off the path).
    threshold : float
        Binarisation threshold (``μ > threshold`` is on the path).
    random_state : int
        Seed of the batch order.
    device : str or torch.device, optional
        Where the head computes; ``None``: where its input is (the model's device). The
        model is never moved, so a device other than the model's is refused.
    verbose : bool
        Print one line per epoch (the mean of each loss term), as the gates do.

    Attributes
    ----------
    layers_ : list of str
        Masked layers, shallow to deep.
    classes_ : Tensor
        ``K`` classes (logit indices) with paths; row ``k`` of every mask is class
        ``classes_[k]``.
    masks_ : dict of str to Tensor
        ``K x C_i`` mask values in [0, 1] (CPU).
    paths_ : dict of str to Tensor
        ``K x C_i`` bool, ``masks_ > threshold``.
    logits_ : dict of str to Tensor
        ``K x C_i`` mask logits.
    n_images_ : Tensor
        ``K`` images per class seen in one epoch.
    history_ : list of dict
        Per epoch, the mean per-step loss terms (summed over classes).
    n_outputs_ : int
        Number of logits of the network.

    Examples
    --------
    >>> cp = ClassPaths(beta=1.0, epochs=5).fit(model, (images, labels))  # doctest: +SKIP
    >>> cp.paths_["layer4.1"].shape                                      # doctest: +SKIP
    torch.Size([10, 256])
    >>> cp.similarity()                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: str | Sequence[object] = "auto",
        objective: str = "paper",
        beta: float = 1.0,
        optimizer: str = "adam",
        lr: float = 0.1,
        epochs: int = 20,
        batch_size: int = 16,
        classes: Sequence[int] | None = None,
        min_images: int = 10,
        init: float = 0.5,
        threshold: float = 0.5,
        random_state: int = 0,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.layers = layers
        self.objective = objective
        self.beta = beta
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.classes = classes
        self.min_images = min_images
        self.init = init
        self.threshold = threshold
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ---------------------------------------------------------------- validation
    def _check_params(self) -> None:
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (isinstance(self.beta, int | float) and self.beta >= 0):
            raise InputError(f"beta must be a number >= 0, got {self.beta!r}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if not 0 < self.init < 1:
            raise InputError(f"init must be in (0, 1), got {self.init}")
        if not 0 < self.threshold < 1:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")
        if not (isinstance(self.min_images, int) and self.min_images >= 1):
            raise InputError(f"min_images must be an int >= 1, got {self.min_images!r}")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise InputError(
                f"layers must be 'auto' or a list of layer names, got the string "
                f"{self.layers!r}; wrap a single name in a list"
            )

    # ---------------------------------------------------------------- fitting
    @keeps_global_rng
    def fit(self, model: nn.Module, data: object) -> ClassPaths:
        """Learn the masks of every class in one pass over the data per epoch.

        Parameters
        ----------
        model : nn.Module
            The frozen network (``N x C x H x W -> N x K`` logits). It is left exactly as it
            was: parameters, buffers, modes, ``requires_grad`` flags, ``.grad`` and hooks.
        data : tuple, Dataset or iterable
            ``(images, labels)`` tensors (``N x C x H x W``, ``N``), a map-style dataset of
            ``(image, label)`` items, or an iterable of ``(images, labels)`` batches (e.g. a
            DataLoader, which keeps its own order and augmentation). Images are moved to the
            model's device batch by batch.

        Returns
        -------
        ClassPaths
            ``self``.
        """
        self._check_params()
        fit = prepare(model, data, self.layers, self.device, self.classes)
        model, dev, names, cls = fit.model, fit.device, fit.names, fit.classes
        n_rows = len(cls)
        counts = known_counts(fit, data)
        if counts is not None:
            check_counts(counts, cls, self.classes, self.min_images)

        logit0 = math.log(self.init / (1 - self.init))
        params = {
            n: torch.full((n_rows, fit.shapes[n][1]), logit0, device=dev, requires_grad=True)
            for n in names
        }
        opt = _RowOptimizer(list(params.values()), self.optimizer, self.lr)
        run = _MaskRun()
        counts = torch.zeros(n_rows, dtype=torch.long)
        kept: dict[str, torch.Tensor] = {}

        def step(epoch: int, x, y, rows) -> dict[str, float]:
            if epoch == 0:
                counts.add_(torch.bincount(rows, minlength=n_rows).cpu())
            terms = self._step_loss(model, run, params, names, x, y, rows, n_rows)
            grads = torch.autograd.grad(terms["total"].sum(), list(params.values()))
            present = torch.zeros(n_rows, dtype=torch.bool, device=dev)
            present[rows] = True
            opt.step(grads, present)
            run.pre.clear()
            run.post.clear()
            return {k: float(v.detach().sum()) for k, v in terms.items()}

        def end_of_epoch(epoch: int) -> None:
            if epoch == 0:
                kept["rows"] = check_counts(counts, cls, self.classes, self.min_images)

        edits = {n: partial(run.edit, n) for n in names}
        with intervene(model, edits, eval_mode=True, freeze=True):
            history = epoch_loop(
                fit,
                data,
                epochs=self.epochs,
                batch_size=self.batch_size,
                gen=torch.Generator().manual_seed(self.random_state),
                step=step,
                end_of_epoch=end_of_epoch,
                verbose=self.verbose,
            )
        keep_rows = kept["rows"]
        n_out = fit.n_out

        self.layers_ = names
        self.classes_ = cls[keep_rows]
        self.logits_ = {n: p.detach()[keep_rows.to(dev)].cpu() for n, p in params.items()}
        self.n_images_ = counts[keep_rows]
        self.history_ = history
        self.n_outputs_ = n_out
        self._set_masks()
        return self

    def _set_masks(self) -> None:
        self.masks_ = {n: mask_from_logit(v) for n, v in self.logits_.items()}
        self.paths_ = {n: binarize(v, self.threshold) for n, v in self.masks_.items()}

    def _step_loss(self, model, run, params, names, x, y, rows, n_rows) -> dict[str, torch.Tensor]:
        mus = {n: mask_from_logit(p) for n, p in params.items()}
        if self.objective == "code":
            run.mode, run.record = "off", True
            with torch.no_grad():
                clean = model(x)
            original = [run.pre[n] for n in names]
            correct = clean.argmax(1) == y
            run.pre.clear()
        run.mode, run.record, run.rows, run.masks = "mask", False, rows, mus
        logits = model(x)
        run.mode = "off"
        if self.objective == "paper":
            return paper_objective(
                [run.pre[n] for n in names],
                [mus[n][rows] for n in names],
                logits,
                y,
                rows,
                n_rows,
                float(self.beta),
            )
        return code_objective(
            [run.post[n] for n in names],
            original,
            [mus[n] for n in names],
            logits,
            y,
            rows,
            correct,
            float(self.beta),
        )

    # ---------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "masks_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def rows_of(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Row of each class in the mask matrices (``classes_`` index).

        Raises
        ------
        InputError
            A class without a path.
        """
        self._check_fitted()
        labels = as_labels(labels).reshape(-1).cpu()
        row_of = torch.full((self.n_outputs_,), -1, dtype=torch.long)
        row_of[self.classes_] = torch.arange(len(self.classes_))
        ok = (labels >= 0) & (labels < self.n_outputs_)
        rows = torch.where(ok, row_of[labels.clamp(0, self.n_outputs_ - 1)], -1)
        if bool((rows < 0).any()):
            bad = sorted(set(labels[rows < 0].tolist()))
            raise InputError(
                f"classes {bad} have no path; fitted classes: {self.classes_.tolist()}"
            )
        return rows

    @contextmanager
    def _masked(self, model: nn.Module, binary: bool) -> Iterator[_MaskRun]:
        self._check_fitted()
        dev = model_device(model, None)
        run = _MaskRun()
        src = self.paths_ if binary else self.masks_
        run.masks = {n: v.to(dev).float() for n, v in src.items()}
        with intervene(model, {n: partial(run.edit, n) for n in self.layers_}, freeze=True):
            yield run

    @torch.no_grad()
    def masked_logits(
        self,
        model: nn.Module,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        binary: bool = False,
    ) -> torch.Tensor:
        """Logits of the network with each image's class path applied.

        Parameters
        ----------
        model : nn.Module
        images : Tensor
            ``B x C x H x W``.
        classes : Tensor or sequence of int
            ``B`` class whose path each image runs through.
        binary : bool
            Use the binary paths (0/1) instead of the soft masks.

        Returns
        -------
        Tensor
            ``B x K_out`` (on the model's device).
        """
        rows = self.rows_of(classes)
        if len(rows) != len(images):
            raise InputError(f"got {len(images)} images but {len(rows)} classes")
        with self._masked(model, binary) as run:
            dev = model_device(model, None)
            run.mode, run.rows = "mask", rows.to(dev)
            return model(images.to(dev))

    @torch.no_grad()
    def class_maps(
        self,
        model: nn.Module,
        images: torch.Tensor,
        classes: torch.Tensor | Sequence[int],
        binary: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Masked activation summed over channels at every spatial masked layer.

        Each image runs through the path of its class; the map of layer ``i`` is
        ``Σ_c μ_i,c r_i,c`` (:doc:`/methods/paths`, hit rate).

        Parameters
        ----------
        model : nn.Module
        images : Tensor
            ``B x C x H x W``.
        classes : Tensor or sequence of int
            ``B`` classes.
        binary : bool
            Use the binary paths.

        Returns
        -------
        dict of str to Tensor
            ``B x H_i x W_i`` per spatial layer (CPU).
        """
        rows = self.rows_of(classes)
        if len(rows) != len(images):
            raise InputError(f"got {len(images)} images but {len(rows)} classes")
        with self._masked(model, binary) as run:
            dev = model_device(model, None)
            run.mode, run.rows = "mask", rows.to(dev)
            model(images.to(dev))
            return {n: run.post[n].sum(1).cpu() for n in self.layers_ if run.post[n].dim() == 4}

    def hit_rates(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        n_composites: int = 100,
        top: float = 0.1,
        batch_size: int = 16,
        binary: bool = False,
        random_state: int = 0,
    ) -> HitRates:
        """Hit rate of every spatial masked layer on 2 x 2 composites (:doc:`/methods/paths`).

        Composites of 4 images of different classes (:func:`composite_2x2`) run through each
        quadrant class's path; its map (:meth:`class_maps`) is min-max normalised, upsampled
        to the composite size and its top ``top`` pixels are scored (:func:`hit_rate`).

        Parameters
        ----------
        model : nn.Module
            Must accept ``2H x 2W`` inputs (e.g. a global or adaptive pooling before the
            classifier).
        images, labels : Tensor
            ``N x C x H x W`` and ``N``; only classes with paths are used.
        n_composites : int
        top : float
        batch_size : int
            Composites per forward (each runs 4 times, once per quadrant class).
        binary : bool
            Use the binary paths.
        random_state : int

        Returns
        -------
        HitRates
        """
        self._check_fitted()
        labels = as_labels(labels)
        has = torch.isin(labels, self.classes_)
        images, labels = images[has], labels[has]
        comp, quad_cls, _ = composite_2x2(images, labels, n_composites, random_state)
        size = tuple(comp.shape[-2:])
        values: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(comp), batch_size):
            c = comp[s : s + batch_size]
            q = quad_cls[s : s + batch_size]
            x = c.repeat_interleave(4, 0)
            cls = q.reshape(-1)
            quads = torch.arange(4).repeat(len(c))
            try:
                maps = self.class_maps(model, x, cls, binary=binary)
            except RuntimeError as exc:
                raise InputError(
                    f"the model failed on {size[0]} x {size[1]} composites ({exc}); hit rates "
                    "need a network that accepts twice the image size"
                ) from exc
            for n, m in maps.items():
                values.setdefault(n, []).append(hit_rate(m, quads, top=top, size=size))
        layers = [n for n in self.layers_ if n in values]
        if not layers:
            raise InputError("no masked layer is spatial (N x C x H x W); hit rates need maps")
        v = torch.stack([torch.cat(values[n]) for n in layers], 1)
        return HitRates(layers, v.mean(0), v.std(0), v)

    def similarity(self) -> torch.Tensor:
        """``K x K`` path similarity of the fitted classes (:func:`path_similarity`)."""
        self._check_fitted()
        return path_similarity(self.paths_)

    @torch.no_grad()
    def misclassification(
        self, model: nn.Module, data: object, k: int = 3, batch_size: int = 64
    ) -> Misclassification:
        """Run the unmasked network on ``data`` and compare its errors with the paths.

        See :func:`misclassification_analysis`; ``data`` as in :meth:`fit` (the order of a
        tuple or dataset is kept, so ``indices`` point into it).
        """
        self._check_fitted()
        dev = model_device(model, None)
        if _is_pair(data):
            x, y = _check_pair(data)
            batches: Iterator = (
                (x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(x), batch_size)
            )
        elif _is_dataset(data):
            loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
            batches = (_split_batch(b) for b in loader)
        else:
            batches = _batches(data, batch_size, torch.Generator())
        all_logits, all_labels = [], []
        with model_guard(model, eval_mode=True):
            for xb, yb in batches:
                all_logits.append(model(xb.to(dev)).float().cpu())
                all_labels.append(yb.long().cpu())
        return misclassification_analysis(
            self.similarity(), torch.cat(all_logits), torch.cat(all_labels), self.classes_, k
        )

    # ---------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (JSON-serialisable where possible)."""
        layers = (
            self.layers
            if isinstance(self.layers, str)
            else [x if isinstance(x, str | int) else str(x) for x in self.layers]
        )
        return {
            "layers": layers,
            "objective": self.objective,
            "beta": self.beta,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "classes": None if self.classes is None else [int(c) for c in self.classes],
            "min_images": self.min_images,
            "init": self.init,
            "threshold": self.threshold,
            "random_state": self.random_state,
            "device": None if self.device is None else str(self.device),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (mask logits) and ``<path>.json`` (configuration).

        Both files are written atomically.
        """
        self._check_fitted()
        path = os.fspath(path)
        tensors = {f"logits/{n}": v.contiguous() for n, v in self.logits_.items()}
        tensors["classes"] = self.classes_.contiguous()
        tensors["n_images"] = self.n_images_.contiguous()
        meta = {
            "type": "ClassPaths",
            "params": self._saved_params(),
            "layers_": self.layers_,
            "n_outputs_": self.n_outputs_,
            "history_": self.history_,
        }
        save_estimator_files(path, tensors, meta)

    @classmethod
    @checked_load("the class paths")
    def load(cls, path: str | os.PathLike) -> ClassPaths:
        """Read paths written by :meth:`save`."""
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "ClassPaths", "the class paths")
        self = loaded_params(cls, meta["params"], path, "the class paths")
        try:
            self.layers_ = list(meta["layers_"])
            self.logits_ = {n: tensors[f"logits/{n}"] for n in self.layers_}
            self.classes_ = tensors["classes"].long()
            self.n_images_ = tensors["n_images"].long()
        except KeyError as exc:
            raise AssetError(f"{path}.safetensors lacks {exc}; the files do not match") from exc
        if any(v.shape[0] != len(self.classes_) for v in self.logits_.values()):
            raise AssetError(f"{path}.safetensors: mask rows do not match the classes")
        self.n_outputs_ = int(meta["n_outputs_"])
        self.history_ = meta.get("history_", [])
        self._set_masks()
        return self
