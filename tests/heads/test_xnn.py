"""XNN heads (docs/methods/xnn.rst): losses against literal formulas, batching, baselines, API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xnn_toolkit.errors import InputError, NotFittedError
from xnn_toolkit.heads.lasso_xnn import LassoXNN
from xnn_toolkit.heads.xnn import XNN
from xnn_toolkit.heads.xnn_network import (
    _GroupedLinear,
    faithfulness_loss,
    pull_away_loss,
    reconstruction_error_per_dim,
    sparse_reconstruction_loss,
)


def _problem(n=1200, d=24, k=4, rank=2, seed=0):
    """Activations whose logits are a rank-``rank`` function of them, balanced labels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, d, generator=g))
    basis = torch.relu(torch.randn(d, rank, generator=g))
    mix = torch.randn(rank, k, generator=g)
    logits = (z @ basis) @ mix
    logits = logits - logits.mean(0)
    labels = torch.arange(n) % k  # positives are defined by labels, not by the logits
    return z, logits, labels


# ----------------------------------------------------------------------------- losses


def test_faithfulness_loss_literal():
    g = torch.Generator().manual_seed(1)
    yb, yh, w = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g), torch.rand(3, 7)
    got = faithfulness_loss(yb, yh, w)
    for h in range(3):
        num = sum(float(w[h, i]) * (float(yb[h, i]) - float(yh[h, i])) ** 2 for i in range(7))
        assert got[h].item() == pytest.approx(num / float(w[h].sum()), rel=1e-6)
    unweighted = faithfulness_loss(yb, yh)
    for h in range(3):
        lit = sum((float(yb[h, i]) - float(yh[h, i])) ** 2 for i in range(7)) / 7
        assert unweighted[h].item() == pytest.approx(lit, rel=1e-6)


def test_sparse_reconstruction_literal():
    g = torch.Generator().manual_seed(2)
    z, rec = torch.randn(9, 5, generator=g), torch.randn(9, 5, generator=g)
    q_k = reconstruction_error_per_dim(rec, z)
    for k in range(5):
        lit = sum((float(rec[i, k]) - float(z[i, k])) ** 2 for i in range(9)) / 9
        assert q_k[k].item() == pytest.approx(lit, rel=1e-6)
    q = 3.0
    lit = sum(math.log(1 + q * float(q_k[k])) for k in range(5)) / 5
    assert sparse_reconstruction_loss(q_k, q).item() == pytest.approx(lit, rel=1e-6)


def test_pull_away_literal_and_extremes():
    g = torch.Generator().manual_seed(3)
    e = torch.randn(11, 4, generator=g)
    n = 4
    total = 0.0
    for l in range(n):
        for lp in range(n):
            if l != lp:
                a, b = e[:, l], e[:, lp]
                total += (float(a @ b) / (float(a.norm()) * float(b.norm()))) ** 2
    assert pull_away_loss(e).item() == pytest.approx(total / (n * (n - 1)), rel=1e-6)
    ortho = torch.eye(6)[:, :3] * torch.tensor([2.0, 5.0, 0.5])
    assert pull_away_loss(ortho).item() == pytest.approx(0.0, abs=1e-12)
    same = torch.rand(10, 1).repeat(1, 5) * torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert pull_away_loss(same).item() == pytest.approx(1.0, rel=1e-6)


def test_grouped_linear_equals_loop():
    lin = _GroupedLinear(3, 6, 4)
    x = torch.randn(3, 5, 6)
    out = lin(x)
    for g in range(3):
        ref = F.linear(x[g], lin.weight[g], lin.bias[g])
        torch.testing.assert_close(out[g], ref)


def test_batched_losses_equal_per_head_losses():
    """The grouped objective is the sum of the heads' own objectives (heads independent)."""
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=1)
    m.fit(z, logits, labels=labels)
    mod = m.module_
    idx = torch.randint(0, len(z), (4, 16))
    pos = torch.rand(4, 16) < 0.3
    zz = (z / m.scale_).unsqueeze(1)
    y = logits[:, m.classes_]
    grouped = m._losses(mod, zz, y, idx, pos, 3.0)["total"]
    for h in range(4):
        e = torch.relu(
            F.linear(
                torch.relu(
                    F.linear(zz[idx[h], 0], mod.encoder[0].weight[h], mod.encoder[0].bias[h])
                ),
                mod.encoder[1].weight[h],
                mod.encoder[1].bias[h],
            )
        )
        yb = e @ mod.v[h]
        d1 = torch.relu(F.linear(e, mod.decoder[0].weight[h], mod.decoder[0].bias[h]))
        rec = F.linear(d1, mod.decoder[1].weight[h], mod.decoder[1].bias[h])
        w = torch.where(pos[h], 3.0, 1.0)
        fs = ((yb - y[idx[h], h]) ** 2 * w).sum() / w.sum()
        q_k = ((rec - zz[idx[h], 0]) ** 2).mean(0)
        sr = torch.log1p(m.q * q_k).mean()
        cos = F.normalize(e, dim=0).T @ F.normalize(e, dim=0)
        pt = (cos.pow(2).sum() - cos.diagonal().pow(2).sum()) / 2
        ref = fs + m.beta * sr + m.eta * pt
        assert grouped[h].item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


def test_gradients_reach_every_part():
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=1)
    m.fit(z, logits, labels=labels)
    idx = torch.randint(0, len(z), (4, 32))
    loss = m._losses(
        m.module_,
        (z / m.scale_).unsqueeze(1),
        logits[:, m.classes_],
        idx,
        torch.zeros(4, 32, dtype=torch.bool),
        1.0,
    )["total"].sum()
    loss.backward()
    parts = {
        "encoder": m.module_.encoder[0].weight.grad,
        "decoder": m.module_.decoder[0].weight.grad,
        "predictor": m.module_.v.grad,
    }
    for name, grad in parts.items():
        assert grad is not None and grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- fitting


@pytest.mark.parametrize("kind", ["srae", "nn", "sae"])
def test_faithful_kinds_fit_a_low_rank_problem(kind):
    z, logits, labels = _problem()
    m = XNN(
        n_features=3,
        kind=kind,
        hidden=(32,),
        n_positive=60,
        n_negative=600,
        max_epochs=150,
        patience=30,
        lr=3e-3,
        random_state=0,
    )
    m.fit(z, logits, labels=labels)
    err = (m.predict(z) - logits[:, m.classes_]).abs().mean()
    spread = logits.abs().mean()
    assert err < 0.2 * spread, (kind, float(err), float(spread))
    assert m.transform(z).shape == (len(z), 4, 3)
    assert (m.transform(z) >= 0).all()
    torch.testing.assert_close(m.contributions(z).sum(-1), m.predict(z))


def test_cae_predictor_is_weighted_least_squares():
    z, logits, labels = _problem()
    m = XNN(n_features=3, kind="cae", hidden=(16,), n_positive=40, n_negative=300, max_epochs=5)
    m.fit(z, logits, labels=labels)
    # Re-derive v for head 0 from the same training rows with numpy's lstsq.
    g = torch.Generator().manual_seed(0)
    from xnn_toolkit.heads.xnn import _split_head_indices

    tr, tr_pos, _, _ = _split_head_indices(labels, m.classes_.tolist(), 40, 300, 0.1, g)
    e = m.transform(z[tr[0]])[:, 0]
    w = torch.where(tr_pos[0], m._w_pos(tr_pos), 1.0).double()
    y = logits[tr[0], m.classes_[0]].double()
    sw = w.sqrt()
    v, *_ = np.linalg.lstsq((e.double() * sw[:, None]).numpy(), (y * sw).numpy(), rcond=None)
    np.testing.assert_allclose(m.module_.v[0].detach().numpy(), v, rtol=1e-3, atol=1e-4)


def test_conv_variant_shapes_and_target_module():
    g = torch.Generator().manual_seed(4)
    z = torch.relu(torch.randn(600, 8, 3, 3, generator=g))
    logits = z.mean((2, 3)) @ torch.randn(8, 3, generator=g)
    labels = torch.arange(600) % 3
    m = XNN(n_features=2, hidden=(6,), n_positive=30, n_negative=200, max_epochs=3).fit(
        z, logits, labels=labels
    )
    assert m.spatial_ == (3, 3)
    assert m.transform(z).shape == (600, 3, 2)
    c = int(m.classes_[1])
    mod = m.as_target_module(c)
    torch.testing.assert_close(mod(z), m.transform(z)[:, 1], rtol=1e-4, atol=1e-5)


def test_target_module_matches_transform_fc():
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8, 4), n_positive=40, n_negative=200, max_epochs=2).fit(
        z, logits, labels=labels
    )
    for i, c in enumerate(m.classes_.tolist()):
        torch.testing.assert_close(
            m.as_target_module(c)(z), m.transform(z)[:, i], rtol=1e-4, atol=1e-5
        )


def test_save_load_round_trip(tmp_path):
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=2).fit(
        z, logits, labels=labels
    )
    m.save(tmp_path / "head")
    back = XNN.load(tmp_path / "head")
    torch.testing.assert_close(back.predict(z), m.predict(z))
    assert back._saved_params() == m._saved_params()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_seeded_fits_are_identical():
    z, logits, labels = _problem()
    kw = dict(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=3)
    a = XNN(**kw).fit(z, logits, labels=labels).predict(z)
    b = XNN(**kw).fit(z, logits, labels=labels).predict(z)
    torch.testing.assert_close(a, b)


def test_heads_trained_in_blocks_equal_heads_trained_together():
    # Full-batch steps make the batch order irrelevant and patience >= epochs keeps every
    # block running as long as the whole group: heads are independent, so training them
    # 1, 3 or all 4 at a time must give the same weights.
    z, logits, labels = _problem()
    kw = dict(
        n_features=2,
        hidden=(8,),
        n_positive=40,
        n_negative=200,
        max_epochs=4,
        patience=10,
        batch_size=10_000,
    )
    together = XNN(heads_per_step=None, **kw).fit(z, logits, labels=labels)
    for k in (1, 3):
        blocks = XNN(heads_per_step=k, **kw).fit(z, logits, labels=labels)
        for (name, a), (_, b) in zip(
            together.module_.named_parameters(), blocks.module_.named_parameters()
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name}, k={k}")
        torch.testing.assert_close(blocks.best_epoch_, together.best_epoch_)
        assert {tuple(h["heads"]) for h in blocks.history_} == {
            (a, min(4, a + k)) for a in range(0, 4, k)
        }
    # a block size in small batches trains as well (different batch order, same quality)
    small = dict(kw, batch_size=64)
    fit_a = XNN(heads_per_step=None, **small).fit(z, logits, labels=labels)
    fit_b = XNN(heads_per_step=2, **small).fit(z, logits, labels=labels)
    assert abs(fit_a.best_val_loss_.mean() - fit_b.best_val_loss_.mean()) < 0.5 * float(
        fit_a.best_val_loss_.mean()
    )
    with pytest.raises(InputError, match="heads_per_step"):
        XNN(heads_per_step=0, **kw).fit(z, logits, labels=labels)


def test_auto_heads_per_step_blocks_by_weight_size_on_cpu():
    from xnn_toolkit.heads.xnn_network import _GroupedXNN

    est = XNN()
    mod = _GroupedXNN(
        50,
        256,
        (800, 100),
        5,
        decoder=True,
        relu_x=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert est._heads_per_step(50, mod, torch.device("cpu")) == (8 << 20) // (256 * 800 * 4)
    assert est._heads_per_step(50, mod, torch.device("meta")) == 50
    assert XNN(heads_per_step=None)._heads_per_step(50, mod, torch.device("cpu")) == 50
    assert XNN(heads_per_step=7)._heads_per_step(5, mod, torch.device("cpu")) == 5


# ----------------------------------------------------------------------------- Lasso


def test_lasso_matches_sklearn_at_chosen_alpha():
    from sklearn.linear_model import Lasso

    z, logits, labels = _problem(d=16)
    m = LassoXNN(n_features=3, n_positive=40, n_negative=400).fit(z, logits, labels=labels)
    from xnn_toolkit.heads.xnn import _split_head_indices

    g = torch.Generator().manual_seed(0)
    tr, tr_pos, _, _ = _split_head_indices(labels, m.classes_.tolist(), 40, 400, 0.1, g)
    for h in range(len(m.classes_)):
        w = np.where(tr_pos[h].numpy(), m._w(tr_pos), 1.0)
        ref = Lasso(alpha=float(m.alpha_[h]), max_iter=20000, tol=1e-8).fit(
            z[tr[h]].double().numpy(),
            logits[tr[h], m.classes_[h]].double().numpy(),
            sample_weight=w,
        )
        nz = np.flatnonzero(ref.coef_)
        sel = m.selected_[h][m.selected_[h] >= 0].numpy()
        assert set(nz) == set(sel)
        for k, c in zip(sel, m.coef_[h][: len(sel)].numpy()):
            assert c == pytest.approx(ref.coef_[k], rel=2e-3, abs=2e-4)
        assert float(m.intercept_[h]) == pytest.approx(ref.intercept_, rel=2e-3, abs=2e-4)
    assert (m.selected_ >= 0).sum(1).le(3).all()
    torch.testing.assert_close(m.contributions(z).sum(-1) + m.intercept_, m.predict(z))


# ----------------------------------------------------------------------------- initialisation


def test_predictor_init_gives_every_head_both_signs():
    """All-equal signs of v leave a head unable to reach logits of the other sign."""
    from xnn_toolkit.heads.xnn_network import _GroupedXNN

    for n in (2, 3, 5):
        mod = _GroupedXNN(
            64, 8, (6,), n, decoder=False, relu_x=True, generator=torch.Generator().manual_seed(n)
        )
        v = mod.v.detach()
        assert ((v > 0).any(1) & (v < 0).any(1)).all(), n


def test_every_x_feature_starts_active_on_its_heads_training_rows():
    from xnn_toolkit.heads.xnn import _split_head_indices

    z, logits, labels = _problem()
    m = XNN(n_features=4, hidden=(8, 6), n_positive=40, n_negative=300, max_epochs=0).fit(
        z, logits, labels=labels
    )
    tr, _, _, _ = _split_head_indices(
        labels, m.classes_.tolist(), 40, 300, 0.1, torch.Generator().manual_seed(0)
    )
    e = m.transform(z)  # N x C x n, the initial weights (no epoch run)
    for h in range(len(m.classes_)):
        assert (e[tr[h], h] > 0).all(), h  # every feature on every training row
    # ... whereas the default initialisation alone leaves some off
    from xnn_toolkit.heads import xnn as X

    orig = X._start_active
    try:
        X._start_active = lambda *a: None
        e0 = (
            XNN(n_features=4, hidden=(8, 6), n_positive=40, n_negative=300, max_epochs=0)
            .fit(z, logits, labels=labels)
            .transform(z)
        )
    finally:
        X._start_active = orig
    assert not all(bool((e0[tr[h], h] > 0).all()) for h in range(len(m.classes_)))


def test_fit_leaves_the_global_rng_alone():
    z, logits, labels = _problem()
    before = torch.get_rng_state()
    XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=2).fit(
        z, logits, labels=labels
    )
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- errors


def test_errors():
    z, logits, labels = _problem()
    with pytest.raises(InputError, match="n_features"):
        XNN(n_features=24).fit(z, logits, labels=labels)
    with pytest.raises(InputError, match="no examples"):
        XNN(n_features=2, classes=[0, 9]).fit(z, torch.cat([logits] * 3, 1), labels=labels)
    bad = z.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        XNN(n_features=2).fit(bad, logits, labels=labels)
    with pytest.raises(InputError, match="fewer examples"):
        XNN(n_features=2, n_positive=100000).fit(z, logits, labels=labels)
    with pytest.raises(NotFittedError):
        XNN().predict(z)
    with pytest.raises(InputError, match="logits"):
        XNN(n_features=2).fit(z)
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=1).fit(
        z, logits, labels=labels
    )
    with pytest.raises(InputError, match="D = 24"):
        m.transform(torch.zeros(3, 5))


def _bank(z, logits, labels):
    from xnn_toolkit.bank import ActivationBank

    return ActivationBank.from_tensors({"fc": z}, logits=logits, labels=labels)


@pytest.mark.parametrize("cls", [XNN, LassoXNN])
def test_n_features_must_be_below_dim_z(cls):
    z, logits, labels = _problem(d=12)
    for n in (12, 13, 40):
        with pytest.raises(InputError, match=r"n_features must be between 1 and dim Z - 1 = 11"):
            cls(n_features=n).fit(z, logits, labels=labels)
    with pytest.raises(InputError, match="n_features"):
        cls(n_features=0).fit(z, logits, labels=labels)


@pytest.mark.parametrize("cls", [XNN, LassoXNN])
def test_classes_absent_from_the_bank(cls):
    z, logits, labels = _problem()
    keep = labels != 2  # the bank has no image of class 2
    bank = _bank(z[keep], logits[keep], labels[keep])
    with pytest.raises(InputError, match=r"classes \[2\] have no examples"):
        cls(n_features=2, classes=[0, 2], n_positive=20, n_negative=100).fit(bank)
    with pytest.raises(InputError, match=r"classes \[7\] are out of range for 4 logits"):
        cls(n_features=2, classes=[7], n_positive=20, n_negative=100).fit(bank)
    # by default, heads for the classes present only
    kw = dict(n_features=2, n_positive=20, n_negative=100)
    if cls is XNN:
        kw.update(hidden=(8,), max_epochs=1)
    head = cls(**kw).fit(bank)
    assert head.classes_.tolist() == [0, 1, 3]


def test_bank_labels_unknown():
    z, logits, labels = _problem()
    logits = logits + 100 * F.one_hot(labels, 4)  # the network predicts the labels
    part = labels.clone()
    part[:5] = -1
    with pytest.raises(InputError, match="5 of 1200 labels are negative"):
        XNN(n_features=2).fit(_bank(z, logits, part))
    # no label at all: positives by the network's prediction, as for tensors
    kw = dict(n_features=2, hidden=(8,), n_positive=20, n_negative=100, max_epochs=1)
    a = XNN(**kw).fit(_bank(z, logits, torch.full_like(labels, -1))).predict(z)
    b = XNN(**kw).fit(z, logits).predict(z)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("where", ["nan", "inf", "-inf", "logits", "bank"])
def test_non_finite_input(where):
    z, logits, labels = _problem()
    z, logits = z.clone(), logits.clone()
    value = {"nan": float("nan"), "-inf": float("-inf")}.get(where, float("inf"))
    if where == "logits":
        logits[7, 1] = value
        match = "logits hold NaN or inf"
    else:
        z[3, 2] = value
        match = "activations hold NaN or inf"
    data = _bank(z, logits, labels) if where == "bank" else z
    for cls in (XNN, LassoXNN):
        with pytest.raises(InputError, match=match):
            cls(n_features=2).fit(
                data,
                None if where == "bank" else logits,
                labels=None if where == "bank" else labels,
            )


def test_fewer_positives_or_negatives_than_asked():
    z, logits, labels = _problem()  # 300 examples per class
    short = labels.clone()
    short[(labels == 1).nonzero().flatten()[40:]] = 0  # class 1 keeps 40 examples
    for cls in (XNN, LassoXNN):
        with pytest.raises(
            InputError,
            match=r"n_positive=50 but some classes have fewer "
            r"examples: \{1: 40\}; lower n_positive",
        ):
            cls(n_features=2, n_positive=50).fit(z, logits, labels=short)
    with pytest.raises(InputError, match="leaves no positive for validation"):
        XNN(n_features=2, n_positive=4, val_fraction=0.1).fit(z, logits, labels=labels)
    with pytest.warns(UserWarning, match="asked for 5000 negatives per class but only 900"):
        m = XNN(n_features=2, hidden=(8,), n_positive=20, n_negative=5000, max_epochs=1).fit(
            z, logits, labels=labels
        )
    assert m.history_


def test_xfeature_figure_of_a_fitted_head(tmp_path):
    """Fig. 3.1 / 3.8 layout from a real head: image, 1-heatmap, x-features by v_i E_i."""
    from collections import OrderedDict

    from torch import nn

    from xnn_toolkit.report.heatmaps import class_heatmaps, xfeature_heatmaps
    from xnn_toolkit.viz import save_figure, xnn_figure

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3, padding=1),
            relu=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(4),
            flat=nn.Flatten(),
            fc=nn.Sequential(nn.Linear(96, 16), nn.ReLU()),
            classifier=nn.Linear(16, 3),
        )
    ).eval()
    x = torch.rand(90, 3, 12, 12)
    with torch.no_grad():
        z, logits = model[:5](x), model(x)
    labels = torch.arange(90) % 3
    head = XNN(n_features=3, hidden=(8,), n_positive=20, n_negative=50, max_epochs=3).fit(
        z, logits, labels=labels
    )
    pick = torch.tensor([0, 1, 2])
    maps = xfeature_heatmaps(model, x[pick], labels[pick], head, "fc", "conv")
    ones = class_heatmaps(model, x[pick], labels[pick], "cmwp", "conv")
    contrib = head.contributions(z[pick])[torch.arange(3), labels[pick]]  # own class's head
    fig = xnn_figure(x[pick], ones, maps, contrib, labels=["a", "b", "c"])
    n = 3
    for i in range(3):
        axes = fig.axes[i * (n + 2) : (i + 1) * (n + 2)]
        order = torch.argsort(contrib[i], descending=True)
        want = ["image", "1-heatmap"] + [
            f"#{int(k) + 1}: {float(contrib[i, k]) + 0.0:.3g}" for k in order
        ]
        assert [ax.get_title() for ax in axes] == want
        assert axes[0].get_ylabel() == "abc"[i]
        # each x-feature panel shows that x-feature's heatmap (scaled by its maximum)
        for j, k in enumerate(order.tolist()):
            shown = axes[2 + j].get_images()
            assert len(shown) == 2  # the image, then the heatmap over it
            top = maps[i, k].max()
            ref = maps[i, k] / top if top > 0 else torch.zeros_like(maps[i, k])
            torch.testing.assert_close(
                torch.as_tensor(shown[1].get_array().data, dtype=torch.float32), ref
            )
    paths = save_figure(fig, tmp_path / "xnn", formats=("png", "svg", "pdf"))
    assert [open(p, "rb").read(4) for p in paths][0] == b"\x89PNG"
    assert b"<svg" in open(paths[1], "rb").read(4000) and open(paths[2], "rb").read(4) == b"%PDF"
