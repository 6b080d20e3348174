import math

import pytest
import torch
from torch import nn

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import (
    ClassConditionalAccumulator,
    EntropySplitAccumulator,
    ShadeAccumulator,
    binarized_activation_test,
    class_conditional_entropy,
    decodability_probes,
    entropy_split,
    shade_surrogate,
)

from .literal import binned_split_literal, conditional_entropy_literal, shade_literal


def _acts(seed=0, n=120, d=5, c=4):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    h[:, 0] += 4 * y  # unit 0: mostly class information
    h[:, 1] *= 0.01  # unit 1: tiny variance
    return h, y


def test_class_conditional_entropy_equals_literal_and_streams():
    h, y = _acts()
    res = class_conditional_entropy(h, y)
    ent, ratio = conditional_entropy_literal(h.numpy(), y.tolist())
    torch.testing.assert_close(res.conditional_entropy, torch.tensor(ent, dtype=torch.float64))
    torch.testing.assert_close(res.variance_ratio, torch.tensor(ratio, dtype=torch.float64))
    torch.testing.assert_close(res.variance, h.var(0, unbiased=False))
    assert res.variance_ratio[0] < 0.1 < res.variance_ratio[2]
    acc = ClassConditionalAccumulator(4)
    for a in range(0, 120, 17):
        acc.update(h[a : a + 17], y[a : a + 17])
    torch.testing.assert_close(acc.result().conditional_entropy, res.conditional_entropy)


def test_class_conditional_entropy_edge_cases():
    h = torch.zeros(6, 2, dtype=torch.float64)
    h[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y = torch.tensor([0, 0, 0, 2, 2, 2])  # class 1 has no examples
    res = class_conditional_entropy(h, y, num_classes=3)
    var = 2 / 3  # population variance of (1, 2, 3) and of (4, 5, 6)
    assert res.conditional_entropy[0].item() == pytest.approx(
        0.5 * math.log(2 * math.pi * math.e * var)
    )
    assert res.variance_ratio[1] == 1.0  # constant unit
    assert torch.isfinite(res.conditional_entropy).all()
    assert res.class_counts.tolist() == [3, 0, 3]
    with pytest.raises(InputError, match="num_classes"):
        class_conditional_entropy(h, y, num_classes=2)


def test_entropy_split_equals_literal_and_adds_up():
    h, y = _acts(1)
    res = entropy_split(h, y, bins=6)
    for i in range(h.shape[1]):
        ref = binned_split_literal(h[:, i].numpy(), y.tolist(), 6)
        assert res.entropy[i].item() == pytest.approx(ref[0], abs=1e-10)
        assert res.mutual_information[i].item() == pytest.approx(ref[1], abs=1e-10)
        assert res.conditional_entropy[i].item() == pytest.approx(ref[2], abs=1e-10)
    torch.testing.assert_close(res.entropy, res.mutual_information + res.conditional_entropy)
    assert (res.mutual_information >= 0).all() and (res.conditional_entropy >= 0).all()
    assert res.mutual_information[0] > 5 * res.mutual_information[2]
    assert res.layer_entropy == pytest.approx(float(res.entropy.sum()))
    # streaming with fixed edges
    from xnn_toolkit.metrics._binning import _equal_width_edges

    acc = EntropySplitAccumulator(_equal_width_edges(h, 6), 4)
    for a in range(0, 120, 50):
        acc.update(h[a : a + 50], y[a : a + 50])
    torch.testing.assert_close(acc.result().entropy, res.entropy)


def test_shade_surrogate_equals_literal_and_streams():
    h, _ = _acts(2, n=60)
    ours = shade_surrogate(h)
    torch.testing.assert_close(ours, torch.tensor(shade_literal(h.numpy()), dtype=torch.float64))
    acc = ShadeAccumulator()
    for a in range(0, 60, 11):
        acc.update(h[a : a + 11])
    torch.testing.assert_close(acc.result(), ours)
    # a constant unit has no conditional variance
    assert shade_surrogate(torch.full((5, 1), 2.0)).item() == pytest.approx(0.0, abs=1e-15)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _binact_literal(model, x, y):
    """Mean positive activation per unit with loops, then BinAct in a hand-written forward."""
    with torch.no_grad():
        a = model.fc1(x)
        means = []
        for j in range(a.shape[1]):
            pos = [float(v) for v in a[:, j] if v > 0]
            means.append(sum(pos) / len(pos) if pos else 0.0)
        b = torch.zeros_like(a)
        for i in range(a.shape[0]):
            for j in range(a.shape[1]):
                b[i, j] = means[j] if a[i, j] > 0 else 0.0
        acc = float((model(x).argmax(1) == y).float().mean())
        bacc = float((model.fc2(model.act(b)).argmax(1) == y).float().mean())
    return acc, bacc, means


def test_binarized_activation_test_equals_literal_and_restores_model():
    torch.manual_seed(0)
    model = _Net().train()
    x = torch.randn(40, 4)
    y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [(x[:25], y[:25]), (x[25:], y[25:])]
    res = binarized_activation_test(model, "fc1", loader)
    acc, bacc, means = _binact_literal(model, x, y)
    assert res.accuracy == pytest.approx(acc) and res.binarized_accuracy == pytest.approx(bacc)
    torch.testing.assert_close(res.unit_means.float(), torch.tensor(means))
    assert res.change == pytest.approx(bacc - acc)
    assert model.training and not model.fc1._forward_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert (
        binarized_activation_test(model, "fc1", (x, y)).binarized_accuracy == res.binarized_accuracy
    )


def test_decodability_probes_disentangled_subspaces():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    g = torch.Generator().manual_seed(0)
    n = 400
    ya = torch.randint(0, 3, (n,), generator=g)
    yb = (torch.rand(n, generator=g) < 0.8).long()  # nuisance, prior about 80 %
    a = torch.nn.functional.one_hot(ya, 3).double() * 3 + torch.randn(
        n, 3, generator=g, dtype=torch.float64
    )
    b = yb[:, None].double() * 3 + torch.randn(n, 2, generator=g, dtype=torch.float64)
    rep = decodability_probes(a, b, ya, yb, random_state=0)
    # the same split and a hand-built linear probe give the same accuracy
    tr, te = train_test_split(list(range(n)), test_size=0.25, random_state=0, stratify=ya.numpy())
    sc = StandardScaler().fit(a.numpy()[tr])
    probe = LogisticRegression(max_iter=2000).fit(sc.transform(a.numpy()[tr]), ya.numpy()[tr])
    assert rep.accuracy_a == pytest.approx(probe.score(sc.transform(a.numpy()[te]), ya.numpy()[te]))
    ceiling_b = 1 - max(float((yb[te] == v).float().mean()) for v in (0, 1))
    assert rep.ceiling_b == pytest.approx(ceiling_b)
    assert rep.accuracy_a > 0.85 and rep.accuracy_b > 0.85
    # nothing of y_a is in b and nothing of y_b in a: errors near the label-prior ceilings
    assert rep.error_a_from_b > rep.ceiling_a - 0.15
    assert rep.error_b_from_a > rep.ceiling_b - 0.1
    assert rep.aggregate == pytest.approx(
        (rep.accuracy_a + rep.accuracy_b + rep.error_a_from_b + rep.error_b_from_a) / 4
    )
    # entangled: b is a copy of a -> y_a is decodable from b, error far below the ceiling
    rep2 = decodability_probes(a, a, ya, yb, random_state=0)
    assert rep2.error_a_from_b < 0.2 < rep2.ceiling_a
    with pytest.raises(InputError, match="two classes"):
        decodability_probes(a, b, torch.zeros(n, dtype=torch.long), yb)
