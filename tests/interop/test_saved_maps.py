"""Heatmaps saved by the scoring runner and read back by ``load_maps``."""

import numpy as np
import pytest
import torch

import xnn_toolkit
from xnn_toolkit.cli import main
from xnn_toolkit.errors import AssetError, InputError
from xnn_toolkit.metrics.localization import pointing_game


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "run"
    main(
        [
            "score",
            "--model",
            "bundled:vgg_synth",
            "--methods",
            "cmwp,layercam",
            "--metrics",
            "pointing_game,quantus:Sparseness",
            "--n",
            "8",
            "--batch-size",
            "4",
            "--save-maps",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    return out


def test_maps_come_back_and_reproduce_the_table(run):
    import json

    from xnn_toolkit.data import load_dataset

    rows = json.loads((run / "per_image.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    ds = load_dataset("synthetic", split="test", n=8)
    for method in ("cmwp", "layercam"):
        saved = xnn_toolkit.load_maps(run, method=method)
        assert saved.maps.shape == (8, 64, 64) and saved.maps.dtype == torch.float32
        assert torch.isfinite(saved.maps).all()
        assert [r["index"] for r in saved.records] == list(range(8))
        masks = torch.stack([ds[r["index"]][2].object_mask for r in saved.records])
        hits = pointing_game(saved.maps, masks, tolerance=15).double().numpy()
        table = np.array([r["pointing_game"] for r in rows if r["method"] == method])
        np.testing.assert_array_equal(hits, table)
    one = xnn_toolkit.load_maps(run, image=3, cls=saved.records[3]["class"])
    assert len(one) == 2 and {r["method"] for r in one.records} == {"cmwp", "layercam"}
    assert one.manifest["num_shards"] == 1
    assert one.manifest["model"]["spec"] == "bundled:vgg_synth"
    assert one.manifest["preprocessing"]["input_size"] == [3, 64, 64]
    assert one.manifest["versions"]["xnn_toolkit"] == xnn_toolkit.__version__
    names = one.manifest["class_names"]
    assert all(r["class_name"] == names[r["class"]] for r in one.records)


def test_overwrite_replaces_saved_maps(run, tmp_path):
    import shutil

    again = tmp_path / "again"
    shutil.copytree(run, again)
    main(
        [
            "score",
            "--model",
            "bundled:vgg_synth",
            "--methods",
            "gradcam",
            "--metrics",
            "iou",
            "--n",
            "2",
            "--save-maps",
            "--out",
            str(again),
            "--overwrite",
            "--no-progress",
        ]
    )
    saved = xnn_toolkit.load_maps(again)
    assert {r["method"] for r in saved.records} == {"gradcam"} and len(saved) == 2


def test_missing_and_truncated_shards_are_named(run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    shard = bad / "maps" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(AssetError, match="shard-00000.safetensors"):
        xnn_toolkit.load_maps(bad)
    shard.unlink()
    with pytest.raises(AssetError, match="shard-00000.safetensors is missing"):
        xnn_toolkit.load_maps(bad)
    with pytest.raises(AssetError, match="save-maps"):
        xnn_toolkit.load_maps(tmp_path)


def test_save_maps_needs_an_out_folder():
    from xnn_toolkit.data.synthetic import SyntheticParts

    cfg = xnn_toolkit.ScoringConfig(methods=("cmwp",), metrics=("iou",), save_maps=True)
    with pytest.raises(InputError, match="out="):
        xnn_toolkit.score_dataset(
            xnn_toolkit.load_model("bundled:vgg_synth"),
            SyntheticParts(2, size=64, return_annotations=True),
            cfg,
        )


def test_resume_writes_the_missing_shard_only(tmp_path):
    import json

    out = tmp_path / "run"
    args = [
        "score",
        "--model",
        "bundled:vgg_synth",
        "--methods",
        "gradcam",
        "--metrics",
        "iou",
        "--n",
        "4",
        "--batch-size",
        "2",
        "--shard-size",
        "2",
        "--save-maps",
        "--out",
        str(out),
        "--no-progress",
    ]
    main(args)
    before = xnn_toolkit.load_maps(out)
    # an interrupted run: shard 1 never finished (its table shard and maps are absent)
    m = json.loads((out / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if s["shard"] == 0]
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "shards" / "s00001.json").unlink()
    (out / "maps" / "shard-00001.safetensors").unlink()
    kept = (out / "maps" / "shard-00000.safetensors").stat().st_mtime_ns
    main([*args, "--resume"])
    after = xnn_toolkit.load_maps(out)
    assert torch.equal(after.maps, before.maps) and after.records == before.records
    assert (out / "maps" / "shard-00000.safetensors").stat().st_mtime_ns == kept


def test_read_layer_maps_are_saved_too(run):
    from xnn_toolkit.attribution import explain
    from xnn_toolkit.data import load_dataset

    low = xnn_toolkit.load_maps(run, method="cmwp", at_layer=True)
    assert low.maps.shape[0] == 8 and low.maps.shape[-1] < 64
    lm = xnn_toolkit.load_model("bundled:vgg_synth")
    ds = load_dataset("synthetic", split="test", n=8)
    x = lm.preprocessing.normalize(torch.stack([ds[i][0] for i in range(8)]))
    classes = [r["class"] for r in low.records]
    want = explain(lm.model, x, classes, method="cmwp").raw.sum(1)
    torch.testing.assert_close(low.maps, want, rtol=1e-4, atol=1e-6)
    # layercam (pytorch-grad-cam) returns input-resolution maps only: it is left out
    every = xnn_toolkit.load_maps(run, at_layer=True)
    assert {r["method"] for r in every.records} == {"cmwp"}
