"""The one estimator base of the heads: scikit-learn's protocol, saves, and the caller's RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from xnn_toolkit.errors import NotFittedError
from xnn_toolkit.heads import (
    XNN,
    ClassPaths,
    ClassSpecificGates,
    InformationDropout,
    LassoXNN,
    NMFConcepts,
    PerClassNMF,
)
from xnn_toolkit.heads._base import Head, global_rng_kept

HEADS = [
    XNN,
    LassoXNN,
    NMFConcepts,
    PerClassNMF,
    ClassPaths,
    InformationDropout,
    ClassSpecificGates,
]


def _problem(n=240, d=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, d, generator=g))
    logits = z @ torch.randn(d, k, generator=g)
    return z, logits - logits.mean(0), torch.arange(n) % k


def _images(n=24, k=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g), torch.arange(n) % k


def _cnn(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # building layers draws from the global RNG
        net = _layers(k)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def _layers(k):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, k),
    )


def _fit(cls):
    """A tiny fit of each head and a function of the fitted head to compare after a reload."""
    z, logits, labels = _problem()
    if cls is XNN:
        h = XNN(n_features=2, hidden=(4,), n_positive=30, n_negative=60, max_epochs=2)
        return h.fit(z, logits, labels=labels), lambda m: m.predict(z)
    if cls is LassoXNN:
        h = LassoXNN(n_features=2, n_positive=30, n_negative=60)
        return h.fit(z, logits, labels=labels), lambda m: m.predict(z)
    acts = torch.relu(torch.randn(12, 5, 4, 4, generator=torch.Generator().manual_seed(1)))
    if cls is NMFConcepts:
        return NMFConcepts(rank=2).fit(acts), lambda m: m.transform(acts)
    if cls is PerClassNMF:
        y = torch.arange(12) % 2
        return PerClassNMF(NMFConcepts(rank=2)).fit(acts, y), lambda m: m.transform(acts, y)
    x, y = _images()
    net = _cnn()
    if cls is ClassPaths:
        h = ClassPaths(layers=["1"], epochs=1, batch_size=8, min_images=1)
        return h.fit(net, (x, y)), lambda m: m.masks_["1"]
    if cls is InformationDropout:
        h = InformationDropout(layers=["1"], epochs=1, batch_size=8, min_images=1)
        return h.fit(net, (x, y)), lambda m: m.information_heatmaps(net, x[:2], y[:2])["1"]
    h = ClassSpecificGates(layer="0", epochs=4, batch_size=8)
    return h.fit(net, (x, y)), lambda m: m.gates_


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_sklearn_protocol(cls):
    h = cls()
    assert isinstance(h, Head)
    c = clone(h)
    assert type(c) is cls and c is not h
    assert c.get_params(deep=True) == h.get_params(deep=False)
    assert h.set_params(**h.get_params()) is h
    name = "random_state" if "random_state" in h.get_params() else "min_samples"
    p = dict(h.get_params())
    p[name] = 7
    h.set_params(**{name: 7})
    assert h.get_params() == p and getattr(clone(h), name) == 7


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_fit_keeps_the_global_rng_and_saves(cls, tmp_path):
    torch.manual_seed(123)
    np.random.seed(5)  # noqa: NPY002 - the legacy global state is what is checked
    random.seed(9)
    before = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    h, out = _fit(cls)
    after = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    assert torch.equal(before[0], after[0]), "fit changed torch's global RNG"
    assert np.array_equal(before[1], after[1]) and before[2] == after[2]
    if not hasattr(cls, "save"):
        pytest.skip(f"{cls.__name__} has no save")
    h.save(tmp_path / "head")
    back = cls.load(tmp_path / "head")
    torch.testing.assert_close(out(back), out(h), rtol=0, atol=0)
    # a fitted clone is unfitted, with the same parameters
    assert clone(h)._saved_params() == h._saved_params()


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_unfitted_heads_raise_not_fitted(cls):
    with pytest.raises(NotFittedError):
        cls()._check_fitted()


def test_global_rng_kept_restores_on_error_and_can_fail():
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    with pytest.raises(RuntimeError), global_rng_kept():
        torch.rand(3)
        raise RuntimeError("boom")
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.rand(3)  # without the guard, the state moves: the check above can fail
    assert not torch.equal(torch.random.get_rng_state(), state)


def test_two_fit_shapes():
    """Heads fitted on activations: fit(X, y=None, *, layer=None, ...); heads fitted through
    the model: fit(model, data)."""
    import inspect

    from xnn_toolkit.heads import (
        XNN,
        ClassPaths,
        ClassSpecificGates,
        InformationDropout,
        LassoXNN,
        NMFConcepts,
    )

    for cls in (XNN, LassoXNN, NMFConcepts):
        params = list(inspect.signature(cls.fit).parameters.values())
        assert [p.name for p in params[:3]] == ["self", "X", "y"], cls
        assert params[2].default is None
        rest = {p.name: p.kind for p in params[3:]}
        assert rest.get("layer") == inspect.Parameter.KEYWORD_ONLY, cls
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in rest.values()), cls
    for cls in (ClassPaths, InformationDropout, ClassSpecificGates):
        assert list(inspect.signature(cls.fit).parameters) == ["self", "model", "data"], cls


def test_heads_read_samples_and_batches_as_extract_does():
    """One adapter: the heads fitted on images split samples and batches with extract's
    functions (tuples with annotations, dicts), and refuse data without labels."""
    from xnn_toolkit.errors import InputError
    from xnn_toolkit.heads._training import _collate_pairs, _split_batch

    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = [0, 2, 1]
    a = _collate_pairs([(x[i], y[i], {"ann": i}) for i in range(3)])
    b = _collate_pairs([{"image": x[i], "label": y[i]} for i in range(3)])
    assert torch.equal(a[0], x) and torch.equal(b[0], x)
    assert a[1].tolist() == b[1].tolist() == y
    xb, yb = _split_batch({"image": x, "label": torch.tensor(y)})
    assert torch.equal(xb, x) and yb.tolist() == y
    with pytest.raises(InputError, match="labels are missing"):
        _collate_pairs([x[i] for i in range(3)])
    with pytest.raises(InputError, match=r"each batch must be \(images, labels"):
        _split_batch(x)


def test_one_adapter_tells_samples_from_batches():
    """A list of (image, label) samples is a dataset; a list of (images, labels) batches is
    kept in its own order; the same for every head fitted on images."""
    from xnn_toolkit.heads._training import _raw_batches

    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    samples = [(x[i], int(y[i])) for i in range(6)]
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = list(_raw_batches(samples, 4, None, shuffle=False))
    assert [b[0].shape[0] for b in got] == [4, 2]
    assert torch.equal(torch.cat([b[0] for b in got]), x)
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    kept = list(_raw_batches(batches, 3, None, shuffle=False))
    assert [b[0].shape[0] for b in kept] == [4, 2] and torch.equal(kept[1][0], x[4:])


@pytest.mark.parametrize("cls", [ClassPaths, InformationDropout, ClassSpecificGates])
def test_the_shared_epoch_loop_reports_each_epoch(cls, capsys):
    """The three heads fitted through the model train in one loop: a history row per epoch,
    printed with verbose=True, and the same fit with verbose off."""
    x, y = _images()
    kw = (
        {"layer": "0", "warmup": 1}
        if cls is ClassSpecificGates
        else {"layers": ["1"], "min_images": 1}
    )
    quiet = cls(epochs=3, batch_size=8, **kw).fit(_cnn(), (x, y))
    loud = cls(epochs=3, batch_size=8, verbose=True, **kw).fit(_cnn(), (x, y))
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["epoch   0", "epoch   1", "epoch   2"]
    assert len(loud.history_) == len(quiet.history_) == 3
    assert repr(loud.history_) == repr(quiet.history_)  # (NaN entries compare by text)
