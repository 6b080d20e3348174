"""Quantus metrics scoring our methods through :func:`quantus_explain_func`."""

import contextlib
import io
import sys
import warnings

import numpy as np
import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "attribution"))
from _attr_helpers import assert_unchanged, snapshot  # noqa: E402

from xnn_toolkit.attribution import explain  # noqa: E402
from xnn_toolkit.errors import SpecError  # noqa: E402
from xnn_toolkit.interop import quantus_explain_func  # noqa: E402
from xnn_toolkit.metrics.localization import pointing_game  # noqa: E402

quantus = pytest.importorskip("quantus")


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _run(metric, model, x, y, s=None, fn=None):
    with _quiet():
        out = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=y.numpy(),
            s_batch=None if s is None else s.numpy()[:, None].astype(np.float64),
            explain_func=fn,
            device="cpu",
        )
    return np.asarray(out, dtype=np.float64)


def test_contract_shape_and_values(bundled, batch):
    x, y, _ = batch
    fn = quantus_explain_func("cmwp")
    a = fn(model=bundled.model, inputs=x.numpy(), targets=y.numpy())
    assert a.shape == (6, 1, 64, 64) and a.dtype == np.float32
    want = explain(bundled.model, x, y, method="cmwp").heatmap
    torch.testing.assert_close(torch.from_numpy(a[:, 0]), want)


def test_pointing_game_equals_ours(bundled, batch):
    x, y, masks = batch
    model = bundled.model
    snap = snapshot(model)
    metric = quantus.PointingGame(disable_warnings=True, normalise=False, abs=False)
    ref = _run(metric, model, x, y, masks, quantus_explain_func("gradcam"))
    assert_unchanged(model, snap)
    maps = explain(model, x, y, method="gradcam").heatmap
    ours = pointing_game(maps, masks, tolerance=0)
    assert ours.tolist() == [bool(v) for v in ref]
    assert 0 < int(ours.sum()) <= len(ours)


def test_robustness_complexity_randomisation_run(bundled, batch):
    x, y, _ = batch
    x, y = x[:2], y[:2]
    model = bundled.model
    snap = snapshot(model)
    fn = quantus_explain_func("cmwp")
    robust = _run(
        quantus.MaxSensitivity(nr_samples=2, disable_warnings=True, display_progressbar=False),
        model,
        x,
        y,
        fn=fn,
    )
    sparse = _run(quantus.Sparseness(disable_warnings=True), model, x, y, fn=fn)
    rand = _run(quantus.RandomLogit(num_classes=10, disable_warnings=True), model, x, y, fn=fn)
    assert_unchanged(model, snap)
    for out in (robust, sparse, rand):
        assert out.shape == (2,) and np.isfinite(out).all()
    # Sparseness is the Gini index of |a|: recompute it literally from our own maps
    a = explain(model, x, y, method="cmwp").heatmap.abs().flatten(1).double()
    a = a / a.amax(1, keepdim=True)  # Quantus normalises by the max first; Gini is scale-free
    srt = a.sort(1).values + 1e-7
    k = torch.arange(1, srt.shape[1] + 1, dtype=torch.float64)
    n = srt.shape[1]
    gini = ((2 * k - n - 1) * srt).sum(1) / (n * srt.sum(1))
    np.testing.assert_allclose(sparse, gini.numpy(), rtol=1e-5)


def test_unknown_method_is_refused_at_once():
    with pytest.raises(SpecError, match="cmwp"):
        quantus_explain_func("cmpw")
