"""Tests of class-specific gates (docs/methods/gates.rst) against literal formulas and hand
cases."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xnn_toolkit._guard import HOOK_DICTS, model_guard
from xnn_toolkit.errors import InputError, LayerNotFoundError, NotFittedError
from xnn_toolkit.heads.gate_objective import (
    block_order,
    default_g,
    density_bounds,
    gate_similarity,
    l1_density,
    project_gates,
    sparsity_penalty,
)
from xnn_toolkit.heads.gates import ClassSpecificGates
from xnn_toolkit.metrics import gate_localization, mutual_information_score

C, K = 4, 16


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the machine is shared; tiny tensors run fastest on one thread
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cnn(c: int = C, k: int = K, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, k, 3, padding=1),
        nn.BatchNorm2d(k),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(k, c),
    )


def quadrant_data(n: int = 256, c: int = C, size: int = 16, seed: int = 0):
    """Class q: a bright square in quadrant q, in colour channel q % 3, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    h = size // 2
    for i in range(n):
        q = int(y[i])
        r, col = divmod(q % 4, 2)
        x[i, q % 3, r * h : (r + 1) * h, col * h : (col + 1) * h] += 1.5
    return x, y


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [
            [(d, OrderedDict(getattr(m, d))) for d in HOOK_DICTS if hasattr(m, d)]
            for m in model.modules()
        ],
    )


def assert_same(a, b) -> None:
    sa, ma, ra, ga, ha = a
    sb, mb, rb, gb, hb = b
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert ma == mb and ra == rb and ha == hb
    for x, y in zip(ga, gb):
        assert (x is None and y is None) or torch.equal(x, y)


# --------------------------------------------------------------------------- formulas


def literal_projection(g: np.ndarray) -> np.ndarray:
    out = np.empty_like(g)
    for k in range(g.shape[1]):
        col = np.nan_to_num(g[:, k], nan=0.0)
        top = max(col)
        if top <= 0:
            out[:, k] = 1.0
            continue
        for c in range(g.shape[0]):
            out[c, k] = min(1.0, max(0.0, col[c] / top))
    return out


def test_projection_literal_and_constraint():
    rng = np.random.default_rng(0)
    g = rng.normal(0.3, 0.6, size=(6, 12))
    g[:, 0] = -rng.random(6)  # all negative
    g[:, 1] = 0.0  # all zero
    g[:, 2] = [-1, 0, -2, 0, -3, 0]  # max exactly 0
    g[3, 3] = np.nan  # NaN among positives
    g[:, 4] = [5, 2, -1, 0, 5, 1]  # tie at the maximum
    out = project_gates(torch.from_numpy(g))
    np.testing.assert_allclose(out.numpy(), literal_projection(g), rtol=1e-12, atol=1e-12)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out.amax(0), torch.ones(12, dtype=out.dtype))
    assert torch.equal(out[:, 0], torch.ones(6, dtype=out.dtype))
    # idempotent, and float32 columns have a max of exactly 1
    assert torch.equal(project_gates(out), out)
    g32 = torch.rand(10, 300, generator=torch.Generator().manual_seed(1)) * 0.37
    assert torch.equal(project_gates(g32).amax(0), torch.ones(300))


def test_projection_rejects_bad_shape():
    with pytest.raises(InputError, match="C x K"):
        project_gates(torch.ones(3))


def test_sparsity_penalty_literal_and_gradient():
    rng = np.random.default_rng(1)
    g = rng.uniform(-0.2, 1.0, size=(5, 7))
    total = 0.0
    for c in range(5):
        for k in range(7):
            total += abs(g[c, k])
    for bound in (0.5 * total, total, 2 * total):
        gt = torch.tensor(g, requires_grad=True)
        pen = sparsity_penalty(gt, bound)
        assert float(pen.detach()) == pytest.approx(max(0.0, total - bound), abs=1e-12)
        pen.backward()
        expected = np.sign(g) if total > bound else np.zeros_like(g)
        np.testing.assert_array_equal(gt.grad.numpy(), expected)


def test_density_bounds_default_g():
    g = torch.tensor([[1.0, 0.0, 0.5], [0.25, 1.0, 1.0]])
    assert l1_density(g) == pytest.approx(3.75 / 6)
    assert density_bounds(10, 64, 128.0) == (0.1, 0.2)
    assert default_g(10, 64) == pytest.approx(0.2 * 10 * 64)  # the authors' default
    assert default_g(20, 8) == pytest.approx(0.2 * 20 * 8)
    assert default_g(4, 16) == 32.0  # 0.2·C·K = 12.8 < K would be infeasible
    assert default_g(2, 16) == 32.0  # capped at C·K


def literal_binned_mi(x: np.ndarray, y: np.ndarray, c: int, bins: int) -> np.ndarray:
    from sklearn.metrics import mutual_info_score

    n, k = x.shape
    out = np.zeros((k, c))
    for j in range(k):
        lo, hi = x[:, j].min(), x[:, j].max()
        if hi > lo:
            edges = np.linspace(lo, hi, bins + 1)[1:-1]
            b = np.digitize(x[:, j], edges)
        else:
            b = np.zeros(n, dtype=int)
        for ci in range(c):
            out[j, ci] = mutual_info_score(b, (y == ci).astype(int))
    return out


def test_mutual_information_matches_sklearn_on_bins():
    rng = np.random.default_rng(2)
    n, k, c = 300, 5, 3
    y = rng.integers(0, c, n)
    # bins of width 1/4 on [0, 4]; the end points pin every channel's range
    x = rng.integers(0, 4, size=(n, k)).astype(np.float64) + 0.5
    x[:, 1] = y + 0.5 + 0.1 * rng.random(n)  # informative channel
    x[:, 3] = 7.0  # constant channel: MI 0
    x[:2, [0, 1, 2, 4]] = [[0.0] * 4, [4.0] * 4]
    ours = _ovr_mi(torch.from_numpy(x), torch.from_numpy(y), c, bins=4)
    np.testing.assert_allclose(ours.numpy(), literal_binned_mi(x, y, c, 4), atol=1e-12)
    assert ours[3].abs().max() == 0
    score = mutual_information_score(torch.from_numpy(x), torch.from_numpy(y), c, bins=4).mean
    assert score == pytest.approx(float(ours.max(1).values.mean()))


def test_mutual_information_hand_case():
    # channel 0 equals [y == 0]: I = H([y = 0]) for class 0; channel 1 is constant
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    x = torch.stack([(y == 0).double(), torch.ones(8, dtype=torch.float64)], 1)
    mi = _ovr_mi(x, y, 3, bins=2)
    p = 2 / 8
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(mi[0, 0]) == pytest.approx(h)
    assert float(mi[1].abs().max()) == 0.0


def test_mutual_information_knn_is_sklearn():
    from sklearn.feature_selection import mutual_info_classif

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 120)
    x = rng.normal(size=(120, 4)) + y[:, None] * np.array([1.0, 0, 0, 0])
    ours = _ovr_mi(torch.from_numpy(x), torch.from_numpy(y), 3, estimator="knn", random_state=0)
    for c in range(3):
        ref = mutual_info_classif(x, y == c, random_state=0)
        np.testing.assert_allclose(ours[:, c].numpy(), ref, atol=1e-12)


def test_gate_similarity_literal():
    rng = np.random.default_rng(4)
    n, c, k = 40, 3, 5
    f = rng.random((n, k))
    y = rng.integers(0, c, n)
    y[:3] = 2  # class 2 has images...
    p = y.copy()
    p[y == 2] = 2  # ...all predicted right: no false negatives
    p[(y == 0)] = 1
    p[np.nonzero(y == 0)[0][0]] = 0  # one true positive of class 0
    g = rng.random((c, k))
    g[1] = 0.0  # a zero gate row: cosine 0
    s_tp, s_fn = gate_similarity(
        torch.from_numpy(f), torch.from_numpy(y), torch.from_numpy(p), torch.from_numpy(g)
    )
    for sel, s in (((p == y), s_tp), ((p != y), s_fn)):
        for yi in range(c):
            m = sel & (y == yi)
            if not m.any():
                assert torch.isnan(s[yi]).all()
                continue
            a = f[m].mean(0)
            for ci in range(c):
                den = np.linalg.norm(a) * np.linalg.norm(g[ci])
                ref = float(a @ g[ci] / den) if den > 0 else 0.0
                assert float(s[yi, ci]) == pytest.approx(ref, abs=1e-12)
    assert torch.isnan(s_fn[2]).all()


def test_block_order_hand_case():
    g = torch.tensor(
        [
            [1.0, 0.0, 1.0, 0.2, 1.0],
            [0.0, 1.0, 0.5, 1.0, 1.0],
        ]
    )
    # class 0 columns: 0 (sum 1), 2 (1.5), 4 (2, tie at max -> class 0); class 1: 1 (1), 3 (1.2)
    assert block_order(g).tolist() == [0, 2, 4, 1, 3]


# --------------------------------------------------------------------------- fitting


@pytest.fixture(scope="module")
def data():
    return quadrant_data()


@pytest.fixture(scope="module")
def frozen(data):
    model = tiny_cnn()
    model.train()  # the user's mode, restored after fit
    before = snapshot(model)
    est = ClassSpecificGates(g=0.5 * C * K, epochs=45, batch_size=32, lr=1e-2).fit(model, data)
    return model, before, est


def test_frozen_fit_converges_into_density_bounds(frozen):
    model, before, est = frozen
    lo, hi = density_bounds(C, K, est.g_)
    assert (lo, hi) == (0.25, 0.5)
    assert lo <= est.density_ <= hi
    assert est.gates_.shape == (C, K)
    assert torch.equal(est.gates_.amax(0), torch.ones(K))
    assert float(est.gates_.min()) >= 0
    assert est.layer_ == "6"  # the last stage: the last max-pool
    assert est.std_accuracy_ >= 0.95
    assert est.csg_accuracy_ >= 0.95
    assert est.history_[0]["density"] == pytest.approx(0.5)  # init 0.5, no CSG step yet
    assert sum(len(f) for f in est.class_specific_filters_) > 0


def test_frozen_fit_leaves_model_unchanged(frozen):
    model, before, _ = frozen
    assert_same(snapshot(model), before)
    assert model.training


def test_schedule_and_history(frozen):
    _, _, est = frozen
    paths = [h["path"] for h in est.history_]
    # warmup 3 STD epochs, then the first 1 of every 3 epochs is a CSG epoch
    expected = ["std"] * 3 + (["csg", "std", "std"] * 14)
    assert paths == expected
    for h in est.history_:
        if h["path"] == "std":
            assert math.isnan(h["ce_csg"])
    est2 = ClassSpecificGates(warmup=2, csg_every=3, csg_ratio=2, epochs=8)
    assert [est2._is_csg_epoch(e) for e in range(8)] == [
        False,
        False,
        True,
        True,
        False,
        True,
        True,
        False,
    ]
    # the shortest fit: one warm-up epoch, then a CSG epoch
    assert [ClassSpecificGates(epochs=2, warmup=1)._is_csg_epoch(e) for e in range(2)] == [
        False,
        True,
    ]


def test_class_filters_rule(frozen):
    _, _, est = frozen
    saved = est.gates_
    try:
        est.gates_ = torch.tensor(
            [
                [1.0, 1.0, 0.9, 1.0, 0.1, 1.0],
                [0.0, 0.6, 0.1, 1.0, 1.0, 0.0],
                [0.1, 0.0, 0.1, 0.0, 0.0, 0.0],
                [0.2, 0.0, 0.3, 0.0, 0.2, 0.0],
            ]
        )
        est.n_filters_ = 6
        # 1: class 1 too; 3: shared; 5 before 0 (same gate, more exclusive), then 2
        assert est.class_filters(0).tolist() == [5, 0, 2]
        assert est.class_filters(1).tolist() == [4]
        assert est.class_filters(2).tolist() == []
        assert est.class_filters(0, others=0.05).tolist() == [5]
        with pytest.raises(InputError, match="class index"):
            est.class_filters(4)
    finally:
        est.gates_ = saved
        est.n_filters_ = K


def test_step_loss_is_the_objective():
    torch.manual_seed(0)
    f = torch.rand(6, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    for objective in ("paper", "code"):
        est = ClassSpecificGates(objective=objective, lambda1=0.7, lambda2=0.3)
        head = nn.Linear(5, 3)
        gates = nn.Parameter(torch.rand(3, 5))
        g = 2.0
        w, b, gv = head.weight.detach().clone(), head.bias.detach().clone(), gates.detach().clone()
        opts = (torch.optim.SGD(head.parameters(), lr=0.0), torch.optim.SGD([gates], lr=0.0), None)
        out = est._step(f, y, True, head, gates, g, opts)
        std = F.cross_entropy(f @ w.T + b, y)
        csg = F.cross_entropy((f * gv[y]) @ w.T + b, y)
        pen = max(0.0, float(gv.abs().sum()) - g)
        main = float(std) + 0.7 * float(csg) if objective == "paper" else float(csg)
        assert out["loss"] == pytest.approx(main + 0.3 * pen, rel=1e-6)
        # lr 0: the gates are only projected
        assert torch.allclose(gates.detach(), project_gates(gv))
        out = est._step(f, y, False, head, gates, g, opts)
        assert out["loss"] == pytest.approx(float(std), rel=1e-6)


def test_fit_is_deterministic(data):
    x, y = data
    kw = dict(g=0.5 * C * K, epochs=9, batch_size=64, random_state=3)
    a = ClassSpecificGates(**kw).fit(tiny_cnn(), (x, y))
    b = ClassSpecificGates(**kw).fit(tiny_cnn(), (x, y))
    assert torch.equal(a.gates_, b.gates_)
    assert torch.equal(a.head_.weight, b.head_.weight)


def test_finetune_fit_copies_and_leaves_model_unchanged(data):
    x, y = data
    model = tiny_cnn()
    model.train()
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    before = snapshot(model)
    est = ClassSpecificGates(
        recipe="finetune", g=0.5 * C * K, epochs=45, batch_size=32, lr=1e-2, lr_backbone=1e-3
    ).fit(model, (x, y))
    assert_same(snapshot(model), before)
    assert est.network_ is not model
    assert est.finetune_ == ["3", "4"]  # the conv before the gated pool, and its BN
    changed = [
        k for k, v in est.network_.state_dict().items() if not torch.equal(v, model.state_dict()[k])
    ]
    assert changed and all(k.startswith(("3.", "4.")) for k in changed)
    lo, hi = density_bounds(C, K, est.g_)
    assert lo <= est.density_ <= hi
    assert est.std_accuracy_ >= 0.95
    # evaluate() on the copy: predictions agree with predict()
    scores = est.evaluate(x[:64], y[:64])
    pred = est.predict(x[:64])
    assert scores.std_accuracy == pytest.approx(float((pred == y[:64]).float().mean()))
    assert scores.model_accuracy is None


def test_zero_lambdas_are_the_ungated_control(data):
    # bench/gates.py's control: with lambda1 = lambda2 = 0 the gates take no part in the
    # training, so the fitted network and head cannot depend on how the gates start
    x, y = data[0][:128], data[1][:128]
    kw = dict(
        recipe="finetune",
        lambda1=0.0,
        lambda2=0.0,
        g=0.5 * C * K,
        epochs=6,
        batch_size=32,
        lr_backbone=1e-2,
        random_state=1,
    )
    a = ClassSpecificGates(init=0.5, **kw).fit(tiny_cnn(), (x, y))
    b = ClassSpecificGates(init=0.9, **kw).fit(tiny_cnn(), (x, y))
    sa, sb = a.network_.state_dict(), b.network_.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.head_.weight, b.head_.weight)
    assert torch.equal(a.gates_, torch.ones(C, K)) and torch.equal(b.gates_, torch.ones(C, K))
    assert not torch.equal(sa["3.weight"], tiny_cnn().state_dict()["3.weight"])  # it trained
    # and with gating the init does matter
    g1 = ClassSpecificGates(init=0.5, **dict(kw, lambda1=2.0, lambda2=0.05)).fit(tiny_cnn(), (x, y))
    g2 = ClassSpecificGates(init=0.9, **dict(kw, lambda1=2.0, lambda2=0.05)).fit(tiny_cnn(), (x, y))
    assert not torch.equal(g1.gates_, g2.gates_)


def test_finetune_explicit_blocks_checked(data):
    x, y = data
    model = tiny_cnn()
    with pytest.raises(InputError, match="runs after the gated layer"):
        ClassSpecificGates(recipe="finetune", layer="5", finetune=["9"], epochs=6, g=32.0).fit(
            model, (x, y)
        )
    with pytest.raises(InputError, match="no parameters"):
        ClassSpecificGates(recipe="finetune", finetune=["1"], epochs=6, g=32.0).fit(model, (x, y))
    with pytest.raises(LayerNotFoundError):
        ClassSpecificGates(recipe="finetune", finetune=["nope"], epochs=6, g=32.0).fit(
            model, (x, y)
        )


def test_evaluate_literal(frozen, data):
    model, _, est = frozen
    x, y = data[0][:80], data[1][:80]
    s = est.evaluate(x, y)
    feats = est.transform(x)
    with torch.no_grad(), model_guard(model):  # eval mode, restored afterwards
        ref = nn.Sequential(*list(model.children())[:7])(x).mean((2, 3))
        logits = est.head_(feats)
        gated = est.head_(feats * est.gates_[y])
        model_pred = model(x).argmax(1)
    assert torch.allclose(feats, ref, atol=1e-6)
    assert s.std_accuracy == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert s.csg_accuracy == pytest.approx(float((gated.argmax(1) == y).float().mean()))
    assert s.model_accuracy == pytest.approx(float((model_pred == y).float().mean()))
    assert s.density == pytest.approx(est.density_)
    tp, fn = gate_similarity(feats, y, logits.argmax(1), est.gates_)
    assert torch.allclose(s.s_tp, tp, equal_nan=True)
    assert torch.allclose(s.s_fn, fn, equal_nan=True)
    assert s.mutual_information == pytest.approx(mutual_information_score(feats, y, C).mean)
    assert est.score(x, y) == pytest.approx(s.std_accuracy)
    assert torch.equal(est.predict(x), logits.argmax(1))


def test_dataset_and_loader_inputs(data):
    x, y = data
    ds = [(x[i], int(y[i]), {"extra": i}) for i in range(96)]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[:96], y[:96]), batch_size=32
    )
    a = ClassSpecificGates(g=32.0, epochs=6, batch_size=32).fit(tiny_cnn(), ds)
    b = ClassSpecificGates(g=32.0, epochs=6, batch_size=32).fit(tiny_cnn(), loader)
    c = ClassSpecificGates(g=32.0, epochs=6, batch_size=32).fit(tiny_cnn(), (x[:96], y[:96]))
    assert torch.equal(a.gates_, c.gates_) and torch.equal(b.gates_, c.gates_)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(data):
    x, y = data
    model = tiny_cnn()
    with pytest.raises(InputError, match="no channels to gate"):
        ClassSpecificGates(layer="8", epochs=6).fit(model, (x, y))  # Flatten: N x K
    with pytest.raises(InputError, match="feasible minimum K = 16"):
        ClassSpecificGates(g=15.0, epochs=6).fit(model, (x, y))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 4\)"):
        ClassSpecificGates(g=32.0, epochs=6).fit(model, (x, y + 1))
    with pytest.raises(InputError, match=r"labels must lie in \[0, 3\)"):
        ClassSpecificGates(g=32.0, epochs=6, num_classes=3).fit(model, (x, y))
    with pytest.raises(InputError, match="head_init='model'"):
        ClassSpecificGates(g=32.0, epochs=6, num_classes=5, head_init="model").fit(model, (x, y))
    with pytest.raises(
        InputError, match=r"without their labels; pass fit\(model, \(images, labels\)\)"
    ):
        ClassSpecificGates(epochs=6).fit(model, x)
    with pytest.raises(LayerNotFoundError, match="no layer named"):
        ClassSpecificGates(layer="layer44", epochs=6).fit(model, (x, y))
    with pytest.raises(InputError, match="recipe must be"):
        ClassSpecificGates(recipe="both").fit(model, (x, y))
    with pytest.raises(InputError, match="only recipe='finetune'"):
        ClassSpecificGates(finetune=["3"]).fit(model, (x, y))
    with pytest.raises(InputError, match="no CSG epoch"):
        ClassSpecificGates(epochs=3, warmup=3).fit(model, (x, y))
    with pytest.raises(InputError, match="csg_ratio"):
        ClassSpecificGates(csg_every=2, csg_ratio=3).fit(model, (x, y))
    with pytest.raises(InputError, match="one-shot"):
        ClassSpecificGates(recipe="finetune").fit(model, iter([(x, y)]))
    with pytest.raises(NotFittedError):
        ClassSpecificGates().predict(x)
    with pytest.raises(NotFittedError):
        ClassSpecificGates().class_filters(0)


def test_model_unchanged_when_fit_raises(data):
    x, y = data
    model = tiny_cnn()
    model.train()
    before = snapshot(model)
    with pytest.raises(InputError):
        ClassSpecificGates(g=32.0, epochs=6).fit(model, (x, y + 1))
    with pytest.raises(InputError):
        ClassSpecificGates(recipe="finetune", g=32.0, epochs=6).fit(model, (x, y + 1))
    assert_same(snapshot(model), before)


# --------------------------------------------------------------------------- persistence


def test_save_load_roundtrip(tmp_path, frozen, data):
    model, _, est = frozen
    x = data[0][:40]
    est.save(tmp_path / "g")
    back = ClassSpecificGates.load(tmp_path / "g", model=model)
    assert torch.equal(back.gates_, est.gates_)
    assert back.layer_ == est.layer_ and back.g_ == est.g_
    assert torch.equal(back.predict(x), est.predict(x))
    assert [f.tolist() for f in back.class_specific_filters_] == [
        f.tolist() for f in est.class_specific_filters_
    ]
    bare = ClassSpecificGates.load(tmp_path / "g")
    assert torch.equal(bare.gates_, est.gates_)
    with pytest.raises(InputError, match="without a network"):
        bare.predict(x)


def test_save_load_finetune(tmp_path, data):
    x, y = data
    model = tiny_cnn()
    est = ClassSpecificGates(recipe="finetune", g=32.0, epochs=6, lr_backbone=1e-2).fit(
        model, (x[:64], y[:64])
    )
    est.save(tmp_path / "ft")
    back = ClassSpecificGates.load(tmp_path / "ft", model=model)
    assert back.network_ is not model
    assert torch.allclose(back.decision_function(x[:16]), est.decision_function(x[:16]))
    assert not torch.allclose(
        ClassSpecificGates.load(tmp_path / "ft").head_.weight, torch.zeros(C, K)
    )


# --------------------------------------------------------------------------- localization


class _Picker(nn.Module):
    """Filter k = ReLU of input channel k % 3 scaled by (k + 1), at half resolution."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            for i in range(k):
                self.conv.weight[i, i % 3] = i + 1.0
        self.pool = nn.AvgPool2d(2)
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(k, 3))

    def forward(self, x):
        return self.head(self.act(self.pool(self.conv(x))))


def literal_localization(acts, masks, labels, gates, w, c, top=0.3, min_iou=0.5):
    """Slow App. G / H reference: per filter threshold, per image IoU, per class tables."""
    n, k, h, wd = acts.shape
    size = masks.shape[-2:]
    ious = np.zeros((n, k))
    areas = np.zeros((n, k))
    for j in range(k):
        vals = np.sort(acts[:, j].reshape(-1).numpy())  # ascending
        thr = vals[max(1, math.ceil((1 - top) * vals.size)) - 1]
        for i in range(n):
            up = F.interpolate(
                acts[i : i + 1, j : j + 1], size=size, mode="bilinear", align_corners=False
            )[0, 0].numpy()
            seg = up > thr
            areas[i, j] = seg.mean()
            m = masks[i].numpy()
            union = (seg | m).sum()
            ious[i, j] = (seg & m).sum() / union if union else 0.0
    iou_c = np.full((k, c), np.nan)
    ap_c = np.full((k, c), np.nan)
    for j in range(k):
        for ci in range(c):
            sel = labels.numpy() == ci
            if sel.any():
                iou_c[j, ci] = ious[sel, j].mean()
                ap_c[j, ci] = (ious[sel, j] >= min_iou).mean()
    best = np.zeros(k, dtype=np.int64)
    for j in range(k):  # highest APn; on ties the higher IoU; then the first class
        for ci in range(1, c):
            if np.isnan(ap_c[j, ci]):
                continue
            b = best[j]
            if (
                np.isnan(ap_c[j, b])
                or ap_c[j, ci] > ap_c[j, b]
                or (ap_c[j, ci] == ap_c[j, b] and iou_c[j, ci] > iou_c[j, b])
            ):
                best[j] = ci
    cams = []
    for i in range(n):
        yi = int(labels[i])
        cam = (acts[i] * w[yi][:, None, None]).sum(0)
        up = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        flat = up.reshape(-1).numpy()
        order = np.argsort(-flat, kind="stable")
        seg = np.zeros(flat.size, bool)
        seg[order[: math.ceil(round(top * flat.size, 9))]] = True
        m = masks[i].numpy().reshape(-1)
        cams.append((seg & m).sum() / max((seg | m).sum(), 1))
    return ious, iou_c, ap_c, best, np.array(cams), areas


def test_gate_localization_literal():
    gen = torch.Generator().manual_seed(5)
    n, k, c, size = 12, 6, 3, 16
    labels = torch.arange(n) % c
    x = 0.2 * torch.rand(n, 3, size, size, generator=gen)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        r0 = int(torch.randint(0, 8, (1,), generator=gen))
        c0 = int(torch.randint(0, 8, (1,), generator=gen))
        masks[i, r0 : r0 + 8, c0 : c0 + 8] = True
        x[i, int(labels[i]), r0 : r0 + 8, c0 : c0 + 8] += 1.0  # class channel lights the object
    model = _Picker(k)
    gates = torch.tensor(
        [
            [1.0, 0.0, 0.0, 1.0, 0.0, 1.0],
            [0.0, 1.0, 0.0, 0.0, 1.0, 1.0],
            [0.0, 0.0, 1.0, 0.1, 0.0, 1.0],
        ]
    )
    w = torch.randn(c, k, generator=gen)
    before = snapshot(model)
    res = gate_localization(gates, model, x, masks, labels, layer="act", head_weight=w)
    assert_same(snapshot(model), before)
    acts = model.act(model.pool(model.conv(x))).detach()
    ious, iou_c, ap_c, best, cams, areas = literal_localization(acts, masks, labels, gates, w, c)
    np.testing.assert_allclose(res.ious.numpy(), ious, atol=1e-6)
    np.testing.assert_allclose(res.areas.numpy(), areas, atol=1e-6)
    np.testing.assert_allclose(res.filters.iou_per_class.numpy(), iou_c, atol=1e-6)
    assert res.filters.best_class.tolist() == best.tolist()
    # class-specific: filters 0, 3 -> class 0; 1, 4 -> class 1; 2 -> class 2; 5 shared
    assert res.specific_class.tolist() == [0, 1, 2, 0, 1, -1]
    for j, cj in enumerate([0, 1, 2, 0, 1]):
        assert float(res.specific_iou_per_filter[j]) == pytest.approx(iou_c[j, cj], abs=1e-6)
        assert float(res.specific_ap_per_filter[j]) == pytest.approx(ap_c[j, cj], abs=1e-6)
    assert math.isnan(float(res.specific_iou_per_filter[5]))
    assert res.n_specific == 5
    assert res.specific_iou == pytest.approx(
        np.mean([iou_c[j, cj] for j, cj in enumerate([0, 1, 2, 0, 1])])
    )
    assert res.all_iou == pytest.approx(float(np.mean(iou_c[np.arange(k), best])))
    assert res.all_ap == pytest.approx(float(np.mean(ap_c[np.arange(k), best])))
    assert res.pooled_iou == pytest.approx(float(ious.mean()), abs=1e-6)
    assert res.pooled_ap == pytest.approx(float((ious >= 0.5).mean()))
    assert res.cam.iou == pytest.approx(float(cams.mean()), abs=1e-6)
    # gated CAM: weights W_yk G_yk
    _, _, _, _, cams_g, _ = literal_localization(acts, masks, labels, gates, w * gates, c)
    assert res.cam_gated.iou == pytest.approx(float(cams_g.mean()), abs=1e-6)
    # the class's own filter sees its object: specific filters beat the average filter here
    assert res.specific_iou > float(np.mean(ious))


def test_gate_localization_errors():
    model = _Picker(6)
    x = torch.rand(4, 3, 8, 8)
    masks = torch.ones(4, 8, 8, dtype=torch.bool)
    y0 = torch.zeros(4, dtype=torch.long)  # labels are integers (floats are refused)
    with pytest.raises(InputError, match="K = 5"):
        gate_localization(torch.ones(3, 5), model, x, masks, y0, layer="act")
    with pytest.raises(InputError, match="masks"):
        gate_localization(torch.ones(3, 6), model, x, masks[:, :4], y0, layer="act")
    with pytest.raises(InputError, match=r"\[0, 3\)"):
        gate_localization(torch.ones(3, 6), model, x, masks, torch.full((4,), 3), layer="act")
    with pytest.raises(InputError, match="model= and layer="):
        gate_localization(torch.ones(3, 6), model, x, masks, y0)
    with pytest.raises(InputError, match="method"):
        gate_localization(torch.ones(3, 6), model, x, masks, y0, layer="act", method="cam")


def test_gradmap_localization_literal():
    """GradMap segments of every filter, written out per image and filter with SciPy: the
    gradient of the filter's average pool w.r.t. the input, ``sum_c |g_c|``, divided by its
    root mean square, Gaussian blur (SciPy's default truncation), kept above the level."""
    from scipy.ndimage import gaussian_filter

    model = tiny_cnn(k=4)
    model.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 2:10] = True
    labels = torch.tensor([0, 1, 0])
    before = snapshot(model)
    res = gate_localization(
        torch.ones(2, 4), model, x, masks, labels, layer="6", method="gradmap", sigma=2.0
    )
    assert_same(snapshot(model), before)
    body = nn.Sequential(*list(model.children())[:7])
    for i in range(3):
        for k in range(4):
            xi = x[i : i + 1].clone().requires_grad_(True)
            body(xi)[0, k].mean().backward()
            m = xi.grad[0].abs().sum(0).double().numpy()
            rms = np.sqrt((m**2).mean())
            seg = gaussian_filter(m / rms, 2.0, mode="nearest") > 1.0
            mk = masks[i].numpy()
            want = (seg & mk).sum() / max((seg | mk).sum(), 1)
            assert float(res.ious[i, k]) == pytest.approx(want, abs=1e-6), (i, k)
            assert float(res.areas[i, k]) == pytest.approx(seg.mean(), abs=1e-6)


# --------------------------------------------------------------------------- figures


def test_figures(frozen, data):
    import matplotlib.pyplot as plt

    from xnn_toolkit.viz import (
        class_filter_gallery,
        gate_matrix_figure,
        top_class_filters,
    )

    _, _, est = frozen
    fig = gate_matrix_figure(est.gates_, class_names=["a", "b", "c", "d"])
    shown = fig.axes[0].images[0].get_array()
    assert np.allclose(np.asarray(shown), est.gates_[:, block_order(est.gates_)].numpy())
    plt.close(fig)
    with pytest.raises(InputError, match="class_names"):
        gate_matrix_figure(est.gates_, class_names=["a"])
    x, y = data
    top = top_class_filters(est, 1, 3)
    assert top[: len(est.class_filters(1))] == est.class_filters(1).tolist()[:3]
    fig = class_filter_gallery(est, x[:40], y[:40], 1, top=3, n_images=2)
    assert len([a for a in fig.axes if a.images]) == 2 * 4
    plt.close(fig)
    maps = est.filter_maps(x[:2], top)
    assert maps.shape == (2, 3, 16, 16)


def _ovr_mi(features, labels, num_classes, **kw):
    """``K x C`` one-vs-rest mutual information (the metrics module's per-class table)."""
    return mutual_information_score(features, labels, num_classes, **kw).per_class.cpu()
