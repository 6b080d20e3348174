"""Post-hoc NMF concepts (xnn_toolkit.heads.nmf, docs/methods/nmf.rst).

Oracles: scikit-learn's NMF (NNDSVD initialisation, ``cd`` and ``mu`` updates, final error),
scipy.optimize.nnls (the projection), planted factors, hand-built networks whose layer is
exactly low rank, and literal re-implementations (hooks written by hand) for the
intervention-based scores.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, nnls
from sklearn.decomposition import NMF as SkNMF
from sklearn.decomposition import non_negative_factorization
from sklearn.decomposition._nmf import _initialize_nmf
from torch import nn

from xnn_toolkit.errors import AssetError, InputError, LayerNotFoundError, NotFittedError
from xnn_toolkit.heads import (
    NMFConcepts,
    PerClassNMF,
    concept_maps,
    select_rank,
    top_images,
)
from xnn_toolkit.heads import _nmf_solvers as solvers
from xnn_toolkit.metrics import NMFFaithfulness, concept_importance, nmf_faithfulness

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def acts() -> torch.Tensor:
    """Post-ReLU activations of a small random-weight CNN on random images: 24 x 32 x 8 x 8."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, stride=2),
        nn.ReLU(),
    )
    with torch.no_grad():
        return net(torch.rand(24, 3, 32, 32, generator=_gen(1)))


def _matrix(a: torch.Tensor) -> torch.Tensor:
    return a.permute(1, 0, 2, 3).reshape(a.shape[1], -1).contiguous()


def _rel_err(X: np.ndarray, W: np.ndarray, H: np.ndarray) -> float:
    X, W, H = (np.asarray(v, dtype=np.float64) for v in (X, W, H))
    return float(np.linalg.norm(X - W @ H) / np.linalg.norm(X))


class FakeBank:
    """The duck-typed activation bank: layers, labels, activations(), iter_batches()."""

    def __init__(self, acts: dict[str, torch.Tensor], labels=None, forbid_full=False):
        self._acts = acts
        self.layers = list(acts)
        n = next(iter(acts.values())).shape[0]
        self.labels = labels if labels is not None else torch.full((n,), -1)
        self.forbid_full = forbid_full
        self.batches_read = 0

    def __len__(self) -> int:
        return next(iter(self._acts.values())).shape[0]

    def activations(self, layer: str) -> torch.Tensor:
        if self.forbid_full:
            raise AssertionError("online mode must not load the whole layer")
        return self._acts[layer].clone()

    def iter_batches(self, layer: str, batch_size: int):
        a = self._acts[layer]
        for i in range(0, a.shape[0], batch_size):
            self.batches_read += 1
            yield a[i : i + batch_size].clone()


class LowRankNet(nn.Module):
    """conv(3→r) + ReLU, then a non-negative 1x1 conv (r→C): the ``mix`` output has rank r."""

    def __init__(self, r: int = 3, C: int = 12, classes: int = 5) -> None:
        super().__init__()
        g = _gen(7)
        self.stem = nn.Conv2d(3, r, 3, padding=1)
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(r, C, 1, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.rand(C, r, 1, 1, generator=g))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.mix(self.act(self.stem(x)))).flatten(1))


def _model_state(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


def _assert_same_state(model: nn.Module, before) -> None:
    after = _model_state(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k
    assert before[1:] == after[1:]


# --------------------------------------------------------------------------------------------
# Solver steps against scikit-learn
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["nndsvd", "nndsvda"])
def test_nndsvd_matches_sklearn(acts, variant):
    # 15 x 200 at r = 5: scikit-learn's randomized SVD samples r + 10 = 15 directions, i.e.
    # the whole column space, so both sides compute the exact SVD.
    X = _matrix(acts)[:15, :200]
    M, S = solvers.nndsvd_init(X.double(), 5, variant, generator=_gen())
    W, H = _initialize_nmf(X.double().numpy(), 5, init=variant, random_state=0)
    np.testing.assert_allclose(M.numpy(), W, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(S.numpy(), H, rtol=1e-6, atol=1e-8)


def test_randomized_svd_path_close_to_exact():
    # 64 x 5000 with r = 4 takes the randomized range finder.
    g = _gen(3)
    X = torch.rand(64, 6, generator=g) @ torch.rand(6, 5000, generator=g)
    X += 0.01 * torch.rand(64, 5000, generator=g)
    U, s, Vh = solvers._top_svd(X, 4, _gen())
    s_exact = torch.linalg.svdvals(X.double())[:4]
    np.testing.assert_allclose(s.double().numpy(), s_exact.numpy(), rtol=1e-4)
    recon = (U * s) @ Vh
    exact = torch.linalg.svd(X.double(), full_matrices=False)
    ref = (exact.U[:, :4] * exact.S[:4]) @ exact.Vh[:4]
    assert float((recon.double() - ref).norm() / ref.norm()) < 1e-3


def _sk_steps(X, W0, H0, solver, n):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        W, H, _ = non_negative_factorization(
            X,
            W=W0.copy(),
            H=H0.copy(),
            n_components=W0.shape[1],
            init="custom",
            solver=solver,
            max_iter=n,
            tol=0.0,
            random_state=0,
        )
    return W, H


@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_update_rules_match_sklearn_iterate_by_iterate(acts, solver):
    X = _matrix(acts)[:, :300].double()
    W0, H0 = _initialize_nmf(X.numpy(), 4, init="nndsvda", random_state=0)
    Mt = torch.from_numpy(W0.T.copy())
    S = torch.from_numpy(H0.copy())
    n = 6
    for _ in range(n):
        # scikit-learn order: basis (W) then scores (H).
        if solver == "cd":
            solvers.hals_sweep(Mt, S @ X.T, S @ S.T)
            solvers.hals_sweep(S, Mt @ X, Mt @ Mt.T)
        else:
            solvers.mu_step(Mt, S @ X.T, S @ S.T)
            solvers.mu_step(S, Mt @ X, Mt @ Mt.T)
    W, H = _sk_steps(X.numpy(), W0, H0, solver, n)
    np.testing.assert_allclose(Mt.T.numpy(), W, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(S.numpy(), H, rtol=1e-9, atol=1e-12)


def test_fit_full_without_extrapolation_is_sklearn_cd(acts):
    X = _matrix(acts)[:, :300].double()
    W0, H0 = _initialize_nmf(X.numpy(), 4, init="nndsvda", random_state=0)
    n = 5
    # After iteration k the solver holds (M_k, S_{k-1}); stop at k = n + 1 to compare S_n.
    res = solvers.fit_full(
        X,
        torch.from_numpy(W0.copy()),
        torch.from_numpy(H0.copy()),
        max_iter=n + 1,
        tol=0.0,
        extrapolate=False,
        inner=1,
    )
    W, H = _sk_steps(X.numpy(), W0, H0, "cd", n)
    np.testing.assert_allclose(res.S.numpy(), H, rtol=1e-9, atol=1e-12)
    W1, _ = _sk_steps(X.numpy(), W0, H0, "cd", n + 1)
    np.testing.assert_allclose(res.M.numpy(), W1, rtol=1e-9, atol=1e-12)
    # The tracked objective is the true one of the returned pair.
    true = 0.5 * float(((X - res.M @ res.S) ** 2).sum())
    assert res.objective == pytest.approx(true, rel=1e-9)


def test_objective_from_statistics_is_exact():
    g = _gen(4)
    X = torch.rand(10, 50, generator=g, dtype=torch.float64)
    M = torch.rand(10, 3, generator=g, dtype=torch.float64)
    S = torch.rand(3, 50, generator=g, dtype=torch.float64)
    f = solvers.objective(float((X**2).sum()), M.T, S @ X.T, S @ S.T, M.T @ M)
    assert f == pytest.approx(0.5 * float(((X - M @ S) ** 2).sum()), rel=1e-12)


def test_extrapolated_hals_is_monotone_and_converges(acts):
    X = _matrix(acts)
    M0, S0 = solvers.nndsvd_init(X, 6, generator=_gen())
    res = solvers.fit_full(X, M0, S0, max_iter=300, tol=1e-6)
    accepted = np.minimum.accumulate(res.history)
    assert res.objective == pytest.approx(accepted[-1])
    assert res.n_iter < 300
    assert float(res.M.min()) >= 0 and float(res.S.min()) >= 0


# --------------------------------------------------------------------------------------------
# Estimator against scikit-learn's NMF
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, 8])
def test_reconstruction_error_within_one_percent_of_sklearn(acts, rank):
    X = _matrix(acts)
    Xn = X.T.double().numpy()  # scikit-learn: samples x features
    sk_err = {}
    for solver in ("cd", "mu"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sk = SkNMF(rank, solver=solver, init="nndsvda", random_state=0)
            W = sk.fit_transform(Xn)
        sk_err[solver] = _rel_err(Xn, W, sk.components_)
    # default solver (HALS) against scikit-learn's best; our MU against its MU
    for solver, ref in (("hals", min(sk_err.values())), ("mu", sk_err["mu"])):
        ours = NMFConcepts(rank, solver=solver).fit(acts)
        S = ours.transform(acts)
        rel = _rel_err(X.numpy(), ours.components_.numpy(), _matrix(S).numpy())
        assert ours.relative_err_ <= 1.01 * ref, (solver, ours.relative_err_, sk_err)
        # relative_err_ is the error of the fit's own pair: the projection can only be better.
        assert rel <= ours.relative_err_ * (1 + 1e-4)


def test_reconstruction_err_attribute_is_the_true_error(acts):
    nmf = NMFConcepts(5)
    S = nmf.fit_transform(acts)
    X = _matrix(acts).double()
    err = float((X - nmf.components_.double() @ _matrix(S).double()).norm())
    assert nmf.reconstruction_err_ == pytest.approx(err, rel=1e-4)
    assert nmf.relative_err_ == pytest.approx(err / float(X.norm()), rel=1e-4)


def test_planted_factors_are_recovered():
    g = _gen(11)
    C, r, P = 40, 5, 3000
    W = torch.rand(C, r, generator=g) * (torch.rand(C, r, generator=g) < 0.3)
    W[torch.arange(r) * 3, torch.arange(r)] = 2.0  # one anchor channel per concept
    H = torch.rand(r, P, generator=g) * (torch.rand(r, P, generator=g) < 0.4)
    X = W @ H + 1e-3 * torch.rand(C, P, generator=g)
    a = X.T.contiguous()  # N x C vectors
    nmf = NMFConcepts(r, max_iter=500, tol=1e-7).fit(a)
    S = nmf.transform(a).T

    def cos(A, B):
        A = A / A.norm(dim=0, keepdim=True)
        B = B / B.norm(dim=0, keepdim=True)
        return (A.T @ B).numpy()

    cm = cos(nmf.components_, W)
    rows, cols = linear_sum_assignment(-cm)
    assert cm[rows, cols].min() >= 0.99
    cs = cos(S.T, H.T)
    assert cs[rows, cols].min() >= 0.99


def test_deterministic_given_random_state(acts):
    a = NMFConcepts(4, random_state=3).fit(acts).components_
    b = NMFConcepts(4, random_state=3).fit(acts).components_
    assert torch.equal(a, b)


def test_components_are_unit_norm_and_sorted_by_mass(acts):
    nmf = NMFConcepts(5)
    S = nmf.fit_transform(acts)
    np.testing.assert_allclose(nmf.components_.norm(dim=0).numpy(), 1.0, rtol=1e-5)
    mass = S.sum(dim=(0, 2, 3))
    assert torch.all(mass[:-1] >= mass[1:])
    assert S.shape == (24, 5, 8, 8)


def test_vector_input_shapes(acts):
    v = acts.mean(dim=(2, 3))  # N x C
    nmf = NMFConcepts(3).fit(v)
    S = nmf.transform(v)
    assert S.shape == (24, 3) and nmf.inverse_transform(S).shape == v.shape
    assert not nmf.spatial_


# --------------------------------------------------------------------------------------------
# Projection (transform)
# --------------------------------------------------------------------------------------------


def test_transform_is_the_nnls_projection(acts):
    nmf = NMFConcepts(4).fit(acts)
    new = acts[:2, :, :3, :3] * 1.5 + 0.1  # new data: 2 images, 3 x 3
    S = nmf.transform(new)
    assert S.shape == (2, 4, 3, 3)
    M = nmf.components_.double().numpy()
    X = _matrix(new).double().numpy()
    S_mat = _matrix(S).double().numpy()
    for j in range(X.shape[1]):
        ref, _ = nnls(M, X[:, j])
        np.testing.assert_allclose(S_mat[:, j], ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())


def test_nnls_project_against_scipy_ill_posed_columns():
    g = _gen(5)
    M = torch.rand(12, 4, generator=g)
    X = torch.rand(12, 30, generator=g)  # mostly not in the cone: active constraints
    S = solvers.nnls_project(M, X, max_sweeps=5000, tol=1e-9)
    for j in range(30):
        ref, _ = nnls(M.double().numpy(), X[:, j].double().numpy())
        np.testing.assert_allclose(S[:, j].numpy(), ref, atol=2e-5)


def test_inverse_transform_is_MS(acts):
    nmf = NMFConcepts(3).fit(acts)
    S = nmf.transform(acts[:2])
    rec = nmf.inverse_transform(S)
    ref = torch.einsum("cr,nrhw->nchw", nmf.components_, S)
    torch.testing.assert_close(rec, ref)
    torch.testing.assert_close(nmf.reconstruct(acts[:2]), ref)


# --------------------------------------------------------------------------------------------
# Banks and the online mode
# --------------------------------------------------------------------------------------------


def test_bank_input_equals_tensor_input(acts):
    bank = FakeBank({"layer3": acts, "fc": acts.mean(dim=(2, 3))})
    a = NMFConcepts(4).fit(bank, layer="layer3")
    b = NMFConcepts(4).fit(acts)
    torch.testing.assert_close(a.components_, b.components_)
    assert a.layer_ == "layer3"
    torch.testing.assert_close(a.transform(bank), b.transform(acts))


def test_online_mode_streams_and_matches_in_memory(acts):
    bank = FakeBank({"layer3": acts}, forbid_full=True)
    online = NMFConcepts(4, online=True, batch_size=5, max_iter=50, tol=1e-6).fit(bank)
    full = NMFConcepts(4).fit(acts)
    assert bank.batches_read >= 5  # 24 images in batches of 5, several passes
    assert online.relative_err_ <= full.relative_err_ * 1.02
    # Its reported error is the true error of its basis with the NNLS scores.
    S = online.transform(acts)
    X = _matrix(acts).double()
    err = float((X - online.components_.double() @ _matrix(S).double()).norm())
    assert online.reconstruction_err_ == pytest.approx(err, rel=1e-3)


def test_online_objective_decreases_per_pass(acts):
    X = _matrix(acts)
    blocks = lambda: solvers.iter_columns(X, 256)  # noqa: E731
    M0, _ = solvers.nndsvd_init(X[:, :256], 4, generator=_gen())
    res = solvers.fit_online(blocks, M0, max_epochs=8, tol=0.0)
    h = np.array(res.history)
    assert np.all(np.diff(h[1:]) <= 1e-6 * h[1:-1])  # from the second pass on: monotone


def test_bank_layer_errors(acts):
    bank = FakeBank({"layer3": acts, "layer4": acts})
    with pytest.raises(InputError, match="several layers"):
        NMFConcepts(3).fit(bank)
    with pytest.raises(LayerNotFoundError, match="layer3"):
        NMFConcepts(3).fit(bank, layer="layer33")
    with pytest.raises(InputError, match="empty"):
        NMFConcepts(3).fit(FakeBank({"l": acts[:0]}))
    with pytest.raises(InputError, match="empty"):
        NMFConcepts(3, online=True).fit(FakeBank({"l": acts[:0]}))


def test_real_activation_bank(acts):
    from xnn_toolkit.bank import ActivationBank

    bank = ActivationBank.from_tensors({"layer3": acts})
    a = NMFConcepts(4).fit(bank, layer="layer3")
    torch.testing.assert_close(a.components_, NMFConcepts(4).fit(acts).components_)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_negative_input_policies(acts):
    neg = acts - 0.05
    with pytest.raises(InputError, match="negative='clip'"):
        NMFConcepts(3).fit(neg)
    clip = NMFConcepts(3, negative="clip").fit(neg)
    ref = NMFConcepts(3).fit(neg.clamp_min(0))
    torch.testing.assert_close(clip.components_, ref.components_)
    shift = NMFConcepts(3, negative="shift").fit(neg)
    expected = (-neg.amin(dim=(0, 2, 3))).clamp_min(0)
    torch.testing.assert_close(shift.shift_, expected)
    shifted = NMFConcepts(3).fit(neg + expected.view(1, -1, 1, 1))
    torch.testing.assert_close(shift.components_, shifted.components_)
    # inverse_transform returns to the original (unshifted) activation space
    rec = shift.reconstruct(neg)
    ref_rec = shifted.reconstruct(neg + expected.view(1, -1, 1, 1)) - expected.view(1, -1, 1, 1)
    torch.testing.assert_close(rec, ref_rec)
    with pytest.raises(InputError, match="negative"):
        NMFConcepts(3).fit(acts).transform(neg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 32}, "smaller than the number of channels"),
        ({"rank": 40}, "smaller than the number of channels"),
        ({"rank": 0}, "rank"),
        ({"solver": "cd"}, "solver"),
        ({"init": "svd"}, "init"),
        ({"negative": "abs"}, "negative"),
        ({"tol": -1}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_parameters(acts, kwargs, match):
    with pytest.raises(InputError, match=match):
        NMFConcepts(**kwargs).fit(acts)


def test_bad_values(acts):
    bad = acts.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        NMFConcepts(3).fit(bad)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="NaN or infinite"):
        NMFConcepts(3, online=True).fit(bad)
    with pytest.raises(InputError, match="N x C x H x W"):
        NMFConcepts(3).fit(acts[0])
    with pytest.raises(InputError, match="empty"):
        NMFConcepts(3).fit(acts[:0])
    with pytest.raises(InputError, match="positions"):
        NMFConcepts(10).fit(acts[:1, :, :3, :3])
    with pytest.raises(NotFittedError):
        NMFConcepts(3).transform(acts)
    nmf = NMFConcepts(3).fit(acts)
    with pytest.raises(InputError, match="channels"):
        nmf.transform(acts[:, :10])
    with pytest.raises(InputError, match="scores"):
        nmf.inverse_transform(torch.zeros(2, 4, 3, 3))


# --------------------------------------------------------------------------------------------
# Per-class factorisations and rank selection
# --------------------------------------------------------------------------------------------


def test_per_class_equals_separate_fits(acts):
    y = torch.arange(24) % 3
    pc = PerClassNMF(NMFConcepts(3)).fit(acts, y)
    assert pc.classes_.tolist() == [0, 1, 2]
    assert pc.components_.shape == (3, 32, 3)
    for c in range(3):
        ref = NMFConcepts(3).fit(acts[y == c])
        torch.testing.assert_close(pc.components_[c], ref.components_)
    S = pc.transform(acts, y)
    for c in range(3):
        ref = NMFConcepts(3).fit(acts[y == c])
        torch.testing.assert_close(S[y == c], ref.transform(acts[y == c]))
    rec = pc.inverse_transform(S, y)
    assert rec.shape == acts.shape
    # labels from the bank; the online template streams the bank class by class
    bank = FakeBank({"l": acts}, labels=y, forbid_full=True)
    pco = PerClassNMF(NMFConcepts(3, online=True, batch_size=4, max_iter=30)).fit(bank)
    assert pco.components_.shape == (3, 32, 3)
    with pytest.raises(InputError, match="no fitted factorisation"):
        pc.transform(acts[:2], torch.tensor([0, 7]))
    with pytest.raises(InputError, match="labels"):
        PerClassNMF().fit(acts)


def test_select_rank_table(acts):
    table = select_rank(acts, ranks=(2, 4, 8), estimator=NMFConcepts(solver="hals"))
    assert table.ranks == [2, 4, 8]
    for r, err in zip(table.ranks, table.relative_err):
        assert err == pytest.approx(NMFConcepts(r).fit(acts).relative_err_, rel=1e-6)
    assert table.relative_err[0] > table.relative_err[1] > table.relative_err[2]
    md = table.to_markdown()
    assert md.count("\n") == 4 and "| 8 |" in md
    with pytest.raises(InputError, match="smaller than"):
        select_rank(acts, ranks=(64,))


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, acts):
    nmf = NMFConcepts(4, negative="shift", tol=1e-5).fit(acts - 0.01, layer="mix")
    path = tmp_path / "nmf.safetensors"
    nmf.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["nmf.safetensors"]  # no temp left
    back = NMFConcepts.load(path)
    assert back._saved_params() == nmf._saved_params()
    torch.testing.assert_close(back.components_, nmf.components_)
    torch.testing.assert_close(back.shift_, nmf.shift_)
    for attr in ("reconstruction_err_", "relative_err_", "n_iter_", "layer_", "spatial_"):
        assert getattr(back, attr) == getattr(nmf, attr)
    torch.testing.assert_close(back.transform(acts[:3]), nmf.transform(acts[:3]))
    # no pickle: the file is safetensors with a JSON header
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert json.loads(header["__metadata__"]["params"])["rank"] == 4

    y = torch.arange(24) % 2
    pc = PerClassNMF(NMFConcepts(3)).fit(acts, y)
    pc.save(tmp_path / "pc.safetensors")
    pc2 = PerClassNMF.load(tmp_path / "pc.safetensors")
    torch.testing.assert_close(pc2.components_, pc.components_)
    torch.testing.assert_close(pc2.transform(acts, y), pc.transform(acts, y))


def test_load_errors(tmp_path, acts):
    with pytest.raises(AssetError, match="no saved"):
        NMFConcepts.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(AssetError, match="not a readable"):
        NMFConcepts.load(junk)
    pc = PerClassNMF(NMFConcepts(3)).fit(acts, torch.arange(24) % 2)
    pc.save(tmp_path / "pc.safetensors")
    with pytest.raises(AssetError, match="not a saved NMFConcepts"):
        NMFConcepts.load(tmp_path / "pc.safetensors")
    with pytest.raises(NotFittedError):
        NMFConcepts(3).save(tmp_path / "x.safetensors")
    assert not os.path.exists(tmp_path / "x.safetensors")


# --------------------------------------------------------------------------------------------
# Attribution surrogate
# --------------------------------------------------------------------------------------------


def test_target_module_is_relu_pinv_conv(acts):
    nmf = NMFConcepts(3).fit(acts)
    mod = nmf.as_target_module()
    conv, relu = mod[0], mod[1]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.bias is None
    assert isinstance(relu, nn.ReLU)
    assert not any(p.requires_grad for p in mod.parameters())
    pinv = np.linalg.pinv(nmf.components_.double().numpy())
    np.testing.assert_allclose(conv.weight[:, :, 0, 0].numpy(), pinv, rtol=1e-4, atol=1e-5)
    # Where the NNLS scores are interior (all positive) the surrogate equals them.
    g = _gen(9)
    S = 0.5 + torch.rand(2, 3, 4, 4, generator=g)
    X = nmf.inverse_transform(S)
    torch.testing.assert_close(mod(X), S, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(nmf.transform(X), S, rtol=1e-4, atol=1e-4)
    pooled = nmf.as_target_module(pool=True)
    torch.testing.assert_close(pooled(X), mod(X).mean(dim=(2, 3)))
    # vectors -> Linear
    lin = NMFConcepts(3).fit(acts.mean(dim=(2, 3))).as_target_module()
    assert isinstance(lin[0], nn.Linear)


# --------------------------------------------------------------------------------------------
# Concept maps
# --------------------------------------------------------------------------------------------


def test_concept_maps_and_top_images():
    g = _gen(2)
    S = torch.rand(5, 3, 4, 4, generator=g)
    maps = concept_maps(S, 16)
    ref = torch.nn.functional.interpolate(S, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(maps, ref)
    norm = concept_maps(S, (8, 12), normalize=True)
    assert norm.shape == (5, 3, 8, 12)
    np.testing.assert_allclose(norm.amax(dim=(0, 2, 3)).numpy(), 1.0, rtol=1e-6)
    values, idx = top_images(S, k=2)
    for k in range(3):
        peaks = [float(S[i, k].max()) for i in range(5)]
        order = sorted(range(5), key=lambda i: -peaks[i])[:2]
        assert idx[k].tolist() == order
        np.testing.assert_allclose(values[k].numpy(), [peaks[i] for i in order], rtol=1e-6)
    _, idx_mean = top_images(S, k=5, reduce="mean")
    assert idx_mean[0, 0] == int(S[:, 0].mean(dim=(1, 2)).argmax())


# --------------------------------------------------------------------------------------------
# Faithfulness through the network
# --------------------------------------------------------------------------------------------


def _low_rank_setup():
    torch.manual_seed(0)
    model = LowRankNet()
    x = torch.rand(10, 3, 16, 16, generator=_gen(8))
    with torch.no_grad():
        captured = {}
        h = model.mix.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
        model(x)
        h.remove()
    return model, x, captured["a"]


def test_faithfulness_exact_low_rank_layer():
    model, x, a = _low_rank_setup()
    model.train()  # the guard must put it back in train mode
    before = _model_state(model)
    nmf = NMFConcepts(3, max_iter=1000, tol=1e-9).fit(a, layer="mix")
    assert nmf.relative_err_ < 1e-3
    rep = nmf_faithfulness(model, x, nmf, batch_size=4)
    assert isinstance(rep, NMFFaithfulness)
    assert rep.agreement == 1.0 and rep.n_images == 10 and rep.layer == "mix"
    assert rep.logit_rel_err < 1e-3 and rep.activation_rel_err < 1e-3
    _assert_same_state(model, before)


def test_faithfulness_matches_hand_hook_and_detects_bad_factorisation():
    model, x, a = _low_rank_setup()
    nmf = NMFConcepts(1).fit(a, layer="mix")  # rank 1 < 3: lossy
    rep = nmf_faithfulness(model, [(x[:6], None), (x[6:], None)], nmf)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        h = model.mix.register_forward_hook(lambda m, i, o: nmf.reconstruct(o))
        rec = model(x)
        h.remove()
    d = (rec - ref).double()
    assert rep.logit_mae == pytest.approx(float(d.abs().mean()), rel=1e-5)
    assert rep.logit_rel_err == pytest.approx(float(d.norm() / ref.double().norm()), rel=1e-5)
    agree = float((rec.argmax(1) == ref.argmax(1)).double().mean())
    assert rep.agreement == pytest.approx(agree)
    assert rep.activation_rel_err == pytest.approx(nmf.relative_err_, rel=1e-3)
    assert rep.activation_rel_err > 0.01


def test_faithfulness_restores_model_on_error():
    model, x, a = _low_rank_setup()
    before = _model_state(model)
    nmf = NMFConcepts(3).fit(a[:, :5], layer="mix")  # wrong channel count for the layer
    with pytest.raises(InputError, match="channels"):
        nmf_faithfulness(model, x, nmf)
    _assert_same_state(model, before)
    with pytest.raises(InputError, match="layer"):
        nmf_faithfulness(model, x, NMFConcepts(3).fit(a))


def test_concept_importance_against_hand_hooks():
    model, x, a = _low_rank_setup()
    nmf = NMFConcepts(3, max_iter=500).fit(a, layer="mix")
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    imp_all = concept_importance(model, x, nmf, batch_size=4)
    imp_cls = concept_importance(model, x, nmf, y=y, batch_size=3)
    model.eval()
    with torch.no_grad():
        S = nmf.transform(a)
        base = model.fc(model.pool(nmf.inverse_transform(S)).flatten(1)).double()
        ref_all = torch.zeros(3, 5, dtype=torch.float64)
        ref_cls = torch.zeros(3, 5, dtype=torch.float64)
        for k in range(3):
            Sk = S.clone()
            Sk[:, k] = 0
            out = model.fc(model.pool(nmf.inverse_transform(Sk)).flatten(1)).double()
            drop = base - out
            ref_all[k] = drop.mean(0)
            for c in range(5):
                ref_cls[k, c] = drop[y == c, c].mean()
    torch.testing.assert_close(imp_all, ref_all, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(imp_cls, ref_cls, rtol=1e-4, atol=1e-5)


def test_per_class_faithfulness_uses_each_images_class():
    model, x, a = _low_rank_setup()
    y = torch.tensor([0, 1] * 5)
    pc = PerClassNMF(NMFConcepts(3, max_iter=1000, tol=1e-9)).fit(a, y, layer="mix")
    rep = nmf_faithfulness(model, x, pc, y=y)
    assert rep.agreement == 1.0 and rep.logit_rel_err < 1e-3


def test_concept_heatmap_through_attribution_engine():
    # Excitation Backprop through the pooled surrogate head, read at the layer itself: the
    # average pool splits the top signal in proportion to the concept map s_k(h, w) and the
    # z+ rule of the 1x1 conv conserves it per position, so the channel-summed MWP map is
    # s_k / sum(s_k) (docs/methods/excitation.rst).
    from xnn_toolkit import attribution

    model, x, a = _low_rank_setup()
    nmf = NMFConcepts(3).fit(a, layer="mix")
    before = _model_state(model)
    att = attribution.explain(
        model,
        x[:2],
        attribution.HeadOutput("mix", nmf.as_target_module(pool=True), 1),
        method="mwp",
        layer="mix",
    )
    s = nmf.as_target_module()(a[:2])[:, 1]
    expected = s / s.sum(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(att.raw.sum(dim=1), expected, rtol=1e-4, atol=1e-6)
    _assert_same_state(model, before)
