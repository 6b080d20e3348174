"""XNN heads (METHODS §1): losses against literal formulas, batching, baselines, API."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from xnn_toolkit.errors import InputError, NotFittedError
from xnn_toolkit.heads.xnn import (
    XNN,
    LassoXNN,
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
    m.fit(z, logits, labels)
    mod = m.module_
    idx = torch.randint(0, len(z), (4, 16))
    pos = torch.rand(4, 16) < 0.3
    zz = (z / m.scale_).unsqueeze(1)
    y = logits[:, m.classes_]
    grouped = m._losses(mod, zz, y, idx, pos, 3.0)["total"]
    for h in range(4):
        e = torch.relu(F.linear(torch.relu(F.linear(zz[idx[h], 0], mod.encoder[0].weight[h],
                                                    mod.encoder[0].bias[h])),
                                mod.encoder[1].weight[h], mod.encoder[1].bias[h]))
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
    m.fit(z, logits, labels)
    idx = torch.randint(0, len(z), (4, 32))
    loss = m._losses(m.module_, (z / m.scale_).unsqueeze(1), logits[:, m.classes_], idx,
                     torch.zeros(4, 32, dtype=torch.bool), 1.0)["total"].sum()
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
    m = XNN(n_features=3, kind=kind, hidden=(32,), n_positive=60, n_negative=600,
            max_epochs=150, patience=30, lr=3e-3, random_state=0)
    m.fit(z, logits, labels)
    err = (m.predict(z) - logits[:, m.classes_]).abs().mean()
    spread = logits.abs().mean()
    assert err < 0.2 * spread, (kind, float(err), float(spread))
    assert m.transform(z).shape == (len(z), 4, 3)
    assert (m.transform(z) >= 0).all()
    torch.testing.assert_close(m.contributions(z).sum(-1), m.predict(z))


def test_cae_predictor_is_weighted_least_squares():
    z, logits, labels = _problem()
    m = XNN(n_features=3, kind="cae", hidden=(16,), n_positive=40, n_negative=300, max_epochs=5)
    m.fit(z, logits, labels)
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
        z, logits, labels)
    assert m.spatial_ == (3, 3)
    assert m.transform(z).shape == (600, 3, 2)
    c = int(m.classes_[1])
    mod = m.as_target_module(c)
    torch.testing.assert_close(mod(z), m.transform(z)[:, 1], rtol=1e-4, atol=1e-5)


def test_target_module_matches_transform_fc():
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8, 4), n_positive=40, n_negative=200, max_epochs=2).fit(
        z, logits, labels)
    for i, c in enumerate(m.classes_.tolist()):
        torch.testing.assert_close(m.as_target_module(c)(z), m.transform(z)[:, i],
                                   rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=2).fit(
        z, logits, labels)
    m.save(tmp_path / "head")
    back = XNN.load(tmp_path / "head")
    torch.testing.assert_close(back.predict(z), m.predict(z))
    assert back.get_params() == m.get_params()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_seeded_fits_are_identical():
    z, logits, labels = _problem()
    kw = dict(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=3)
    a = XNN(**kw).fit(z, logits, labels).predict(z)
    b = XNN(**kw).fit(z, logits, labels).predict(z)
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- Lasso


def test_lasso_matches_sklearn_at_chosen_alpha():
    from sklearn.linear_model import Lasso

    z, logits, labels = _problem(d=16)
    m = LassoXNN(n_features=3, n_positive=40, n_negative=400).fit(z, logits, labels)
    from xnn_toolkit.heads.xnn import _split_head_indices

    g = torch.Generator().manual_seed(0)
    tr, tr_pos, _, _ = _split_head_indices(labels, m.classes_.tolist(), 40, 400, 0.1, g)
    for h in range(len(m.classes_)):
        w = np.where(tr_pos[h].numpy(), m._w(tr_pos), 1.0)
        ref = Lasso(alpha=float(m.alpha_[h]), max_iter=20000, tol=1e-8).fit(
            z[tr[h]].double().numpy(), logits[tr[h], m.classes_[h]].double().numpy(),
            sample_weight=w)
        nz = np.flatnonzero(ref.coef_)
        sel = m.selected_[h][m.selected_[h] >= 0].numpy()
        assert set(nz) == set(sel)
        for k, c in zip(sel, m.coef_[h][: len(sel)].numpy()):
            assert c == pytest.approx(ref.coef_[k], rel=2e-3, abs=2e-4)
        assert float(m.intercept_[h]) == pytest.approx(ref.intercept_, rel=2e-3, abs=2e-4)
    assert (m.selected_ >= 0).sum(1).le(3).all()
    torch.testing.assert_close(m.contributions(z).sum(-1) + m.intercept_, m.predict(z))


# ----------------------------------------------------------------------------- errors


def test_errors():
    z, logits, labels = _problem()
    with pytest.raises(InputError, match="n_features"):
        XNN(n_features=24).fit(z, logits, labels)
    with pytest.raises(InputError, match="no examples"):
        XNN(n_features=2, classes=[0, 9]).fit(z, torch.cat([logits] * 3, 1), labels)
    bad = z.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        XNN(n_features=2).fit(bad, logits, labels)
    with pytest.raises(InputError, match="fewer examples"):
        XNN(n_features=2, n_positive=100000).fit(z, logits, labels)
    with pytest.raises(NotFittedError):
        XNN().predict(z)
    with pytest.raises(InputError, match="logits"):
        XNN(n_features=2).fit(z)
    m = XNN(n_features=2, hidden=(8,), n_positive=40, n_negative=200, max_epochs=1).fit(
        z, logits, labels)
    with pytest.raises(InputError, match="D = 24"):
        m.transform(torch.zeros(3, 5))
