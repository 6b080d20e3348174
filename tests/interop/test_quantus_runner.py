"""``quantus:NAME`` metrics in the scoring runner."""

import numpy as np
import pytest

from xnn_toolkit.attribution import explain
from xnn_toolkit.data.normalized import Normalized
from xnn_toolkit.data.synthetic import SyntheticParts
from xnn_toolkit.errors import InputError, MissingExtraError, SpecError
from xnn_toolkit.report.score_metrics import get_metric
from xnn_toolkit.report.scoring import ScoringConfig, score_dataset

quantus = pytest.importorskip("quantus")


def test_runner_column_equals_quantus_on_the_same_maps(bundled):
    pre = bundled.preprocessing
    raw = SyntheticParts(4, size=64, seed=1, num_classes=10, return_annotations=True)
    ds = Normalized(raw, pre.mean, pre.std)
    cfg = ScoringConfig(
        methods=("cmwp",), metrics=("pointing_game", "quantus:Sparseness"), batch_size=2
    )
    res = score_dataset(bundled.model, ds, cfg, progress=False)
    rows = next(t for t in res.tables() if t.name == "scores_per_image").rows
    got = np.array([r["quantus:Sparseness"] for r in rows])
    x, ann = raw.render_batch(range(4))
    x = pre.normalize(x)
    maps = explain(bundled.model, x, ann.labels, method="cmwp").heatmap
    want = quantus.Sparseness(disable_warnings=True)(
        model=bundled.model,
        x_batch=x.numpy(),
        y_batch=ann.labels.numpy(),
        a_batch=maps.numpy()[:, None],
        device="cpu",
    )
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5)
    assert res.value("quantus:Sparseness", "cmwp") == pytest.approx(float(np.mean(want)))
    # computed in the runner's metrics thread (attributions only); metrics that run the
    # model or draw random numbers stay in order in the main thread
    assert get_metric("quantus:Sparseness").pure
    assert not get_metric("quantus:MaxSensitivity").pure
    assert not get_metric("quantus:RandomLogit").pure


def test_unknown_quantus_metric_suggests_close_names():
    with pytest.raises(SpecError, match="quantus:Sparseness") as err:
        get_metric("quantus:Sparsenes")
    assert "quantus:MaxSensitivity" in str(err.value)  # the full list is given


def test_localisation_metric_needs_masks():
    assert "object_mask" in get_metric("quantus:PointingGame").needs
    assert "object_mask" not in get_metric("quantus:Sparseness").needs


def test_quantus_localisation_metric_refused_without_masks(bundled):
    pre = bundled.preprocessing
    ds = Normalized(SyntheticParts(2, size=64, seed=1, num_classes=10), pre.mean, pre.std)
    cfg = ScoringConfig(methods=("cmwp",), metrics=("quantus:PointingGame",))
    with pytest.raises(InputError, match="object"):
        score_dataset(bundled.model, ds, cfg, progress=False)


def test_missing_quantus_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "quantus.helpers.constants", None)
    with pytest.raises(MissingExtraError, match=r"xnn_toolkit\[quantus\]"):
        get_metric("quantus:Sparseness")


def test_randomisation_metric_refuses_a_model_it_cannot_perturb(bundled):
    import threading

    pre = bundled.preprocessing
    ds = Normalized(SyntheticParts(2, size=64, seed=1, num_classes=10), pre.mean, pre.std)
    cfg = ScoringConfig(methods=("gradcam",), metrics=("quantus:MPRT",), batch_size=2)
    bundled.model.handle = threading.Lock()  # a model that copy.deepcopy cannot copy
    try:
        with pytest.raises(InputError, match=r"quantus:MPRT randomises a copy of the model"):
            score_dataset(bundled.model, ds, cfg, progress=False)
    finally:
        del bundled.model.handle


def test_randomisation_metric_refuses_a_model_without_layers_to_reset():
    from torch import nn

    from xnn_toolkit.interop.quantus import _check_perturbable

    with pytest.raises(InputError, match="no layer of this model can be re-initialised"):
        _check_perturbable("MPRT", nn.Sequential(nn.ReLU(), nn.Flatten()))
    _check_perturbable("MPRT", nn.Sequential(nn.Linear(2, 2)))  # a resettable layer passes
