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
- :class:`~xnn_toolkit.heads.PerClassNMF` — one factorisation per class (wraps a template
  ``NMFConcepts``), :func:`~xnn_toolkit.heads.select_rank` /
  :class:`~xnn_toolkit.heads.RankTable` — reconstruction error against the rank,
  :func:`~xnn_toolkit.heads.concept_maps`, :func:`~xnn_toolkit.heads.top_images` — maps
  upsampled to image size, top images (all in :mod:`xnn_toolkit.heads.nmf_tools`).
- :func:`~xnn_toolkit.metrics.nmf_faithfulness` /
  :class:`~xnn_toolkit.metrics.NMFFaithfulness` and
  :func:`~xnn_toolkit.metrics.concept_importance` (in :mod:`xnn_toolkit.metrics.concepts`) —
  run the network with the layer replaced by ``M S`` (:doc:`/methods/nmf`, last bullets but one).

Data may be a tensor (``N x C x H x W`` or ``N x C``) or an activation bank, duck-typed as
an object with ``layers``, ``labels``, ``activations(layer) -> Tensor`` and
``iter_batches(layer, batch_size) -> Iterator[Tensor]`` (``xnn_toolkit.bank.ActivationBank``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._io import atomic_write
from ..errors import AssetError, InputError, LayerNotFoundError, NotFittedError, close_matches
from . import _nmf_solvers as _solvers
from ._base import Head, keeps_global_rng

__all__ = ["NMFConcepts"]

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
        Where the head computes; ``None``: where its input is (the activations' device; CPU
        for a bank). The same meaning for every head.
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


# --------------------------------------------------------------------------------------------
# Rank selection
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Concept maps
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Faithfulness: the network run with the layer replaced by M S
# --------------------------------------------------------------------------------------------
