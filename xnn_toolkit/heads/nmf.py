"""Post-hoc NMF concepts of a layer's activations (:doc:`/methods/nmf`).

Conv activations ``N x C x H x W`` are reshaped to ``X ∈ R^{C x (N·H·W)}`` and factorised as
``X ≈ M S`` with a non-negative basis ``M`` (``C x r``, the *concepts*) and non-negative scores
``S`` (``r x N·H·W``), minimising ``½||X − MS||²_F`` (Khorram 2020 eq. 2.3; Collins et al., "Deep
Feature Factorization"). Rows of ``S`` reshaped to ``N x r x H x W`` are concept maps; new data
is scored by the non-negative least-squares projection with ``M`` fixed.

Public pieces:

- :class:`NMFConcepts` — the estimator (scikit-learn style): ``fit``, ``transform``,
  ``inverse_transform``, ``fit_transform``, ``as_target_module``, ``save``/``load``; in-memory
  (HALS with extrapolation, or multiplicative updates) or online over an activation bank.
- :class:`PerClassNMF` — one factorisation per class (wraps a template ``NMFConcepts``).
- :func:`select_rank` / :class:`RankTable` — reconstruction error against the rank.
- :func:`concept_maps`, :func:`top_images` — maps upsampled to image size, top images.
- :func:`nmf_faithfulness` / :class:`NMFFaithfulness` and :func:`concept_importance` —
  run the network with the layer replaced by ``M S`` (:doc:`/methods/nmf`, last bullets but one).

Data may be a tensor (``N x C x H x W`` or ``N x C``) or an activation bank, duck-typed as
an object with ``layers``, ``labels``, ``activations(layer) -> Tensor`` and
``iter_batches(layer, batch_size) -> Iterator[Tensor]`` (``xnn_toolkit.bank.ActivationBank``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.base import clone
from torch import nn

from .._device import model_device
from .._guard import model_guard
from .._io import atomic_write
from ..datafit import as_labels
from ..errors import AssetError, InputError, LayerNotFoundError, NotFittedError, close_matches
from ..hooks import intervene
from ..layers import LayerSpec, resolve_layer
from . import _nmf_solvers as _solvers
from ._base import Head, keeps_global_rng

__all__ = [
    "NMFConcepts",
    "PerClassNMF",
    "RankTable",
    "select_rank",
    "concept_maps",
    "top_images",
    "NMFFaithfulness",
    "nmf_faithfulness",
    "concept_importance",
]

_SOLVERS = ("hals", "mu")
_INITS = ("nndsvda", "nndsvd", "nndsvdar", "random")
_NEGATIVE = ("error", "clip", "shift")
_FORMAT = "xnn_toolkit.nmf"
_FORMAT_VERSION = 1
# Relative change of the scores at which the NNLS projection stops (see nnls_project).
_NNLS_TOL = 1e-6


# --------------------------------------------------------------------------------------------
# Input handling: tensors and activation banks
# --------------------------------------------------------------------------------------------


def _is_bank(obj: object) -> bool:
    return all(hasattr(obj, a) for a in ("activations", "iter_batches", "layers"))


@dataclass
class _Source:
    """Where activations come from: a tensor in memory, or one layer of a bank."""

    tensor: torch.Tensor | None = None
    bank: Any = None
    layer: str | None = None

    def full(self) -> torch.Tensor:
        a = self.tensor if self.tensor is not None else self.bank.activations(self.layer)
        return _as_activation(a, self.describe())

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        if self.tensor is not None:
            for i in range(0, self.tensor.shape[0], batch_size):
                yield self.tensor[i : i + batch_size]
        else:
            for a in self.bank.iter_batches(self.layer, batch_size):
                yield _as_activation(a, self.describe())

    def labels(self) -> torch.Tensor | None:
        if self.bank is None or getattr(self.bank, "labels", None) is None:
            return None
        return torch.as_tensor(self.bank.labels).long().reshape(-1)

    def describe(self) -> str:
        return f"layer {self.layer!r} of the bank" if self.bank is not None else "the input"


def _as_activation(a: object, what: str) -> torch.Tensor:
    if not isinstance(a, torch.Tensor):
        try:
            a = torch.as_tensor(a)
        except Exception as exc:  # noqa: BLE001 - re-raised as our error
            raise InputError(
                f"{what} must be a tensor N x C x H x W or N x C, got {type(a).__name__}"
            ) from exc
    if a.ndim not in (2, 4):
        raise InputError(
            f"{what} must be N x C x H x W (conv) or N x C (vectors), got shape "
            f"{tuple(a.shape)}; pool or reshape it first"
        )
    if not a.is_floating_point():
        a = a.float()
    return a


def _source(X: object, layer: str | None) -> _Source:
    if _is_bank(X):
        layers = list(X.layers)
        if layer is None:
            if len(layers) != 1:
                raise InputError(
                    f"the bank holds several layers ({', '.join(layers)}); pass layer=... "
                    "to say which one to factorise"
                )
            layer = layers[0]
        if not isinstance(layer, str):
            raise InputError(f"layer must be a layer name from the bank, got {layer!r}")
        if layer not in layers:
            raise LayerNotFoundError(
                f"layer {layer!r} is not in the bank; {close_matches(layer, layers)}"
            )
        try:
            n = len(X)
        except TypeError:
            n = None
        if n == 0:
            raise InputError("the activation bank is empty: extract activations first")
        return _Source(bank=X, layer=layer)
    return _Source(tensor=_as_activation(X, "the input"), layer=layer)


def _to_matrix(a: torch.Tensor) -> torch.Tensor:
    """``N x C x H x W`` → ``C x (N·H·W)``; ``N x C`` → ``C x N`` (contiguous)."""
    if a.ndim == 4:
        return a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).contiguous()
    return a.T.contiguous()


def _from_matrix(S: torch.Tensor, like: torch.Size) -> torch.Tensor:
    """``r x (N·H·W)`` → ``N x r x H x W``; ``r x N`` → ``N x r``."""
    if len(like) == 4:
        n, _, h, w = like
        return S.reshape(S.shape[0], n, h, w).permute(1, 0, 2, 3).contiguous()
    return S.T.contiguous()


def _check_finite(a: torch.Tensor, what: str) -> None:
    # A reduction first: no temporary the size of the batch (bounded-memory online mode);
    # the exact element test runs only when the sum is not finite (NaN, inf or overflow).
    if a.numel() == 0 or bool(torch.isfinite(a.sum())):
        return
    if not bool(torch.isfinite(a).all()):
        bad = int((~torch.isfinite(a)).sum())
        raise InputError(
            f"{what} contains {bad} NaN or infinite values; NMF needs finite activations "
            "(check the model and the inputs for overflow, or clean the bank)"
        )


# --------------------------------------------------------------------------------------------
# The estimator
# --------------------------------------------------------------------------------------------


class NMFConcepts(Head):
    """Non-negative factorisation of a layer's activations into concepts (:doc:`/methods/nmf`).

    ``X ≈ M S`` with ``X`` the activations as a ``C x (N·H·W)`` matrix, ``M ≥ 0`` (``C x r``)
    the concept basis and ``S ≥ 0`` (``r x N·H·W``) the concept scores.

    Parameters
    ----------
    rank : int
        Number of concepts ``r`` (``1 ≤ r < C``). The thesis found 4 too coarse and 256
        redundant on faces; 32 was best there (:doc:`/methods/nmf`). See :func:`select_rank`.
    solver : {"hals", "mu"}
        ``"hals"``: hierarchical alternating least squares (Cichocki & Phan 2009) with
        several sweeps per update (Gillis & Glineur 2012) and extrapolation (Ang & Gillis
        2019), see :func:`~xnn_toolkit.heads._nmf_solvers.fit_full`. ``"mu"``: Lee & Seung's
        multiplicative updates, as scikit-learn's ``mu`` solver.
    init : {"nndsvda", "nndsvd", "nndsvdar", "random"}
        Initialisation, as scikit-learn's (NNDSVD of Boutsidis & Gallopoulos 2008).
    max_iter : int
        Maximum outer iterations (in-memory) or passes over the data (online).
    tol : float
        Stop when an iteration (a pass, online) lowers ``½||X − MS||²`` by less than
        ``tol`` times its value.
    random_state : int or None
        Seeds the randomized SVD of the initialisation (and ``nndsvdar``/``random``).
        The global torch RNG is never touched.
    device : str, torch.device or None
        Where to compute; ``None``: the device of the input tensor (CPU for banks).
    online : bool
        Stream the data in batches of ``batch_size`` images and never hold ``X`` whole:
        mini-batch NMF with exact sufficient statistics ``S Sᵀ``, ``S Xᵀ`` (Mairal et al.
        2010 with replacement, see :func:`~xnn_toolkit.heads._nmf_solvers.fit_online`).
        Memory: one batch plus ``n_batches·(C·r + r²)`` floats. For banks larger than memory.
    batch_size : int
        Images (rows of the input) per batch, for ``online=True``, :meth:`transform` and the
        negative-value checks.
    negative : {"error", "clip", "shift"}
        Activations must be non-negative (post-ReLU). ``"error"``: raise
        :class:`~xnn_toolkit.errors.InputError` on negative entries; ``"clip"``: use
        ``max(X, 0)``; ``"shift"``: add per channel ``shift_ = max(0, −min X)`` (measured at
        fit time, negative leftovers of new data are clipped) and subtract it again in
        :meth:`inverse_transform`.
    transform_max_iter : int
        Maximum HALS sweeps of the NNLS projection in :meth:`transform`.

    Attributes
    ----------
    components_ : Tensor, ``C x r``
        The basis ``M``. Columns have unit L2 norm and are sorted by decreasing total
        score over the fitting data (concept 0 carries the most activation mass).
    reconstruction_err_ : float
        ``||X − MS||_F`` on the fitting data (scikit-learn's convention).
    relative_err_ : float
        ``||X − MS||_F / ||X||_F``.
    n_iter_ : int
        Outer iterations (in-memory) or passes (online) done.
    shift_ : Tensor, ``C``
        Per-channel shift added before factorising (zeros unless ``negative="shift"``).
    layer_ : str or None
        The bank layer fitted (or the ``layer`` passed to :meth:`fit`).
    spatial_ : bool
        Whether the fitting data were conv maps (``N x C x H x W``).
    n_channels_ : int
        ``C``.

    Examples
    --------
    >>> nmf = NMFConcepts(rank=8).fit(bank, layer="layer3")           # doctest: +SKIP
    >>> scores = nmf.transform(acts)          # N x 8 x H x W           # doctest: +SKIP
    """

    def __init__(
        self,
        rank: int = 8,
        *,
        solver: str = "hals",
        init: str = "nndsvda",
        max_iter: int = 200,
        tol: float = 1e-4,
        random_state: int | None = 0,
        device: str | torch.device | None = None,
        online: bool = False,
        batch_size: int = 128,
        negative: str = "error",
        transform_max_iter: int = 500,
    ) -> None:
        self.rank = rank
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.device = device
        self.online = online
        self.batch_size = batch_size
        self.negative = negative
        self.transform_max_iter = transform_max_iter

    # ---------------------------------------------------------------- validation helpers

    def _check_params(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"{name} must be a positive int, got {v!r}")

        positive_int("rank")
        positive_int("max_iter")
        positive_int("batch_size")
        positive_int("transform_max_iter")
        for name, options in (("solver", _SOLVERS), ("init", _INITS), ("negative", _NEGATIVE)):
            if getattr(self, name) not in options:
                raise InputError(
                    f"{name} must be one of {', '.join(map(repr, options))}, "
                    f"got {getattr(self, name)!r}"
                )
        if not isinstance(self.tol, int | float) or self.tol < 0:
            raise InputError(f"tol must be a non-negative number, got {self.tol!r}")
        if self.random_state is not None and not isinstance(self.random_state, int):
            raise InputError(f"random_state must be an int or None, got {self.random_state!r}")

    def _compute_device(self, a: torch.Tensor | None) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return a.device if a is not None else torch.device("cpu")

    def _generator(self, device: torch.device) -> torch.Generator:
        g = torch.Generator(device=device)
        if self.random_state is None:
            g.seed()
        else:
            g.manual_seed(int(self.random_state))
        return g

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X) first (or load())"
            )

    def _prepare(
        self, a: torch.Tensor, device: torch.device, what: str, shift: torch.Tensor | None
    ) -> torch.Tensor:
        """Cast, move, check finiteness and apply the negative-value policy."""
        a = a.to(device=device, dtype=torch.float32)
        _check_finite(a, what)
        if self.negative == "shift" and shift is not None:
            view = (1, -1, 1, 1) if a.ndim == 4 else (1, -1)
            a = (a + shift.to(device).view(view)).clamp_min_(0)
        elif self.negative == "clip":
            a = a.clamp_min(0)
        elif self.negative == "error" and a.numel() and float(a.min()) < 0:
            raise InputError(
                f"{what} has negative entries (min {float(a.min()):.4g}); NMF needs "
                "non-negative activations: read a post-ReLU layer, or pass "
                "negative='clip' (use max(X, 0)) or negative='shift' (add -min per channel)"
            )
        return a

    # ---------------------------------------------------------------------------- fitting

    @keeps_global_rng
    def fit(self, X: object, y: object = None, *, layer: str | None = None) -> NMFConcepts:
        """Learn the concept basis ``M`` from activations.

        Parameters
        ----------
        X : Tensor or activation bank
            ``N x C x H x W`` (conv maps), ``N x C`` (vectors), or a bank (then ``layer``).
        y : ignored
            For API compatibility; see :class:`PerClassNMF` for per-class factorisations.
        layer : str, optional
            The bank layer (needed when the bank has several). With a tensor it is only
            recorded in ``layer_`` (used as the default by :func:`nmf_faithfulness`).

        Returns
        -------
        NMFConcepts
            ``self``.
        """
        self._fit(X, layer)
        return self

    @keeps_global_rng
    def fit_transform(
        self, X: object, y: object = None, *, layer: str | None = None
    ) -> torch.Tensor:
        """Fit and return the scores of the fitting data.

        Parameters
        ----------
        X, y, layer
            As :meth:`fit`.

        Returns
        -------
        Tensor
            ``N x r x H x W`` for conv input, ``N x r`` for vectors (the factor ``S`` of the
            fit itself in memory; the NNLS projection when ``online=True``).
        """
        S = self._fit(X, layer)
        if S is None:
            return self.transform(X, layer=layer)
        return S

    def _fit(self, X: object, layer: str | None) -> torch.Tensor | None:
        self._check_params()
        src = _source(X, layer)
        if self.online:
            self._fit_online(src)
            return None
        a = src.full()
        device = self._compute_device(a)
        what = src.describe()
        shift = self._measure_shift([a], device, what) if self.negative == "shift" else None
        a = self._prepare(a, device, what, shift)
        if a.shape[0] == 0:
            raise InputError(f"{what} is empty: NMF needs at least one example")
        Xm = _to_matrix(a)
        shape = a.shape
        del a  # the (possibly clipped or shifted) copy is no longer needed
        C, P = Xm.shape
        self._check_rank(C, P, what)
        gen = self._generator(device)
        M0, S0 = self._initial(Xm, gen)
        res = _solvers.fit_full(
            Xm,
            M0,
            S0,
            solver=self.solver,
            max_iter=self.max_iter,
            tol=float(self.tol),
            extrapolate=self.solver == "hals",
        )
        xx = _solvers.sq_norm(Xm)
        M, S = self._normalise(res.M, res.S)
        err2 = 2.0 * res.objective
        self._set_fitted(M, shift, C, len(shape) == 4, src.layer, res.n_iter, err2, xx)
        return _from_matrix(S, shape)

    def _check_rank(self, C: int, P: int | None, what: str) -> None:
        if self.rank >= C:
            raise InputError(
                f"rank={self.rank} must be smaller than the number of channels C={C} of "
                f"{what} (with r >= C the factorisation is trivial); choose rank <= {C - 1}"
            )
        if P is not None and self.rank > P:
            raise InputError(
                f"rank={self.rank} is larger than the number of positions N·H·W={P} of "
                f"{what}; use more images or a smaller rank"
            )

    def _initial(self, Xm: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.init == "random":
            return _solvers.random_init(Xm, self.rank, generator=gen)
        return _solvers.nndsvd_init(Xm, self.rank, self.init, generator=gen)

    def _measure_shift(
        self, batches: Iterable[torch.Tensor], device: torch.device, what: str
    ) -> torch.Tensor:
        low = None
        for b in batches:
            b = b.to(device=device, dtype=torch.float32)
            _check_finite(b, what)
            dims = (0, 2, 3) if b.ndim == 4 else (0,)
            m = b.amin(dim=dims) if b.shape[0] else None
            if m is not None:
                low = m if low is None else torch.minimum(low, m)
        if low is None:
            raise InputError(f"{what} is empty: NMF needs at least one example")
        return (-low).clamp_min(0)

    def _fit_online(self, src: _Source) -> None:
        what = src.describe()
        first = next(iter(src.batches(self.batch_size)), None)
        if first is None or first.shape[0] == 0:
            raise InputError(f"{what} is empty: NMF needs at least one example")
        device = self._compute_device(first if src.tensor is not None else None)
        shift = None
        if self.negative == "shift":
            shift = self._measure_shift(src.batches(self.batch_size), device, what)

        spatial = first.ndim == 4

        def blocks() -> Iterator[torch.Tensor]:
            for b in src.batches(self.batch_size):
                if b.shape[0]:
                    yield _to_matrix(self._prepare(b, device, what, shift))

        X0 = _to_matrix(self._prepare(first, device, what, shift))
        C = X0.shape[0]
        self._check_rank(C, X0.shape[1], what + " (first batch; raise batch_size)")
        M0, _ = self._initial(X0, self._generator(device))
        del X0, first
        res = _solvers.fit_online(
            blocks, M0, solver=self.solver, max_epochs=self.max_iter, tol=float(self.tol)
        )
        # One more pass: the exact error of the final basis and the score mass per concept.
        err2 = xx = 0.0
        mass = torch.zeros(self.rank, dtype=torch.float64, device=device)
        G = res.M.T @ res.M
        for Xb in blocks():
            Sb = _solvers.nnls_project(res.M, Xb, max_sweeps=self.transform_max_iter, tol=_NNLS_TOL)
            xb2 = _solvers.sq_norm(Xb)
            err2 += 2.0 * _solvers.objective(xb2, Sb, res.M.T @ Xb, G, Sb @ Sb.T)
            xx += xb2
            mass += Sb.sum(dim=1).double()
        M, _ = self._normalise(res.M, None, mass=mass)
        self._set_fitted(M, shift, C, spatial, src.layer, res.n_epochs, err2, xx)

    def _normalise(
        self, M: torch.Tensor, S: torch.Tensor | None, mass: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unit-norm columns of ``M`` (scores rescaled) and concepts sorted by score mass."""
        norms = M.norm(dim=0)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        M = M / scale
        if S is not None:
            S = S * scale[:, None]
            mass = S.sum(dim=1).double()
        else:
            mass = mass * scale.double()
        order = torch.argsort(mass, descending=True, stable=True)
        M = M[:, order].contiguous()
        S = S[order].contiguous() if S is not None else None
        return M, S

    def _set_fitted(
        self,
        M: torch.Tensor,
        shift: torch.Tensor | None,
        C: int,
        spatial: bool,
        layer: str | None,
        n_iter: int,
        err2: float,
        xx: float,
    ) -> None:
        self.components_ = M
        self.shift_ = shift if shift is not None else torch.zeros(C, device=M.device)
        self.n_channels_ = C
        self.spatial_ = bool(spatial)
        self.layer_ = layer
        self.n_iter_ = int(n_iter)
        self.reconstruction_err_ = math.sqrt(max(err2, 0.0))
        self.relative_err_ = self.reconstruction_err_ / math.sqrt(xx) if xx > 0 else 0.0

    # -------------------------------------------------------------------------- transform

    def transform(self, X: object, *, layer: str | None = None) -> torch.Tensor:
        """Concept scores of (new) activations: the NNLS projection with ``M`` fixed.

        ``S = argmin_{S ≥ 0} ||X − M S||²_F`` column by column (:doc:`/methods/nmf`), solved in
        batches of ``batch_size`` images by HALS coordinate descent (at most
        ``transform_max_iter`` sweeps, until a sweep changes ``S`` by ≤ 1e-6 relative).

        Parameters
        ----------
        X : Tensor or activation bank
            ``N x C x H x W`` or ``N x C`` (same ``C`` as the fit), or a bank and ``layer``
            (default: ``layer_``).

        Returns
        -------
        Tensor
            ``N x r x H x W`` (conv) or ``N x r`` (vectors), float32, on the compute device.
        """
        self._check_fitted()
        src = _source(X, layer if layer is not None or not _is_bank(X) else self.layer_)
        out = [self._transform_batch(b, src.describe()) for b in src.batches(self.batch_size)]
        if not out:
            raise InputError(f"{src.describe()} is empty: nothing to transform")
        return torch.cat(out)

    def _transform_batch(self, a: torch.Tensor, what: str) -> torch.Tensor:
        device = self._compute_device(a)
        if a.shape[1] != self.n_channels_:
            raise InputError(
                f"{what} has {a.shape[1]} channels, the basis was fitted on "
                f"{self.n_channels_}; transform activations of the same layer"
            )
        a = self._prepare(a, device, what, self.shift_)
        if a.shape[0] == 0:
            shape = (0, self.rank, *a.shape[2:])
            return torch.zeros(shape, device=device)
        M = self.components_.to(device)
        S = _solvers.nnls_project(
            M, _to_matrix(a), max_sweeps=self.transform_max_iter, tol=_NNLS_TOL
        )
        return _from_matrix(S, a.shape)

    def inverse_transform(self, S: torch.Tensor) -> torch.Tensor:
        """Reconstruct activations from scores: ``M S`` (minus ``shift_``).

        Parameters
        ----------
        S : Tensor
            ``N x r x H x W`` or ``N x r``.

        Returns
        -------
        Tensor
            ``N x C x H x W`` or ``N x C``, on the device of ``S``.
        """
        self._check_fitted()
        if not isinstance(S, torch.Tensor) or S.ndim not in (2, 4) or S.shape[1] != self.rank:
            raise InputError(
                f"scores must be N x {self.rank} x H x W or N x {self.rank}, "
                f"got {getattr(S, 'shape', type(S).__name__)}"
            )
        M = self.components_.to(device=S.device, dtype=S.dtype)
        shift = self.shift_.to(device=S.device, dtype=S.dtype)
        if S.ndim == 4:
            return torch.einsum("cr,nrhw->nchw", M, S) - shift.view(1, -1, 1, 1)
        return S @ M.T - shift

    def reconstruct(self, X: torch.Tensor) -> torch.Tensor:
        """``inverse_transform(transform(X))``: the activation as the concepts explain it.

        Parameters
        ----------
        X : Tensor, ``N x C x H x W`` or ``N x C``

        Returns
        -------
        Tensor, same shape as ``X``
        """
        return self.inverse_transform(self.transform(X))

    # ------------------------------------------------------------- attribution surrogate

    def as_target_module(self, *, pool: bool = False) -> nn.Module:
        """A module mapping the layer activation to (surrogate) concept scores.

        The NNLS projection is not a layer Excitation Backprop can propagate through, so the
        module computes the linear surrogate ``S ≈ relu(M⁺ X)`` (``M⁺ = pinv(M)``, ``r x C``)
        as a 1x1 convolution ``C → r`` without bias followed by a ReLU (``nn.Linear`` for
        vector layers). It equals the NNLS scores wherever those are all positive, and is
        their least-squares relaxation elsewhere: heatmaps of a concept computed through
        this module explain the surrogate, not the exact projection. With
        ``negative="shift"`` the conv gets the bias ``M⁺ shift_`` (EB ignores biases).
        Parameters are frozen (``requires_grad=False``).

        Parameters
        ----------
        pool : bool
            For conv layers, append a global average pooling and a flatten, so the output is
            one score per concept and image (``N x r``) and ``index=k`` targets concept ``k``
            over the whole image (Excitation Backprop splits average pooling proportionally).

        Returns
        -------
        nn.Module
            ``nn.Sequential(conv1x1 or linear, nn.ReLU()[, nn.AdaptiveAvgPool2d(1),
            nn.Flatten()])``; input ``N x C x H x W`` (``N x C``), output ``N x r x H x W``
            (``N x r`` with ``pool`` or for vectors). Use it as
            ``HeadOutput(layer, head=nmf.as_target_module(pool=True), index=k)``.
        """
        self._check_fitted()
        M = self.components_
        pinv = torch.linalg.pinv(M.double()).to(M.dtype)  # r x C
        shift = self.shift_.to(M.device)
        has_bias = bool((shift != 0).any())
        if self.spatial_:
            lin: nn.Module = nn.Conv2d(self.n_channels_, self.rank, 1, bias=has_bias)
            weight = pinv[:, :, None, None]
        else:
            lin = nn.Linear(self.n_channels_, self.rank, bias=has_bias)
            weight = pinv
        lin = lin.to(device=M.device, dtype=M.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
            if has_bias:
                lin.bias.copy_(pinv @ shift)
        lin.requires_grad_(False)
        if pool and self.spatial_:
            return nn.Sequential(lin, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return nn.Sequential(lin, nn.ReLU())

    # ---------------------------------------------------------------------- persistence

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {
            "components": self.components_.detach().cpu().contiguous(),
            "shift": self.shift_.detach().cpu().contiguous(),
        }
        attrs = {
            "reconstruction_err_": self.reconstruction_err_,
            "relative_err_": self.relative_err_,
            "n_iter_": self.n_iter_,
            "layer_": self.layer_,
            "spatial_": self.spatial_,
            "n_channels_": self.n_channels_,
        }
        return tensors, attrs

    def _restore(self, tensors: dict[str, torch.Tensor], attrs: dict[str, Any]) -> None:
        M, shift = tensors["components"], tensors["shift"]
        if M.ndim != 2 or M.shape[1] != self.rank or shift.shape != (M.shape[0],):
            raise AssetError(
                f"stored NMF tensors have inconsistent shapes: components {tuple(M.shape)}, "
                f"shift {tuple(shift.shape)}, rank {self.rank}"
            )
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        self.components_ = M.float().to(device)
        self.shift_ = shift.float().to(device)
        if not isinstance(attrs, dict):
            raise TypeError(f"attrs must be a JSON object, got {type(attrs).__name__}")
        for k, v in attrs.items():
            # only what _state writes: a file must not replace methods, settings or tensors
            if k not in (
                "reconstruction_err_",
                "relative_err_",
                "n_iter_",
                "layer_",
                "spatial_",
                "n_channels_",
            ):
                raise ValueError(f"unexpected attribute {k!r}")
            setattr(self, k, v)

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted basis and settings to one ``.safetensors`` file (no pickle).

        Tensors ``components`` (``C x r``) and ``shift`` (``C``); hyperparameters and learned
        scalars as JSON in the file's metadata. Written atomically (temp file + rename).

        Parameters
        ----------
        path : str or PathLike
        """
        self._check_fitted()
        tensors, attrs = self._state()
        _write_safetensors(path, tensors, "NMFConcepts", self._json_params(), attrs)

    def _json_params(self) -> dict[str, Any]:
        params = self.get_params()
        if params["device"] is not None:
            params["device"] = str(params["device"])
        return params

    @classmethod
    def load(cls, path: str | os.PathLike) -> NMFConcepts:
        """Read an estimator written by :meth:`save`.

        Raises
        ------
        AssetError
            The file is missing, not a safetensors file, or not an NMFConcepts file.
        """
        tensors, meta = _read_safetensors(path, "NMFConcepts")
        try:
            est = cls(**meta["params"])
            est._check_params()
            est._restore(tensors, meta["attrs"])
        except (KeyError, TypeError, ValueError, AttributeError, InputError) as exc:
            raise AssetError(
                f"{os.fspath(path)!r} does not hold valid NMFConcepts settings "
                f"({type(exc).__name__}: {exc}); save the estimator again"
            ) from None
        return est


# --------------------------------------------------------------------------------------------
# safetensors + JSON persistence
# --------------------------------------------------------------------------------------------


def _write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    kind: str,
    params: dict[str, Any],
    attrs: Any,
) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    meta = {
        "format": _FORMAT,
        "version": str(_FORMAT_VERSION),
        "kind": kind,
        "params": json.dumps(params),
        "attrs": json.dumps(attrs),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _read_safetensors(
    path: str | os.PathLike, kind: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AssetError(f"no saved {kind} at {path!r}; check the path (save() writes one file)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise AssetError(f"{path!r} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != _FORMAT or meta.get("kind") != kind:
        raise AssetError(
            f"{path!r} is not a saved {kind} (format {meta.get('format')!r}, kind "
            f"{meta.get('kind')!r}); load it with the class that saved it"
        )
    try:
        out = {"params": json.loads(meta["params"]), "attrs": json.loads(meta["attrs"])}
    except (KeyError, json.JSONDecodeError) as exc:
        raise AssetError(f"{path!r} has corrupt NMF metadata: {exc}") from exc
    return tensors, out


# --------------------------------------------------------------------------------------------
# Per-class factorisations
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rank selection
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Concept maps
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Faithfulness: the network run with the layer replaced by M S
# --------------------------------------------------------------------------------------------


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
    if not isinstance(nmf, NMFConcepts | PerClassNMF):
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
    if isinstance(nmf, PerClassNMF):
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
    if not isinstance(nmf, PerClassNMF):
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
    rank = nmf.estimators_[0].rank if isinstance(nmf, PerClassNMF) else nmf.rank
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
