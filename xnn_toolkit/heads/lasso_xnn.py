"""LassoXNN: the sparse linear baseline of XNN (:doc:`/methods/xnn`).

One L1-penalised linear map from the layer's features to each explained logit, its
non-zero weights taken as the x-features; fitted, saved and used like
:class:`~xnn_toolkit.heads.XNN`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .._io import load_estimator_files, save_estimator_files
from ..errors import AssetError, InputError
from ._base import keeps_global_rng
from .xnn import XNN, _as_data, _HeadsBase, _split_head_indices

__all__ = ["LassoXNN"]


class LassoXNN(_HeadsBase):
    """Lasso baseline: select ``n`` dimensions of Z per class (:doc:`/methods/xnn`, Tables A.1 /
    A.3).

    For each class a :class:`sklearn.linear_model.Lasso` is fitted on the same sampled,
    weighted examples as :class:`XNN` for every ``alpha`` of a sweep; the model kept is the
    one with the lowest validation error among those with at most ``n_features`` non-zero
    coefficients. Its x-features are the selected dimensions of Z (spatially averaged for
    conv layers) and its predictor the Lasso coefficients plus intercept.

    Parameters
    ----------
    n_features : int
        Maximum number of selected dimensions.
    alphas : sequence of float, optional
        The sweep (default, per class: 100 values log-spaced from ``α_max``, the smallest
        alpha that zeroes every coefficient, down to ``1e-3·α_max``).
    classes, n_positive, n_negative, positive_weight, val_fraction, random_state, layer
        As in :class:`XNN`.

    Attributes
    ----------
    selected_ : Tensor
        ``C x n`` selected dimension per x-feature (``-1`` where fewer were selected).
    coef_ : Tensor
        ``C x n`` coefficients ``v``.
    intercept_ : Tensor
        ``C``.
    alpha_ : Tensor
        ``C`` chosen alpha.
    path_ : list of list of dict
        Per class, the sweep: alpha, non-zeros, train and validation error.
    """

    def __init__(
        self,
        n_features: int = 5,
        alphas: Sequence[float] | None = None,
        classes: Sequence[int] | None = None,
        n_positive: int = 50,
        n_negative: int | None = 8000,
        positive_weight: str | float = "balanced",
        val_fraction: float = 0.1,
        random_state: int = 0,
        layer: str | None = None,
    ) -> None:
        self.n_features = n_features
        self.alphas = alphas
        self.classes = classes
        self.n_positive = n_positive
        self.n_negative = n_negative
        self.positive_weight = positive_weight
        self.val_fraction = val_fraction
        self.random_state = random_state
        self.layer = layer

    @keeps_global_rng
    def fit(
        self,
        X: object,
        y: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        layer: str | None = None,
    ) -> LassoXNN:
        """Fit one Lasso per class over the alpha sweep; the arguments are those of
        :meth:`XNN.fit <xnn_toolkit.heads.XNN.fit>`."""
        from sklearn.linear_model import lasso_path

        data = _as_data(X, layer if layer is not None else self.layer, y, labels)
        proxy = XNN(
            n_features=self.n_features,
            classes=self.classes,
            n_positive=self.n_positive,
            n_negative=self.n_negative,
            val_fraction=self.val_fraction,
        )
        classes = proxy._validate(data)
        gen = torch.Generator().manual_seed(self.random_state)
        tr_idx, tr_pos, va_idx, va_pos = _split_head_indices(
            data.labels, classes, self.n_positive, self.n_negative, self.val_fraction, gen
        )
        w_pos = self._w(tr_pos)
        zbar = data.z.mean(1).double().numpy()  # N x D (positions averaged)
        n = self.n_features
        sel = torch.full((len(classes), n), -1, dtype=torch.long)
        coef = torch.zeros(len(classes), n)
        icpt = torch.zeros(len(classes))
        chosen = torch.zeros(len(classes))
        paths = []
        for g, c in enumerate(classes):
            tr, va = tr_idx[g].numpy(), va_idx[g].numpy()
            w_tr = np.where(tr_pos[g].numpy(), w_pos, 1.0)
            w_va = np.where(va_pos[g].numpy(), w_pos, 1.0)
            y = data.logits[:, c].double().numpy()
            # Weighted Lasso as sklearn defines it (weights rescaled to sum to the sample
            # count), solved along the whole alpha path with warm starts on centred,
            # sqrt-weighted data; the intercept is recovered from the weighted means.
            w_n = w_tr * len(tr) / w_tr.sum()
            x_mean = np.average(zbar[tr], axis=0, weights=w_n)
            y_mean = float(np.average(y[tr], weights=w_n))
            sw = np.sqrt(w_n)[:, None]
            xs, ys = (zbar[tr] - x_mean) * sw, (y[tr] - y_mean) * sw[:, 0]
            if self.alphas is not None:
                alphas = np.sort(np.asarray(self.alphas, dtype=float))[::-1]
            else:  # from the smallest alpha that zeroes every coefficient down to 1e-3 of it
                a_max = float(np.abs(xs.T @ ys).max() / len(tr))
                alphas = a_max * np.logspace(0, -3, 100)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _, coefs, _ = lasso_path(xs, ys, alphas=alphas, max_iter=5000)
            best, path = None, []
            for j, a in enumerate(alphas):
                beta = coefs[:, j]
                b0 = y_mean - float(x_mean @ beta)
                nz = int((beta != 0).sum())
                err_tr = float(np.average((zbar[tr] @ beta + b0 - y[tr]) ** 2, weights=w_tr))
                err_va = float(np.average((zbar[va] @ beta + b0 - y[va]) ** 2, weights=w_va))
                path.append({"alpha": float(a), "nonzero": nz, "train": err_tr, "val": err_va})
                if 0 < nz <= n and (best is None or err_va < best[0]):
                    best = (err_va, float(a), beta, b0)
            paths.append(path)
            if best is None:
                raise InputError(
                    f"no alpha in the sweep selects between 1 and {n} dimensions for class {c}; "
                    "pass alphas= with larger values"
                )
            _, a, beta, b0 = best
            order = [k for k in np.argsort(-np.abs(beta))[:n] if beta[k] != 0]
            sel[g, : len(order)] = torch.tensor(order, dtype=torch.long)
            coef[g, : len(order)] = torch.tensor(beta[order], dtype=torch.float32)
            icpt[g] = b0
            chosen[g] = a
        self.classes_ = torch.tensor(classes)
        self.selected_ = sel
        self.coef_ = coef
        self.intercept_ = icpt
        self.alpha_ = chosen
        self.path_ = paths
        self.spatial_ = data.spatial
        self.n_inputs_ = data.z.shape[-1]
        self.scale_ = 1.0
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (selection, coefficients) and ``<path>.json``.

        Same format and atomic writes as :meth:`XNN.save`.
        """
        self._check_fitted()
        meta = {
            "type": "LassoXNN",
            "params": self._saved_params(),
            "classes_": self.classes_.tolist(),
            "path_": self.path_,
            "spatial_": list(self.spatial_) if self.spatial_ else None,
            "n_inputs_": self.n_inputs_,
        }
        tensors = {
            "selected_": self.selected_.contiguous(),
            "coef_": self.coef_.contiguous(),
            "intercept_": self.intercept_.contiguous(),
            "alpha_": self.alpha_.contiguous(),
        }
        save_estimator_files(os.fspath(path), tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LassoXNN:
        """Read a head written by :meth:`save`."""
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "LassoXNN", "the Lasso XNN")
        try:
            self = cls(**meta["params"])
            classes = [int(c) for c in meta["classes_"]]
            sel, coef = tensors["selected_"], tensors["coef_"]
            icpt, alpha = tensors["intercept_"], tensors["alpha_"]
            n_inputs = meta["n_inputs_"]
            shape = (len(classes), self.n_features)
            if sel.shape != shape or coef.shape != shape or icpt.shape != shape[:1]:
                raise ValueError(f"tensor shapes do not fit {len(classes)} classes x n_features")
            if not isinstance(n_inputs, int) or int(sel.max()) >= n_inputs:
                raise ValueError(f"n_inputs_ {n_inputs!r}")
            spatial = meta["spatial_"]
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise AssetError(
                f"{path} is not a valid Lasso XNN save ({type(exc).__name__}: {exc}); "
                "save the head again with LassoXNN.save"
            ) from None
        self.classes_ = torch.tensor(classes)
        self.selected_, self.coef_, self.intercept_, self.alpha_ = sel.long(), coef, icpt, alpha
        self.path_ = meta["path_"]
        self.spatial_ = tuple(spatial) if spatial else None
        self.n_inputs_ = n_inputs
        self.scale_ = 1.0
        return self

    def _w(self, pos: torch.Tensor) -> float:
        return XNN(positive_weight=self.positive_weight)._w_pos(pos)

    def _v(self) -> torch.Tensor:
        return self.coef_

    def _intercept(self) -> torch.Tensor:
        return self.intercept_

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        zbar = rows.mean(1)  # N x D
        safe = self.selected_.clamp_min(0)
        e = zbar[:, safe]  # N x C x n
        return torch.where(self.selected_.unsqueeze(0) >= 0, e, torch.zeros_like(e))

    def as_target_module(self, class_index: int) -> nn.Module:
        """Selection of the class's dimensions as a module (``N x D -> N x n``)."""
        self._check_fitted()
        hits = (self.classes_ == class_index).nonzero().flatten()
        if len(hits) == 0:
            raise InputError(f"class {class_index} has no head")
        sel = self.selected_[int(hits[0])]
        lin = nn.Linear(self.n_inputs_, len(sel), bias=False)
        lin.weight.data.zero_()
        for i, k in enumerate(sel.tolist()):
            if k >= 0:
                lin.weight.data[i, k] = 1.0
        mods: list[nn.Module] = [lin]
        if self.spatial_ is not None:
            conv = nn.Conv2d(self.n_inputs_, len(sel), 1, bias=False)
            conv.weight.data.copy_(lin.weight.data[:, :, None, None])
            mods = [conv, nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*mods).eval()
