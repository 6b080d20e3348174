"""Solver steps for post-hoc NMF of activations (:doc:`/methods/nmf`).

Problem (:doc:`/methods/nmf`, Khorram 2020 eq. 2.3)::

    min_{M ≥ 0, S ≥ 0}  f(M, S) = ½ ||X − M S||²_F,
    X ∈ R^{C x P} (X ≥ 0),  M ∈ R^{C x r},  S ∈ R^{r x P}

with ``P = N·H·W`` positions. Every update below works on a *row-factor* ``F`` (``r x n``) and
two sufficient statistics of the other factor: a cross term ``A`` (``r x n``) and a Gram
matrix ``B`` (``r x r``). For the basis, ``F = Mᵀ``, ``A = S Xᵀ``, ``B = S Sᵀ``; for the
scores, ``F = S``, ``A = Mᵀ X``, ``B = Mᵀ M``. In both cases the sub-problem is
``min_{F ≥ 0} ½ tr(Fᵀ B F) − tr(Fᵀ A)``, so one function serves both and the online mode
only has to accumulate ``A`` and ``B``.

Everything is float32 on the device of its inputs; small reductions (objective values) are
taken in float64 because ``||X||² − 2⟨M, X Sᵀ⟩ + ⟨MᵀM, S Sᵀ⟩`` cancels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

# Same constant as scikit-learn's NMF (``np.finfo(np.float32).eps``): replaces exact zeros in
# multiplicative-update denominators.
_EPS = float(torch.finfo(torch.float32).eps)


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _top_svd(
    X: torch.Tensor, k: int, generator: torch.Generator, n_iter: int = 2, oversample: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading ``k`` singular triplets of ``X`` (``C x P``).

    Exact (LAPACK) when the matrix is small, otherwise the randomized range finder of Halko,
    Martinsson & Tropp (2011, Alg. 4.4) with ``n_iter`` QR-stabilised power iterations, as
    scikit-learn's ``randomized_svd``. The random test matrix comes from ``generator`` so that
    the global torch RNG is never touched.

    Returns
    -------
    U : Tensor, ``C x k``
    s : Tensor, ``k``
    Vh : Tensor, ``k x P``
    """
    C, P = X.shape
    q = min(k + oversample, C, P)
    if min(C, P) <= 2 * q:
        U, s, Vh = torch.linalg.svd(X.double(), full_matrices=False)
        return U[:, :k].to(X.dtype), s[:k].to(X.dtype), Vh[:k].to(X.dtype)
    omega = torch.randn(P, q, generator=generator, device=X.device, dtype=X.dtype)
    Q = torch.linalg.qr(X @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(X.T @ Q).Q
        Q = torch.linalg.qr(X @ Q).Q
    B = Q.T @ X  # q x P
    Ub, s, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub)[:, :k], s[:k], Vh[:k]


def nndsvd_init(
    X: torch.Tensor,
    rank: int,
    variant: str = "nndsvda",
    *,
    generator: torch.Generator,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NNDSVD initialisation (Boutsidis & Gallopoulos 2008), scikit-learn's variants.

    With ``X ≈ Σ_j σ_j u_j v_jᵀ`` (leading ``rank`` triplets): component 0 is
    ``√σ₀ |u₀|, √σ₀ |v₀|``; for ``j ≥ 1`` split ``u_j = u⁺ − u⁻``, ``v_j = v⁺ − v⁻``, keep the
    pair with the larger ``||u^±|| ||v^±||`` (= ``m``), and set
    ``M_j = √(σ_j m) u^± / ||u^±||``, ``S_j = √(σ_j m) v^± / ||v^±||``. Entries below ``eps``
    become 0; ``nndsvda`` then fills zeros with ``mean(X)``, ``nndsvdar`` with
    ``|N(0, 1)| · mean(X) / 100``. The construction is invariant to the sign of each singular
    pair, so the result does not depend on the SVD's sign convention.

    Parameters
    ----------
    X : Tensor, ``C x P``, non-negative float32
    rank : int
    variant : {"nndsvd", "nndsvda", "nndsvdar"}
    generator : torch.Generator
        Random source of the randomized SVD and of ``nndsvdar``.
    eps : float
        Truncation threshold.

    Returns
    -------
    M : Tensor, ``C x rank``
    S : Tensor, ``rank x P``
    """
    U, s, Vh = _top_svd(X, rank, generator)
    M = torch.zeros(X.shape[0], rank, dtype=X.dtype, device=X.device)
    S = torch.zeros(rank, X.shape[1], dtype=X.dtype, device=X.device)
    M[:, 0] = s[0].sqrt() * U[:, 0].abs()
    S[0] = s[0].sqrt() * Vh[0].abs()
    for j in range(1, rank):
        x, y = U[:, j], Vh[j]
        xp, yp = x.clamp_min(0), y.clamp_min(0)
        xn, yn = (-x).clamp_min(0), (-y).clamp_min(0)
        xpn, ypn, xnn, ynn = xp.norm(), yp.norm(), xn.norm(), yn.norm()
        mp, mn = xpn * ypn, xnn * ynn
        pos = bool(mp > mn)
        u, v, sigma = (xp / xpn, yp / ypn, mp) if pos else (xn / xnn, yn / ynn, mn)
        lbd = (s[j] * sigma).sqrt()
        M[:, j] = lbd * u
        S[j] = lbd * v
    M[M < eps] = 0
    S[S < eps] = 0
    if variant == "nndsvda":
        avg = X.mean()
        M[M == 0] = avg
        S[S == 0] = avg
    elif variant == "nndsvdar":
        avg = X.mean()
        for F in (M, S):
            zero = F == 0
            noise = torch.randn(
                int(zero.sum()), generator=generator, device=X.device, dtype=X.dtype
            )
            F[zero] = (avg * noise / 100).abs()
    elif variant != "nndsvd":
        raise ValueError(f"unknown NNDSVD variant {variant!r}")
    return M, S


def random_init(
    X: torch.Tensor, rank: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's ``init="random"``: ``|N(0, 1)| · √(mean(X) / r)`` for both factors.

    Returns
    -------
    M : Tensor, ``C x rank``
    S : Tensor, ``rank x P``
    """
    scale = (X.mean() / rank).sqrt()
    M = torch.randn(X.shape[0], rank, generator=generator, device=X.device, dtype=X.dtype)
    S = torch.randn(rank, X.shape[1], generator=generator, device=X.device, dtype=X.dtype)
    return (M.abs_() * scale), (S.abs_() * scale)


# --------------------------------------------------------------------------------------------
# Update rules on a row factor F (r x n) with cross term A (r x n) and Gram B (r x r)
# --------------------------------------------------------------------------------------------


def _scaled(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``A_k / B_kk`` and ``B_kj / B_kk`` with a zero diagonal, for rows with ``B_kk > 0``."""
    diag = B.diagonal()
    rows = [k for k, v in enumerate(diag.tolist()) if v > 0]
    d = torch.where(diag > 0, diag, torch.ones_like(diag))[:, None]
    Bz = B / d
    Bz.fill_diagonal_(0)
    return A / d, Bz, rows


def _sweep_scaled(F: torch.Tensor, As: torch.Tensor, Bz: torch.Tensor, rows: list[int]) -> None:
    for k in rows:
        # (A_k − Σ_{j≠k} B_kj F_j) / B_kk in one gemv, then the projection on F ≥ 0.
        F[k] = torch.addmv(As[k], F.T, Bz[k], alpha=-1.0).clamp_min_(0)


def hals_sweep(F: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """One HALS sweep over the rows of ``F``, in place (Cichocki & Phan 2009).

    For ``k = 1..r`` in order (Gauss–Seidel: later rows see the earlier updates)::

        F_k ← max(0, F_k + (A_k − B_k F) / B_kk) = max(0, (A_k − Σ_{j≠k} B_kj F_j) / B_kk)

    which is the exact minimiser of the sub-problem in row ``k`` with the others fixed.
    This is scikit-learn's ``cd`` update (``shuffle=False``) written by rows. A row whose
    ``B_kk`` is 0 (a dead component) is left unchanged, as scikit-learn does.

    Parameters
    ----------
    F : Tensor, ``r x n``
        Updated in place.
    A : Tensor, ``r x n``
        Cross statistic (``Mᵀ X`` or ``S Xᵀ``).
    B : Tensor, ``r x r``
        Gram statistic (``Mᵀ M`` or ``S Sᵀ``).

    Returns
    -------
    Tensor, scalar
        ``||F_new − F_old||²_F`` (not synchronised).
    """
    old = F.clone()
    _sweep_scaled(F, *_scaled(A, B))
    return (F - old).pow_(2).sum()


def hals_inner(
    F: torch.Tensor, A: torch.Tensor, B: torch.Tensor, max_sweeps: int, delta: float
) -> int:
    """Repeat :func:`hals_sweep` while it pays (Gillis & Glineur 2012, accelerated HALS).

    The statistics ``A``, ``B`` cost ``O(C·P·r)`` to form and a sweep only ``O(n·r²)``, so it
    is worth sweeping several times per outer iteration. Stop after ``max_sweeps`` or when a
    sweep changes ``F`` by less than ``delta`` times the first sweep's change
    (``||ΔF_l||_F ≤ δ ||ΔF_1||_F``).

    Returns
    -------
    int
        Number of sweeps done.
    """
    As, Bz, rows = _scaled(A, B)
    first = None
    for sweep in range(1, max_sweeps + 1):
        old = F.clone()
        _sweep_scaled(F, As, Bz, rows)
        change = float((F - old).pow_(2).sum())
        if first is None:
            first = change
        if change <= delta * delta * first or change == 0.0:
            return sweep
    return max_sweeps


def mu_step(F: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    """Multiplicative update (Lee & Seung 2001) for the Frobenius loss, in place.

    ``F ← F ⊙ A / (B F)``, where exact zeros of the denominator are replaced by the float32
    machine epsilon, as in scikit-learn's ``mu`` solver. Zeros of ``F`` stay zero.
    """
    denom = B @ F
    denom = torch.where(denom == 0, torch.full_like(denom, _EPS), denom)
    F.mul_(A / denom)


def _inner_budget(n_cols: int, n_other: int, rank: int, alpha: float) -> int:
    """Gillis & Glineur's inner-iteration budget ``⌊1 + α ρ⌋`` for a factor with ``n_cols``.

    ``ρ = 1 + (n_cols·n_other + n_other·r) / (n_cols·(r + 1))`` is the cost of forming the
    statistics over the cost of one sweep. Capped at 100 (Python overhead per sweep).
    """
    rho = 1.0 + (n_cols * n_other + n_other * rank) / (n_cols * (rank + 1))
    return max(1, min(100, int(1 + alpha * rho)))


def objective(
    xx: float, Ft: torch.Tensor, A: torch.Tensor, G_other: torch.Tensor, G_self: torch.Tensor
) -> float:
    """``½||X − M S||²_F`` from statistics, without forming ``M S``.

    ``||X − MS||² = ||X||² − 2⟨F, A⟩ + ⟨F Fᵀ, B⟩`` for either factor ``F`` (``r x n``) with its
    cross term ``A`` and the other factor's Gram ``B`` (here ``G_other``; ``G_self = F Fᵀ``).
    Taken in float64; clamped at 0.
    """
    cross = (Ft.double() * A.double()).sum()
    quad = (G_self.double() * G_other.double()).sum()
    return max(0.0, 0.5 * float(xx - 2.0 * cross + quad))


# --------------------------------------------------------------------------------------------
# Full-batch solvers
# --------------------------------------------------------------------------------------------


@dataclass
class SolverResult:
    """What a full-batch solver returns.

    Attributes
    ----------
    M : Tensor, ``C x r``
    S : Tensor, ``r x P``
    n_iter : int
        Outer iterations done.
    objective : float
        ``½||X − MS||²`` tracked at the last iteration (from statistics).
    history : list of float
        Objective at the start of each outer iteration.
    """

    M: torch.Tensor
    S: torch.Tensor
    n_iter: int
    objective: float
    history: list[float]


def fit_full(
    X: torch.Tensor,
    M: torch.Tensor,
    S: torch.Tensor,
    *,
    solver: str = "hals",
    max_iter: int = 200,
    tol: float = 1e-4,
    extrapolate: bool = True,
    alpha: float = 0.5,
    delta: float = 0.1,
    inner: int | None = None,
    stop: Callable[[int, float], bool] | None = None,
) -> SolverResult:
    """Alternate basis and score updates on an in-memory ``X`` (``C x P``).

    Iteration ``k`` (basis first, as scikit-learn's solvers)::

        M_k  = update(M_{k−1}; A = Ŝ_{k−1} Xᵀ, B = Ŝ_{k−1} Ŝ_{k−1}ᵀ)
        f_k  = ½||X − M_k Ŝ_{k−1}||²                 (from A, B: no extra product)
        M̂_k  = max(0, M_k + β_k (M_k − M_{k−1}))
        S_k  = update(S_{k−1}; A = M̂_kᵀ X, B = M̂_kᵀ M̂_k)
        Ŝ_k  = max(0, S_k + β_k (S_k − S_{k−1}))

    ``update`` is :func:`hals_inner` (``inner`` fixed sweeps, or Gillis & Glineur's budget with
    ``alpha``/``delta`` when ``inner`` is None) for ``solver="hals"``, one :func:`mu_step` for
    ``"mu"``. With ``extrapolate`` the momentum ``β_k`` follows Ang & Gillis (2019,
    "Accelerating NMF algorithms using extrapolation"): start at 0.5; after an iteration
    that lowered ``f``: ``β ← min(β̄, 1.01 β)``, ``β̄ ← min(1, 1.005 β̄)``; after one that raised
    it, the iteration is discarded, ``β̄ ← β``, ``β ← β / 1.5``, and a plain score update from
    the best pair so far follows, so the next basis update cannot raise ``f`` (two failures
    in a row mean numerical convergence). Without extrapolation (``β = 0``), one sweep per
    update is exactly scikit-learn's ``cd`` solver (same order, same rule).

    Convergence: stop when an accepted iteration lowers ``f`` by less than ``tol·f`` (relative
    change of the objective), when ``f = 0``, or after ``max_iter`` iterations.
    ``stop(k, ||X − M_k Ŝ_{k−1}||_F)`` may end the loop early (the benchmark uses it to time
    "reach error e"). The returned pair is the last accepted ``(M_k, Ŝ_{k−1})``, whose
    objective is known exactly.

    Parameters
    ----------
    X : Tensor, ``C x P``
    M : Tensor, ``C x r``
        Initial basis.
    S : Tensor, ``r x P``
        Initial scores.

    Returns
    -------
    SolverResult
    """
    C, P = X.shape
    r = M.shape[1]
    xx = sq_norm(X)
    inner_M = inner or _inner_budget(C, P, r, alpha)
    inner_S = inner or _inner_budget(P, C, r, alpha)
    beta, beta_bar = (0.5, 1.0) if extrapolate else (0.0, 0.0)

    def update(F: torch.Tensor, A: torch.Tensor, B: torch.Tensor, sweeps: int) -> None:
        if solver == "hals":
            hals_inner(F, A, B, sweeps, delta)
        else:
            mu_step(F, A, B)

    Mt_prev = M.T.contiguous()
    S_prev = S.clone()
    S_hat = S_prev
    best = (Mt_prev, S_prev)
    f_prev = float("inf")
    history: list[float] = []
    n_iter = 0
    restarted = False
    for it in range(1, max_iter + 1):
        n_iter = it
        A_M = S_hat @ X.T  # r x C
        B_S = S_hat @ S_hat.T
        Mt = Mt_prev.clone()
        update(Mt, A_M, B_S, inner_M)
        f = objective(xx, Mt, A_M, B_S, Mt @ Mt.T)
        history.append(f)
        if f > f_prev:
            if restarted:  # a plain step from the best pair did not descend: converged
                break
            # The extrapolated point overshot: damp the momentum and take one plain score
            # update from the best pair; the next basis update then cannot increase f.
            beta_bar, beta = beta, beta / 1.5
            Mt_prev, S_start = best
            S_new = S_start.clone()
            update(S_new, Mt_prev @ X, Mt_prev @ Mt_prev.T, inner_S)
            S_hat = S_prev = S_new
            restarted = True
            continue
        restarted = False
        best = (Mt, S_hat)
        done = f <= 1e-12 * xx or (f_prev - f) < tol * f_prev
        f_prev = f
        if done or (stop is not None and stop(it, (2.0 * f) ** 0.5)):
            break
        Mt_hat = (Mt + beta * (Mt - Mt_prev)).clamp_min_(0) if beta else Mt
        Mt_prev = Mt
        A_S = Mt_hat @ X  # r x P
        S_new = S_prev.clone()
        update(S_new, A_S, Mt_hat @ Mt_hat.T, inner_S)
        S_hat = (S_new + beta * (S_new - S_prev)).clamp_min_(0) if beta else S_new
        S_prev = S_new
        if extrapolate:
            beta, beta_bar = min(beta_bar, 1.01 * beta), min(1.0, 1.005 * beta_bar)
    return SolverResult(best[0].T.contiguous(), best[1], n_iter, f_prev, history)


def sq_norm(X: torch.Tensor, chunk: int = 1 << 16) -> float:
    """``||X||²_F`` accumulated in float64, in chunks (no full-size temporary).

    ``torch.linalg.vector_norm`` in float32 was measured 1e-3 off on a 26M-entry matrix,
    which the cancelling objective formula cannot afford.
    """
    flat = X.reshape(-1) if X.is_contiguous() else X.T.reshape(-1)
    total = 0.0
    for j in range(0, flat.numel(), chunk):
        part = flat[j : j + chunk]
        total += float((part * part).sum(dtype=torch.float64))
    return total


# --------------------------------------------------------------------------------------------
# Non-negative least squares projection with the basis fixed
# --------------------------------------------------------------------------------------------


def nnls_project(
    M: torch.Tensor,
    X: torch.Tensor,
    *,
    max_sweeps: int = 500,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Scores of new data with the basis fixed: ``S = argmin_{S ≥ 0} ||X − M S||²_F``.

    :doc:`/methods/nmf` ("keep M fixed and solve the non-negative least-squares projection").
    Each column is an independent strictly convex QP (when ``M`` has full column rank);
    all columns are solved together by HALS coordinate descent (:func:`hals_sweep` with
    ``A = Mᵀ X``, ``B = Mᵀ M``), started from the clipped unconstrained solution
    ``max(0, (MᵀM)⁻¹ MᵀX)``, until a sweep changes ``S`` by at most ``tol·||S||_F``.

    Parameters
    ----------
    M : Tensor, ``C x r``
    X : Tensor, ``C x P``
    max_sweeps : int
    tol : float

    Returns
    -------
    Tensor, ``r x P``
    """
    B = M.T @ M
    A = M.T @ X
    S = (torch.linalg.pinv(B.double()).to(A.dtype) @ A).clamp_min_(0)
    As, Bz, rows = _scaled(A, B)
    for _ in range(max_sweeps):
        old = S.clone()
        _sweep_scaled(S, As, Bz, rows)
        if float((S - old).pow_(2).sum()) <= tol * tol * float((S * S).sum()):
            break
    return S


# --------------------------------------------------------------------------------------------
# Online (streamed) solver
# --------------------------------------------------------------------------------------------


@dataclass
class OnlineResult:
    """What :func:`fit_online` returns.

    Attributes
    ----------
    M : Tensor, ``C x r``
    n_epochs : int
        Passes over the data.
    history : list of float
        Streamed objective ``Σ_b ½||X_b − M_b S_b||²`` of each pass (``M_b``: the basis when
        batch ``b`` was seen).
    """

    M: torch.Tensor
    n_epochs: int
    history: list[float]


def fit_online(
    batches: Callable[[], Iterable[torch.Tensor]],
    M: torch.Tensor,
    *,
    solver: str = "hals",
    max_epochs: int = 20,
    tol: float = 1e-4,
    delta: float = 0.1,
    nnls_sweeps: int = 50,
) -> OnlineResult:
    """Mini-batch NMF with exact sufficient statistics (Mairal et al. 2010, with replacement).

    ``X`` is never held whole: ``batches()`` yields column blocks ``X_b`` (``C x p_b``) in a
    fixed order, once per pass. For each block:

    1. scores ``S_b = NNLS(M, X_b)`` (HALS on ``Mᵀ X_b``, ``Mᵀ M``; at most ``nnls_sweeps``);
    2. statistics ``A_b = S_b X_bᵀ`` (``r x C``) and ``B_b = S_b S_bᵀ`` (``r x r``); the totals
       ``A = Σ_b A_b``, ``B = Σ_b B_b`` *replace* block ``b``'s previous contribution instead of
       adding to it (Mairal et al. 2010 §3.4), so after the first pass they are exactly
       ``S Xᵀ`` and ``S Sᵀ`` for the latest scores of every block;
    3. basis update on ``(A, B)``: :func:`hals_inner` (or one :func:`mu_step`).

    Because the score step solves block ``b``'s NNLS (to ``nnls_sweeps`` HALS sweeps from the
    clipped least-squares start) and the basis step descends on the exact statistics, the
    passes are a block-coordinate descent on the full objective ``Σ_b ½||X_b − M S_b||²``,
    unlike forgetting-factor schemes (scikit-learn's ``MiniBatchNMF``). Memory: one block
    plus ``n_blocks·(C·r + r²)`` floats of statistics.
    Stop when the streamed objective of a pass changes by less than ``tol`` (relative), or
    after ``max_epochs`` passes.

    Parameters
    ----------
    batches : callable
        Returns a fresh iterable of ``C x p_b`` float32 blocks on the solving device.
    M : Tensor, ``C x r``
        Initial basis (copied).

    Returns
    -------
    OnlineResult
    """
    Mt = M.T.contiguous()
    r, C = Mt.shape
    stats: list[tuple[torch.Tensor, torch.Tensor]] = []
    A = torch.zeros(r, C, dtype=Mt.dtype, device=Mt.device)
    B = torch.zeros(r, r, dtype=Mt.dtype, device=Mt.device)
    history: list[float] = []
    n_epochs = 0
    for epoch in range(max_epochs):
        total = 0.0
        for b, Xb in enumerate(batches()):
            G = Mt @ Mt.T
            Sb = nnls_project(Mt.T, Xb, max_sweeps=nnls_sweeps, tol=1e-4)
            Ab = Sb @ Xb.T
            Bb = Sb @ Sb.T
            total += objective(sq_norm(Xb), Mt, Ab, Bb, G)
            if epoch == 0:
                stats.append((Ab, Bb))
                A += Ab
                B += Bb
            else:
                oldA, oldB = stats[b]
                A += Ab - oldA
                B += Bb - oldB
                stats[b] = (Ab, Bb)
            if solver == "hals":
                hals_inner(Mt, A, B, 20, delta)
            else:
                mu_step(Mt, A, B)
        n_epochs = epoch + 1
        history.append(total)
        if len(history) > 1 and (history[-2] - total) < tol * history[-2]:
            break
        if total <= 0.0:
            break
    return OnlineResult(Mt.T.contiguous(), n_epochs, history)


def iter_columns(X: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """Column blocks of a ``C x P`` matrix (views)."""
    for j in range(0, X.shape[1], chunk):
        yield X[:, j : j + chunk]
