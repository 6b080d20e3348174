"""The batch scoring runner: literal tables, resumption after SIGKILL, torchrun, bad input.

References: the metric functions of ``xnn_toolkit.metrics`` called directly on heatmaps from
``xnn_toolkit.attribution.explain`` of the same batches, and the locality entropy and sample
statistics written out with numpy; for resumption and sharding, an uninterrupted
single-process run (byte-identical tables).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _scoring_job import CONFIG, N_IMAGES, dataset, tiny_model
from torch import nn

from xnn_toolkit.attribution import HeadOutput, explain
from xnn_toolkit.data import collate_annotations
from xnn_toolkit.errors import InputError, SpecError, XnnError
from xnn_toolkit.metrics import (
    deletion_curve,
    energy_pointing_game,
    iou,
    mask_part_probabilities,
    pointing_game,
    top_pixels,
    voronoi_part_probabilities,
)
from xnn_toolkit.report import ClassHeadTarget, ScoringConfig, available_metrics, score_dataset

JOB = Path(__file__).with_name("_scoring_job.py")
TABLES = ("per_image.csv", "per_image.json", "aggregate.csv", "aggregate.json")


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of the shared job, written to disk.

    It runs with 2 intra-op threads while every torchrun rank and killed job has 1: the tables
    must not depend on it (each shard is scored with ``ScoringConfig.threads``).
    """
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = score_dataset(tiny_model(), dataset(), CONFIG, out=out, progress=False)
    finally:
        torch.set_num_threads(n)
    return out, res


def _batch(ds, idx):
    items = [ds[i] for i in idx]
    x = torch.stack([it[0] for it in items])
    y = torch.tensor([it[1] for it in items])
    return x, y, collate_annotations([it[2] for it in items])


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [
            len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
            for m in model.modules()
        ],
    )


def test_tables_equal_the_metric_functions_on_the_same_heatmaps(reference):
    _, res = reference
    model, ds = tiny_model(), dataset()
    rows = {(r["index"], r["method"]): r for r in res.per_image}
    assert len(res.per_image) == N_IMAGES * 2 and set(r["target"] for r in res.per_image) == {
        "label"
    }
    names = ds.part_names
    for a in range(0, N_IMAGES, CONFIG.batch_size):
        idx = list(range(a, a + CONFIG.batch_size))
        x, y, parts = _batch(ds, idx)
        pred = model(x).argmax(1)
        for method in CONFIG.methods:
            maps = explain(model, x, y, method=method, layer="4").heatmap
            want = {
                "pointing_game": pointing_game(maps, parts.object_mask, 15).double(),
                "energy_pointing_game": energy_pointing_game(maps, parts.object_mask),
                "iou": iou(top_pixels(maps, 0.3), parts.object_mask),
                "deletion": deletion_curve(model, x, maps, y, steps=3).auc,
            }
            want["ap50"] = (want["iou"] >= 0.5).double()
            vor = voronoi_part_probabilities(maps, parts)
            msk = mask_part_probabilities(maps, parts)
            for j, i in enumerate(idx):
                r = rows[(i, method)]
                assert (r["label"], r["class"], r["prediction"]) == (
                    int(y[j]),
                    int(y[j]),
                    int(pred[j]),
                )
                # exactly: the runner computes the map metrics of all methods at once, and
                # its values must be those of the functions called on each method's maps
                for k, v in want.items():
                    assert r[k] == float(v[j]), (k, i, method)
                for p, name in enumerate([*names, "context"]):
                    assert r[f"voronoi[{name}]"] == float(vor[j, p])
                for p, name in enumerate(names):
                    assert r[f"mask_parts[{name}]"] == float(msk[j, p])
    agg = {(r["method"], r["metric"]): r for r in res.aggregate}
    for method in CONFIG.methods:
        mine = [r for r in res.per_image if r["method"] == method]
        for metric in ("pointing_game", "iou", "deletion", "voronoi[beak]"):
            v = np.array([r[metric] for r in mine])
            got = agg[(method, metric)]
            assert got["n"] == N_IMAGES
            assert got["mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert got["std"] == pytest.approx(v.std(ddof=1), rel=1e-9)
        # locality (docs/methods/metrics.rst): entropy of the normalised mean part histogram, in
        # nats
        cols = [f"voronoi[{p}]" for p in [*names, "context"]]
        h = np.array([[r[c] for c in cols] for r in mine]).mean(0)
        s = h / h.sum()
        ent = -sum(p * math.log(p) for p in s if p > 0)
        assert agg[(method, "voronoi_locality")]["mean"] == pytest.approx(ent, rel=1e-9)
        assert agg[(method, "voronoi_locality")]["std"] is None
    # the files hold the same tables, with exact floats
    out = reference[0]
    assert json.loads((out / "aggregate.json").read_text()) == res.aggregate
    assert json.loads((out / "per_image.json").read_text()) == res.per_image
    lines = (out / "per_image.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["index", "label", "prediction", "target", "class", "method"]
    assert len(lines) == 1 + N_IMAGES * 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] and m["seed"] == 3 and m["dataset"]["scored"] == N_IMAGES
    assert [s["shard"] for s in m["shards"]] == list(range(N_IMAGES // 2))
    assert {"torch", "xnn_toolkit", "python"} <= set(m["versions"])
    assert m["config"]["methods"] == ["cmwp", "gradcam"] and m["methods"]["cmwp"]["layer"] == "4"


def test_head_targets_and_the_model_is_left_unchanged():
    model, ds = tiny_model(), dataset(n=4)
    model.train()
    model[0].register_forward_hook(lambda *a: None)
    before = _snapshot(model)
    g = torch.Generator().manual_seed(5)

    class Head:  # a fitted head with one module per class, like XNN
        classes_ = torch.arange(4)

        def __init__(self):
            self.mods = {c: nn.Sequential(nn.Linear(8, 3), nn.ReLU()) for c in range(4)}
            for m in self.mods.values():
                for p in m.parameters():
                    p.data = torch.randn(p.shape, generator=g)

        def as_target_module(self, c):
            return self.mods[c]

    head = Head()
    fixed = nn.Linear(8, 2)
    cfg = ScoringConfig(
        methods=("cmwp",), metrics=("energy_pointing_game",), layer="4", target=None, batch_size=4
    )
    res = score_dataset(
        model,
        ds,
        cfg,
        progress=False,
        heads={"xf1": ClassHeadTarget("6", head, 1), "unit0": HeadOutput("6", fixed, 0)},
    )
    assert _snapshot(model)[1:] == before[1:]
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model)[0].values(), before[0].values()))
    x, y, parts = _batch(ds, range(4))
    got = {(r["target"], r["index"]): r for r in res.per_image}
    for i in range(4):
        c = int(y[i])
        m = explain(model, x[i : i + 1], HeadOutput("6", head.mods[c], 1), "cmwp", "4").heatmap
        want = energy_pointing_game(m, parts.object_mask[i : i + 1])
        assert got[("xf1", i)]["energy_pointing_game"] == pytest.approx(float(want[0]), abs=1e-6)
        assert got[("xf1", i)]["class"] == c and got[("unit0", i)]["class"] == -1
    m = explain(model, x, HeadOutput("6", fixed, 0), "cmwp", "4").heatmap
    want = energy_pointing_game(m, parts.object_mask)
    assert [got[("unit0", i)]["energy_pointing_game"] for i in range(4)] == pytest.approx(
        want.tolist(), abs=1e-6
    )
    with pytest.raises(InputError, match="'deletion'.*plain head output"):
        score_dataset(
            model,
            ds,
            ScoringConfig(methods=("cmwp",), metrics=("deletion",), target=None),
            heads={"u": HeadOutput("6", fixed, 0)},
        )


def _wait_for_shards(manifest: Path, proc: subprocess.Popen, at_least: int, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.stderr.read().decode()}")
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= at_least:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise AssertionError("no shard was finished in time")


@pytest.mark.slow
def test_resumes_after_sigkill_with_identical_tables(reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "run"
    # 0.25 s per image: one shard (2 images) takes over half a second, so the kill lands
    # between the second shard and the end of the run
    proc = subprocess.Popen(
        [sys.executable, str(JOB), str(out), "0.25"], env=_env(), stderr=subprocess.PIPE
    )
    try:
        _wait_for_shards(out / "manifest.json", proc, 2, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = json.loads((out / "manifest.json").read_text())
    done = [s["shard"] for s in killed["shards"]]
    assert not killed["complete"] and 2 <= len(done) < N_IMAGES // 2
    assert not (out / "per_image.csv").exists()
    kept = {k: (out / "shards" / f"s{k:05d}.json") for k in done}
    stamps = {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in kept.items()}
    subprocess.run(
        [sys.executable, str(JOB), str(out)],
        env=_env(),
        check=True,
        timeout=300,
        capture_output=True,
    )
    for name in TABLES:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    # the finished shards were kept, not recomputed
    assert {k: (p.stat().st_mtime_ns, p.read_bytes()) for k, p in kept.items()} == stamps
    m = json.loads((out / "manifest.json").read_text())
    ref_m = json.loads((ref_out / "manifest.json").read_text())
    assert [r["resumed_shards"] for r in m["runs"]] == [0, len(done)]
    assert sorted(m["runs"][1]["shards"]) == sorted(set(range(N_IMAGES // 2)) - set(done))
    strip = lambda d: {k: v for k, v in d.items() if k != "runs"}  # noqa: E731
    assert strip(m) == strip(ref_m)


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_tables(reference, tmp_path):
    ref_out, ref = reference
    out = tmp_path / "dist"
    dump = tmp_path / "dump"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(JOB),
        str(out),
        "0",
        str(dump),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in TABLES:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["runs"][0]["world_size"] == 2 and m["runs"][0]["backend"] == "gloo"
    for rank in (0, 1):  # every rank returns the tables
        got = json.loads(Path(f"{dump}.rank{rank}.json").read_text())
        assert got["aggregate"] == ref.aggregate and got["per_image"] == ref.per_image


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_two_torchrun_nodes_on_loopback_give_the_single_process_tables(reference, tmp_path):
    """The multi-machine code path: two ``torchrun`` launchers (``--nnodes 2``), one process
    each, meeting over TCP on 127.0.0.1 as two machines would over the network."""
    ref_out, ref = reference
    out = tmp_path / "nodes"
    dump = tmp_path / "dump"
    port = _free_port()
    env = {**_env(), "GLOO_SOCKET_IFNAME": "lo"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(JOB),
                str(out),
                "0",
                str(dump),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    for name in TABLES:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    m = json.loads((out / "manifest.json").read_text())
    assert m["runs"][0]["world_size"] == 2 and m["runs"][0]["backend"] == "gloo"
    for rank in (0, 1):
        got = json.loads(Path(f"{dump}.rank{rank}.json").read_text())
        assert got["aggregate"] == ref.aggregate and got["per_image"] == ref.per_image


def test_unknown_names_list_the_valid_ones():
    model, ds = tiny_model(), dataset(n=2)
    with pytest.raises(
        SpecError, match="unknown attribution method 'cmwpp'.*Valid methods:.*cmwp.*gradcam"
    ):
        score_dataset(model, ds, ScoringConfig(methods=("cmwpp",)), progress=False)
    with pytest.raises(
        SpecError, match="unknown metric 'pointng'.*pointing_game.*Valid metrics:.*voronoi_locality"
    ):
        score_dataset(model, ds, ScoringConfig(metrics=("pointng",)), progress=False)
    assert {"pointing_game", "iou", "ap50", "deletion", "voronoi_locality"} <= set(
        available_metrics()
    )
    with pytest.raises(InputError, match="batch_size"):
        score_dataset(model, ds, ScoringConfig(batch_size=0), progress=False)


class _Plain(torch.utils.data.Dataset):
    """Images and labels without any annotation (as Fashion-MNIST)."""

    def __init__(self, n):
        self.x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 10


def test_missing_ground_truth_and_empty_data_are_clear_errors():
    model = tiny_model()
    cfg = ScoringConfig(methods=("gradcam",), metrics=("deletion", "voronoi_locality"))
    with pytest.raises(
        InputError,
        match="'voronoi_locality' needs part keypoints.*"
        "SyntheticParts.*_Plain has no ground truth.*deletion, insertion",
    ):
        score_dataset(model, _Plain(3), cfg, progress=False)
    with pytest.raises(InputError, match="empty"):
        score_dataset(model, _Plain(0), cfg, progress=False)
    # without metrics named, the ones the data supports: deletion and insertion here
    res = score_dataset(
        model, _Plain(2), ScoringConfig(methods=("gradcam",), steps=2), progress=False
    )
    assert res.manifest["metrics"] == ["deletion", "insertion"]
    assert {r["metric"] for r in res.aggregate} == {"deletion", "insertion"}


def test_output_folder_refusals(tmp_path, reference):
    model, ds = tiny_model(), dataset(n=2)
    cfg = ScoringConfig(methods=("gradcam",), metrics=("pointing_game",), batch_size=2)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not part of a scoring run"):
            score_dataset(model, ds, cfg, out=full, overwrite=overwrite, progress=False)
    assert os.listdir(full) == ["notes.txt"]
    # a folder with another run: refused unless resumed with the same arguments
    ref_out = reference[0]
    with pytest.raises(InputError, match="configured differently"):
        score_dataset(model, ds, cfg, out=ref_out, progress=False)
    with pytest.raises(InputError, match="holds a scoring run.*resume"):
        score_dataset(tiny_model(), dataset(), CONFIG, out=ref_out, resume=False, progress=False)
    again = score_dataset(tiny_model(), dataset(), CONFIG, out=ref_out, progress=False)
    assert again.aggregate == reference[1].aggregate
    assert len(json.loads((ref_out / "manifest.json").read_text())["runs"]) == 1
    run = tmp_path / "run"
    score_dataset(model, ds, cfg, out=run, progress=False)
    (run / "shards" / "s00000.json").write_text("{}")
    with pytest.raises(XnnError, match="shard 0.*damaged"):
        score_dataset(model, ds, cfg, out=run, progress=False)
    res = score_dataset(model, ds, cfg, out=run, overwrite=True, progress=False)
    assert len(res.per_image) == 2


def test_cli_score(tmp_path, capsys):
    from xnn_toolkit.cli import main

    out = tmp_path / "s"
    args = [
        "score",
        "--model",
        "bundled:vgg_fmnist",
        "--dataset",
        "fashion-mnist",
        "--n",
        "4",
        "--batch-size",
        "2",
        "--methods",
        "gradcam",
        "--steps",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "deletion" in text and "gradcam" in text
    agg = json.loads((out / "aggregate.json").read_text())
    assert {(r["method"], r["metric"], r["n"]) for r in agg} == {
        ("gradcam", "deletion", 4),
        ("gradcam", "insertion", 4),
    }
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert main([*args[:-3], "--metrics", "iou", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "'iou' needs object masks" in err and not (tmp_path / "t").exists()
    assert main([*args[:-3], "--methods", "nope", "--out", str(tmp_path / "t")]) == 2
    assert "Valid methods" in capsys.readouterr().err


def test_metric_aliases_resolve_to_their_metric():
    from xnn_toolkit.report.score_metrics import get_metric

    assert get_metric("pointing").name == "pointing_game"
    assert get_metric("Energy-Pointing").name == "energy_pointing_game"
