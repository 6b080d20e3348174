"""XNN explanation heads: SRAE and its NN / SAE / CAE baselines, all classes in one module.

:doc:`/methods/xnn` (Khorram 2020, ch. 3). An XNN attached to a layer with activation ``Z`` explains
one logit ``ŷ_c`` through a few x-features ``E(Z) ∈ R^n`` and a linear predictor
``ȳ = vᵀE(Z)``. One head per class (one-vs-all); the ``C`` heads of a layer live in one
module with grouped weights (``G x out x in``) and train together, which is exactly
equivalent to training them one by one with the same per-head batches (every parameter
belongs to one head and Adam is elementwise) but runs as a few batched matrix products.

Conventions
-----------
- Fully connected layers: ``Z`` is ``N x D``. Conv layers (the conv variant of §1, thesis
  §3.3.4): ``Z`` is ``N x D x H x W``; encoder and decoder are 1x1 convolutions (the same
  per-position MLP), the x-feature maps are average-pooled over positions and the predictor
  is fully connected on the pooled x-features, so a contribution ``v_i E_i`` stays a scalar.
- ``Z`` is divided by one scalar (its root mean square over the training set, kept in
  ``scale_``) before entering the head, so ``q`` in the log penalty does not depend on the
  layer's units. Targets ``ŷ`` are logits (not softmax), in their own units.
- x-features pass through a ReLU (``x_activation="relu"``, the default) so that they are
  non-negative, as Excitation Backprop needs for their heatmaps.
- Initialisation (:doc:`/methods/xnn` leaves it open): encoder and decoder as ``nn.Linear``; the
  predictor ``v`` with alternating signs and every x-feature's bias raised until it is on
  for all of its head's training rows, so that no head starts unable to reach the logits of
  its positives (:func:`_predictor_init`, :func:`_start_active`). Everything random is
  drawn from one generator seeded by ``random_state``; torch's global RNG is not touched.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._io import load_estimator_files, save_estimator_files
from ..datafit import as_labels
from ..errors import AssetError, InputError, NotFittedError
from ._base import Head, keeps_global_rng
from .xnn_network import (
    _GroupedXNN,
    _head_block,
    faithfulness_loss,
    pull_away_loss,
    reconstruction_error_per_dim,
    sparse_reconstruction_loss,
)

__all__ = ["XNN"]

KINDS = ("srae", "nn", "sae", "cae")


# --------------------------------------------------------------------------- losses


# --------------------------------------------------------------------------- module


def _adam(params: object, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, fused into one kernel per parameter where this torch build has it.

    The fused step computes the same update as the default loop over ``exp_avg`` /
    ``exp_avg_sq`` / ``sqrt`` / ``div``, in one pass over each grouped ``G x out x in``
    weight instead of several full-size temporaries (memory traffic dominates the step on a
    CPU). Falls back to the default implementation where fusion is unavailable.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def _start_active(module: _GroupedXNN, z_all: torch.Tensor, idx: torch.Tensor) -> None:
    """Shift the x-layer's biases so that every x-feature starts active on its head's data.

    With the default initialisation each ReLU x-feature is on for only part of the inputs;
    a head whose features of the sign of its positives' logits (``v_i > 0``) are all off on
    every positive cannot fit them (no gradient reaches those features there) and is
    stuck at ``ȳ = 0`` on its positives. Raising each x-feature's bias until its smallest
    pre-activation over the head's training rows is just above 0 (by 1 % of its range)
    starts every feature in the linear regime; training then switches off what it does
    not need. :doc:`/methods/xnn` leaves the initialisation open.

    Parameters
    ----------
    module : _GroupedXNN
    z_all : Tensor
        ``N x P x D`` scaled activations.
    idx : Tensor
        ``G x L`` training rows of each head.
    """
    g = idx.shape[0]
    d = z_all.shape[-1]
    last = module.encoder[-1]
    low = high = None
    for s in range(0, idx.shape[1], 1024):
        rows = z_all[idx[:, s : s + 1024]].reshape(g, -1, d)
        h = rows
        for layer in module.encoder[:-1]:
            h = torch.relu_(layer(h))
        pre = last(h)  # G x rows x n
        lo, hi = pre.amin(1), pre.amax(1)
        low = lo if low is None else torch.minimum(low, lo)
        high = hi if high is None else torch.maximum(high, hi)
    # a margin of 1 % of the range keeps the lowest row strictly inside the linear regime
    low = low - 0.01 * (high - low)
    last.bias.sub_(low.clamp_max(0))


# --------------------------------------------------------------------------- data


@dataclass
class _Data:
    z: torch.Tensor  # N x P x D (P = 1 for fully connected layers)
    spatial: tuple[int, int] | None
    logits: torch.Tensor  # N x K
    labels: torch.Tensor  # N


def _float_tensor(v: object, arg: str) -> torch.Tensor:
    try:
        t = torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"{arg} must be a numeric Tensor or array, got {type(v).__name__}: {exc}"
        ) from None
    if t.is_complex() or t.dtype == torch.bool:
        raise InputError(f"{arg} must be real numbers, got dtype {t.dtype}")
    return t.float()


def _as_data(
    X: object, layer: str | None, logits: torch.Tensor | None, labels: torch.Tensor | None
) -> _Data:
    if hasattr(X, "activations") and callable(X.activations):
        bank = X
        if layer is None:
            if len(bank.layers) != 1:
                raise InputError(
                    f"the bank holds layers {bank.layers}; pass layer= to say which one to explain"
                )
            layer = bank.layers[0]
        z = bank.activations(layer)
        logits = bank.logits if logits is None else logits
        labels = bank.labels if labels is None else labels
    elif isinstance(X, torch.Tensor):
        z = X
    else:
        raise InputError(
            f"expected an activation tensor (N x D or N x D x H x W) or an ActivationBank, "
            f"got {type(X).__name__}"
        )
    if logits is None:
        raise InputError("logits are needed (the head mimics them): pass logits= or a bank")
    z = _float_tensor(z, "the activations")
    logits = _float_tensor(logits, "logits")
    if z.dim() not in (2, 4):
        raise InputError(
            f"activations must be N x D (fully connected) or N x D x H x W (conv), got "
            f"shape {tuple(z.shape)}"
        )
    if len(z) == 0:
        raise InputError("no examples: the activations are empty")
    if logits.dim() != 2 or len(logits) != len(z):
        raise InputError(f"logits must be N x K with N = {len(z)}, got shape {tuple(logits.shape)}")
    if not torch.isfinite(z).all():
        raise InputError("the activations hold NaN or inf values; check the model and the data")
    if not torch.isfinite(logits).all():
        raise InputError("the logits hold NaN or inf values")
    if labels is None:
        labels = logits.argmax(1)
    labels = as_labels(labels)
    if labels.shape != (len(z),):
        raise InputError(f"labels must have shape ({len(z)},), got {tuple(labels.shape)}")
    if bool((labels < 0).all()):  # a bank of unlabelled data: the documented default
        labels = logits.argmax(1)
    elif bool((labels < 0).any()):
        raise InputError(
            f"{int((labels < 0).sum())} of {len(labels)} labels are negative (unknown, -1 in "
            "a bank); pass labels= for every example, e.g. logits.argmax(1)"
        )
    if z.dim() == 4:
        n, d, h, w = z.shape
        return _Data(z.flatten(2).transpose(1, 2), (h, w), logits, labels)
    return _Data(z.unsqueeze(1), None, logits, labels)


def _split_head_indices(
    labels: torch.Tensor,
    classes: Sequence[int],
    n_pos: int,
    n_neg: int | None,
    val_fraction: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head, sample positives and negatives and split them into train / validation.

    Returns ``train_idx, train_pos, val_idx, val_pos``, each ``G x L`` (indices into the
    data and a bool mask of positives); every head gets the same counts.
    """
    n_neg_avail = min(int((labels != c).sum()) for c in classes)
    if n_neg is None or n_neg > n_neg_avail:
        if n_neg is not None:
            warnings.warn(
                f"asked for {n_neg} negatives per class but only {n_neg_avail} exist for some "
                "class; using all of them",
                stacklevel=3,
            )
        n_neg = n_neg_avail
    nv_pos = int(round(n_pos * val_fraction))
    nv_neg = int(round(n_neg * val_fraction))
    tr_idx, tr_pos, va_idx, va_pos = [], [], [], []
    for c in classes:
        pos = torch.nonzero(labels == c).flatten()
        neg = torch.nonzero(labels != c).flatten()
        pos = pos[torch.randperm(len(pos), generator=gen)[:n_pos]]
        neg = neg[torch.randperm(len(neg), generator=gen)[:n_neg]]
        tr = torch.cat([pos[nv_pos:], neg[nv_neg:]])
        va = torch.cat([pos[:nv_pos], neg[:nv_neg]])
        tr_idx.append(tr)
        va_idx.append(va)
        tr_pos.append(torch.arange(len(tr)) < n_pos - nv_pos)
        va_pos.append(torch.arange(len(va)) < nv_pos)
    return (torch.stack(tr_idx), torch.stack(tr_pos), torch.stack(va_idx), torch.stack(va_pos))


# --------------------------------------------------------------------------- estimators


class _HeadsBase(Head):
    """Shared prediction API of fitted heads (x-features, ȳ, contributions)."""

    classes_: torch.Tensor
    spatial_: tuple[int, int] | None

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _rows(self, Z: object, layer: str | None = None) -> torch.Tensor:
        self._check_fitted()
        if hasattr(Z, "activations") and callable(Z.activations):
            layer = layer or getattr(self, "layer", None) or Z.layers[0]
            Z = Z.activations(layer)
        z = torch.as_tensor(Z).float()
        want = 4 if self.spatial_ is not None else 2
        if z.dim() != want or z.shape[1] != self.n_inputs_:
            shape = "N x D x H x W" if want == 4 else "N x D"
            raise InputError(
                f"expected activations of shape {shape} with D = {self.n_inputs_}, got "
                f"{tuple(z.shape)}"
            )
        return z.flatten(2).transpose(1, 2) if want == 4 else z.unsqueeze(1)

    def transform(self, Z: object, layer: str | None = None) -> torch.Tensor:
        """x-features ``E(Z)`` of every head.

        Parameters
        ----------
        Z : Tensor or ActivationBank
            ``N x D`` (or ``N x D x H x W`` for conv heads).

        Returns
        -------
        Tensor
            ``N x C x n``: x-features of each of the ``C`` class heads.
        """
        return self._features(self._rows(Z, layer))

    def predict(self, Z: object, layer: str | None = None) -> torch.Tensor:
        """The heads' predictions ``ȳ_c = vᵀE(Z) (+ b)``, ``N x C``."""
        e = self.transform(Z, layer)
        return (e * self._v().unsqueeze(0)).sum(-1) + self._intercept().unsqueeze(0)

    def contributions(self, Z: object, layer: str | None = None) -> torch.Tensor:
        """Contribution ``v_i · E_i(Z)`` of every x-feature of every head, ``N x C x n``."""
        return self.transform(Z, layer) * self._v().unsqueeze(0)

    def _intercept(self) -> torch.Tensor:
        return torch.zeros(len(self.classes_))


class XNN(_HeadsBase):
    """One-vs-all XNN heads of one layer, trained together (:doc:`/methods/xnn`, Khorram 2020 ch.
    3).

    Parameters
    ----------
    n_features : int
        ``n``, number of x-features per head (the thesis uses 5).
    kind : {"srae", "nn", "sae", "cae"}
        ``srae``: ``L_FS + β L_SR + η L_PT`` (eq. 3.6); ``nn``: ``L_FS`` only; ``sae``:
        ``L_FS + β·mean_k Q_k`` (plain squared reconstruction); ``cae``: reconstruction only,
        the predictor ``v`` fitted afterwards by weighted least squares.
    hidden : sequence of int
        Encoder hidden sizes (thesis: 800, 100); the decoder mirrors them.
    beta, q, eta : float
        Weights of the reconstruction term, log-penalty sparsity and pull-away term.
    classes : sequence of int, optional
        Which logits to explain (default: every class present in the labels).
    n_positive, n_negative : int
        Examples per head (thesis, CUB: 50 and 8 000). Too few positives is an error; too few
        negatives uses all with a warning. ``n_negative=None`` uses all negatives.
    positive_weight : "balanced" or float
        Weight of positives in ``L_FS``; ``"balanced"`` gives positives and negatives equal
        total weight.
    val_fraction : float
        Share of each head's examples held out for early stopping.
    max_epochs, patience, batch_size, lr, weight_decay : training schedule (Adam).
    x_activation : {"relu", "linear"}
        Activation of the x-layer.
    random_state : int
        Seed of sampling, initialisation and batch order.
    device : str or torch.device, optional
        Where the head computes; ``None``: where its input is (the activations' device; CPU
        for a bank). The same meaning for every head.
    layer : str, optional
        Layer to read from an activation bank.
    heads_per_step : int, "auto" or None
        How many heads one grouped step trains. ``None``: all of them (one step per batch
        for every class; the fastest on a GPU). An int ``k``: the heads are trained ``k`` at
        a time, each block in the same grouped module and to the same objective; the heads
        are independent, so only the batch order (drawn from the same generator) differs.
        ``"auto"`` (default): all heads on a GPU; on a CPU blocks whose first-layer weights
        take about 8 MB (at the thesis's sizes with 50 heads, faster than all heads at
        once and than one head at a time: ``bench/xnn.py``).

    Attributes
    ----------
    classes_ : Tensor
        ``C`` explained class indices.
    module_ : nn.Module
        The grouped heads.
    scale_ : float
        Root mean square of the training activations (inputs are divided by it).
    history_ : list of dict
        Per-epoch mean train / validation losses of each block of heads trained together
        (``heads``: first and one-past-last head of the block; see ``heads_per_step``).
    best_epoch_ : Tensor
        ``C`` epoch of the kept weights of each head.
    """

    def __init__(
        self,
        n_features: int = 5,
        kind: str = "srae",
        hidden: Sequence[int] = (800, 100),
        beta: float = 1.0,
        q: float = 1.0,
        eta: float = 1.0,
        classes: Sequence[int] | None = None,
        n_positive: int = 50,
        n_negative: int | None = 8000,
        positive_weight: str | float = "balanced",
        val_fraction: float = 0.1,
        max_epochs: int = 100,
        patience: int = 10,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        x_activation: str = "relu",
        random_state: int = 0,
        device: str | torch.device | None = None,
        layer: str | None = None,
        heads_per_step: int | str | None = "auto",
    ) -> None:
        self.n_features = n_features
        self.kind = kind
        self.hidden = hidden
        self.beta = beta
        self.q = q
        self.eta = eta
        self.classes = classes
        self.n_positive = n_positive
        self.n_negative = n_negative
        self.positive_weight = positive_weight
        self.val_fraction = val_fraction
        self.max_epochs = max_epochs
        self.patience = patience
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.x_activation = x_activation
        self.random_state = random_state
        self.device = device
        self.layer = layer
        self.heads_per_step = heads_per_step

    # ---------------------------------------------------------------- validation
    def _validate(self, data: _Data) -> list[int]:
        self._check_params(int(data.z.shape[-1]))
        return self._check_classes(data)

    def _check_params(self, d: int | None = None) -> None:
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.x_activation not in ("relu", "linear"):
            raise InputError(f"x_activation must be 'relu' or 'linear', got {self.x_activation!r}")
        for name, low in (("n_features", 1), ("batch_size", 1), ("max_epochs", 0), ("patience", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise InputError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("q", "beta", "eta", "val_fraction", "lr", "weight_decay", "positive_weight"):
            v = getattr(self, name)
            if name == "positive_weight" and v == "balanced":
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise InputError(f"{name} must be a finite number, got {v!r}")
        hidden = self.hidden
        if (
            not isinstance(hidden, Sequence)
            or isinstance(hidden, str)
            or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden)
        ):
            raise InputError(f"hidden must be a sequence of positive ints, got {hidden!r}")
        if d is not None and not 1 <= self.n_features < d:
            raise InputError(
                f"n_features must be between 1 and dim Z - 1 = {d - 1}, got {self.n_features}: "
                "an explanation space as large as Z explains nothing"
            )
        if self.q <= 0 or self.beta < 0 or self.eta < 0:
            raise InputError("q must be > 0 and beta, eta >= 0")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        hps = self.heads_per_step
        if not (hps is None or hps == "auto" or (isinstance(hps, int) and hps >= 1)):
            raise InputError(f"heads_per_step must be None, 'auto' or an int >= 1, got {hps!r}")

    def _check_classes(self, data: _Data) -> list[int]:
        k = data.logits.shape[1]
        present = sorted(set(data.labels.tolist()))
        classes = list(self.classes) if self.classes is not None else present
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise InputError(f"classes {bad} are out of range for {k} logits")
        absent = [c for c in classes if c not in present]
        if absent:
            raise InputError(
                f"classes {absent} have no examples in the data; pass classes= to choose "
                "classes that are present"
            )
        counts = {c: int((data.labels == c).sum()) for c in classes}
        short = {c: n for c, n in counts.items() if n < self.n_positive}
        if short:
            raise InputError(
                f"n_positive={self.n_positive} but some classes have fewer examples: {short}; "
                "lower n_positive or extract more data"
            )
        if int(round(self.n_positive * self.val_fraction)) < 1:
            raise InputError(
                f"n_positive * val_fraction = {self.n_positive * self.val_fraction:.2f} leaves "
                "no positive for validation; raise one of them"
            )
        return classes

    # ---------------------------------------------------------------- fitting
    @keeps_global_rng
    def fit(
        self,
        X: object,
        y: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        layer: str | None = None,
    ) -> XNN:
        """Fit all class heads together.

        Parameters
        ----------
        X : Tensor or ActivationBank
            Activations ``N x D`` (fully connected) or ``N x D x H x W`` (conv variant), or a
            bank (its ``logits`` and ``labels`` are used unless given).
        y : Tensor, optional
            ``N x K`` pre-softmax outputs of the network: the targets ``ŷ`` the heads mimic
            (a bank's ``logits`` by default).
        labels : Tensor, optional
            ``N`` class labels that define positives (default: the bank's labels, else the
            network's argmax).
        layer : str, optional
            The bank's layer to explain (default: the ``layer`` given to the constructor, or
            the bank's only layer).

        Returns
        -------
        XNN
            ``self``.
        """
        data = _as_data(X, layer if layer is not None else self.layer, y, labels)
        classes = self._validate(data)
        device = torch.device(self.device) if self.device is not None else data.z.device
        # One generator for sampling, initialisation and batch order: seeded fits repeat
        # exactly and torch's global RNG is left alone.
        gen = torch.Generator().manual_seed(self.random_state)
        tr_idx, tr_pos, va_idx, va_pos = _split_head_indices(
            data.labels, classes, self.n_positive, self.n_negative, self.val_fraction, gen
        )
        g = len(classes)
        cls = torch.tensor(classes)
        scale = float(data.z[tr_idx.unique()].pow(2).mean().sqrt().clamp_min(1e-12))
        z_all = (data.z / scale).to(device)
        y_all = data.logits[:, cls].to(device)  # N x G
        w_pos = self._w_pos(tr_pos)

        module = _GroupedXNN(
            g,
            data.z.shape[-1],
            self.hidden,
            self.n_features,
            decoder=self.kind != "nn",
            relu_x=self.x_activation == "relu",
            generator=gen,
        ).to(device)
        if module.relu_x:
            _start_active(module, z_all, tr_idx.to(device))
        best = torch.full((g,), float("inf"))
        best_epoch = torch.zeros(g, dtype=torch.long)
        history: list[dict] = []
        step = self._heads_per_step(g, module, device)
        for a in range(0, g, step):
            b = min(g, a + step)
            sub = module if (a, b) == (0, g) else _head_block(module, a, b)
            sel = slice(a, b)
            best[sel], best_epoch[sel], hist = self._train_block(
                sub,
                z_all,
                y_all[:, sel],
                tr_idx[sel],
                tr_pos[sel],
                va_idx[sel],
                va_pos[sel],
                w_pos,
                gen,
                device,
            )
            if sub is not module:
                with torch.no_grad():
                    for (_, full), part in zip(module.named_parameters(), sub.parameters()):
                        full[sel] = part
            history.extend(dict(h, heads=[a, b]) for h in hist)
        module.eval()
        if self.kind == "cae":
            self._fit_predictor(module, z_all, y_all, tr_idx, tr_pos, w_pos, device)
        self.module_ = module
        self.classes_ = cls
        self.scale_ = scale
        self.spatial_ = data.spatial
        self.n_inputs_ = data.z.shape[-1]
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.best_val_loss_ = best
        return self

    def _heads_per_step(self, g: int, module: _GroupedXNN, device: torch.device) -> int:
        hps = self.heads_per_step
        if hps is None:
            return g
        if hps == "auto":
            if device.type != "cpu":
                return g
            first = module.encoder[0].weight
            per_head = first[0].numel() * first.element_size()
            return max(1, min(g, (8 << 20) // max(per_head, 1)))
        return min(g, int(hps))

    def _train_block(
        self, module, z_all, y_all, tr_idx, tr_pos, va_idx, va_pos, w_pos, gen, device
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Train the heads of ``module`` (a block of them) with early stopping per head.

        Returns the best validation loss and epoch of each head and the epoch history; the
        module ends with each head's best weights.
        """
        g = tr_idx.shape[0]
        opt = _adam(module.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best = torch.full((g,), float("inf"))
        best_epoch = torch.zeros(g, dtype=torch.long)
        best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        waited = torch.zeros(g, dtype=torch.long)
        history = []
        n_tr = tr_idx.shape[1]
        heads = torch.arange(g)
        for epoch in range(self.max_epochs):
            module.train()
            # Every head's own shuffle in one call; the epoch's index and positive masks are
            # gathered and moved once, each step then takes a slice of columns.
            order = torch.rand(g, n_tr, generator=gen).argsort(1)
            ep_idx = tr_idx.gather(1, order).to(device)
            ep_pos = tr_pos.gather(1, order).to(device)
            tot = torch.zeros((), device=device)
            steps = 0
            for s in range(0, n_tr, self.batch_size):
                sl = slice(s, s + self.batch_size)
                losses = self._losses(module, z_all, y_all, ep_idx[:, sl], ep_pos[:, sl], w_pos)
                loss = losses["total"].sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot += loss.detach()  # no host sync per step
                steps += 1
            val = self._evaluate(module, z_all, y_all, va_idx, va_pos, w_pos, device)
            improved = val < best
            if bool(improved.any()):
                keep = heads[improved].to(device)
                for k, v in module.state_dict().items():
                    best_state[k][keep] = v.detach()[keep]
            best = torch.where(improved, val, best)
            best_epoch[improved] = epoch
            waited = torch.where(improved, torch.zeros_like(waited), waited + 1)
            train = float(tot) / g / max(steps, 1)
            history.append({"epoch": epoch, "train": train, "val": float(val.mean())})
            if bool((waited >= self.patience).all()):
                break
        module.load_state_dict(best_state)
        return best, best_epoch, history

    def _w_pos(self, pos: torch.Tensor) -> float:
        if self.positive_weight == "balanced":
            n_p = int(pos[0].sum())
            return (pos.shape[1] - n_p) / max(n_p, 1)
        return float(self.positive_weight)

    def _losses(
        self,
        module: _GroupedXNN,
        z_all: torch.Tensor,
        y_all: torch.Tensor,
        idx: torch.Tensor,
        pos: torch.Tensor,
        w_pos: float,
    ) -> dict[str, torch.Tensor]:
        g, b = idx.shape
        p, d = z_all.shape[1], z_all.shape[2]
        z = z_all[idx]  # G x B x P x D
        y = y_all[idx, torch.arange(g, device=idx.device).unsqueeze(1)]  # G x B
        w = torch.where(pos, torch.as_tensor(w_pos, device=idx.device), 1.0)
        rows = z.reshape(g, b * p, d)
        e_rows = module.encode_rows(rows)
        e = e_rows.reshape(g, b, p, -1).mean(2)  # G x B x n
        y_bar = (e * module.v.unsqueeze(1)).sum(-1)
        out = {"fs": faithfulness_loss(y_bar, y, w)}
        zero = out["fs"].new_zeros(g)
        if module.decoder is not None:
            rec = module.decode_rows(e_rows).reshape(g, b, p, d)
            # Q_k: per input dimension (channel for conv layers), mean over examples and
            # positions.
            q_k = reconstruction_error_per_dim(rec.reshape(g, b * p, d), rows)
            if self.kind == "srae":
                out["sr"] = sparse_reconstruction_loss(q_k, self.q)
            else:
                out["sr"] = q_k.mean(-1)
        else:
            out["sr"] = zero
        out["pt"] = pull_away_loss(e) if self.kind == "srae" else zero
        if self.kind == "cae":
            out["total"] = out["sr"]
        elif self.kind == "nn":
            out["total"] = out["fs"]
        else:
            total = out["fs"] + self.beta * out["sr"]
            out["total"] = total + self.eta * out["pt"] if self.kind == "srae" else total
        return out

    @torch.no_grad()
    def _evaluate(self, module, z_all, y_all, va_idx, va_pos, w_pos, device) -> torch.Tensor:
        module.eval()
        losses = self._losses(module, z_all, y_all, va_idx.to(device), va_pos.to(device), w_pos)
        return losses["total"].cpu()

    @torch.no_grad()
    def _fit_predictor(self, module, z_all, y_all, tr_idx, tr_pos, w_pos, device) -> None:
        """CAE: ``v = argmin Σ_i w_i (vᵀE_i − ŷ_i)²`` per head, in closed form."""
        g = tr_idx.shape[0]
        idx = tr_idx.to(device)
        z = z_all[idx]
        b, p, d = z.shape[1:]
        e = module.encode_rows(z.reshape(g, b * p, d)).reshape(g, b, p, -1).mean(2)
        y = y_all[idx, torch.arange(g, device=device).unsqueeze(1)]
        w = torch.where(tr_pos.to(device), torch.as_tensor(w_pos, device=device), 1.0)
        ew = e * w.unsqueeze(-1)
        gram = ew.transpose(1, 2) @ e + 1e-6 * torch.eye(e.shape[-1], device=device)
        rhs = (ew * y.unsqueeze(-1)).sum(1, keepdim=True).transpose(1, 2)
        module.v.copy_(torch.linalg.solve(gram, rhs).squeeze(-1))

    # ---------------------------------------------------------------- inference
    def _v(self) -> torch.Tensor:
        return self.module_.v.detach().cpu()

    @torch.no_grad()
    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        device = next(self.module_.parameters()).device
        n, p, d = rows.shape
        g = len(self.classes_)
        out = []
        for s in range(0, n, 4096):
            chunk = (rows[s : s + 4096] / self.scale_).to(device)
            m = chunk.shape[0]
            x = chunk.reshape(1, m * p, d).expand(g, -1, -1)
            e = self.module_.encode_rows(x).reshape(g, m, p, -1).mean(2)
            out.append(e.transpose(0, 1).cpu())
        return torch.cat(out)

    def as_target_module(self, class_index: int) -> nn.Module:
        """The encoder of one head as a plain module, for heatmaps of its x-features.

        Parameters
        ----------
        class_index : int
            A class explained by this model (a value in ``classes_``).

        Returns
        -------
        nn.Module
            Fully connected layers: ``N x D -> N x n`` (Linear/ReLU stack, the ``1/scale_``
            folded into the first layer). Conv heads: ``N x D x H x W -> N x n`` (1x1 convs,
            ReLUs, adaptive average pooling, flatten). Its last linear / conv layer is the
            x-layer, whose negation gives the contrastive dual (:doc:`/methods/excitation`).
        """
        self._check_fitted()
        hits = (self.classes_ == class_index).nonzero().flatten()
        if len(hits) == 0:
            raise InputError(
                f"class {class_index} has no head; explained classes: {self.classes_.tolist()}"
            )
        g = int(hits[0])
        conv = self.spatial_ is not None
        layers: list[nn.Module] = []
        last = len(self.module_.encoder) - 1
        for i, gl in enumerate(self.module_.encoder):
            w = gl.weight.detach()[g].cpu().clone()
            b = gl.bias.detach()[g].cpu().clone()
            if i == 0:
                w = w / self.scale_
            if conv:
                lin: nn.Module = nn.Conv2d(w.shape[1], w.shape[0], 1)
                lin.weight.data.copy_(w[:, :, None, None])
            else:
                lin = nn.Linear(w.shape[1], w.shape[0])
                lin.weight.data.copy_(w)
            lin.bias.data.copy_(b)
            layers.append(lin)
            if i < last or self.x_activation == "relu":
                layers.append(nn.ReLU())
        if conv:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers).eval()

    # ---------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        """Hyperparameters as given to ``__init__`` (JSON-serialisable)."""
        keys = [
            "n_features",
            "kind",
            "hidden",
            "beta",
            "q",
            "eta",
            "classes",
            "n_positive",
            "n_negative",
            "positive_weight",
            "val_fraction",
            "max_epochs",
            "patience",
            "batch_size",
            "lr",
            "weight_decay",
            "x_activation",
            "random_state",
            "layer",
            "heads_per_step",
        ]
        out = {k: getattr(self, k) for k in keys}
        out["hidden"] = list(out["hidden"])
        out["classes"] = None if out["classes"] is None else list(out["classes"])
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (configuration).

        Both are written to temporary files and moved into place, so a failure leaves no
        half-written head.
        """
        self._check_fitted()
        path = os.fspath(path)
        meta = {
            "type": "XNN",
            "params": self._saved_params(),
            "classes_": self.classes_.tolist(),
            "scale_": self.scale_,
            "spatial_": list(self.spatial_) if self.spatial_ else None,
            "n_inputs_": self.n_inputs_,
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.module_.state_dict().items()}
        save_estimator_files(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> XNN:
        """Read a head written by :meth:`save`."""
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "XNN", "the XNN")
        try:
            self = cls(**meta["params"])
            self._check_params()
            classes = [int(c) for c in meta["classes_"]]
            n_inputs = meta["n_inputs_"]
            if not classes or not isinstance(n_inputs, int) or n_inputs < 1:
                raise ValueError(f"classes_ {classes} and n_inputs_ {n_inputs!r}")
            if not isinstance(meta["scale_"], int | float):
                raise ValueError(f"scale_ {meta['scale_']!r}")
            spatial = meta["spatial_"]
            if spatial is not None and (
                len(spatial) != 2 or not all(isinstance(v, int) for v in spatial)
            ):
                raise ValueError(f"spatial_ {spatial!r}")
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise AssetError(
                f"{path}.json is not a valid XNN configuration ({type(exc).__name__}: {exc}); "
                "save the head again with XNN.save"
            ) from None
        module = _GroupedXNN(
            len(classes),
            n_inputs,
            self.hidden,
            self.n_features,
            decoder=self.kind != "nn",
            relu_x=self.x_activation == "relu",
        )
        try:
            module.load_state_dict(tensors)
        except RuntimeError as exc:
            raise AssetError(f"{path}.safetensors does not match its configuration: {exc}") from exc
        self.module_ = module.to(torch.device(device or "cpu")).eval()
        self.classes_ = torch.tensor(meta["classes_"])
        self.scale_ = meta["scale_"]
        self.spatial_ = tuple(meta["spatial_"]) if meta["spatial_"] else None
        self.n_inputs_ = meta["n_inputs_"]
        return self
