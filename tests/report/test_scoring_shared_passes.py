"""The scoring runner's shared passes give exactly what separate passes give.

The runner takes each batch's prediction from the first method's forward pass and lets the
methods that read the same layer share one forward (and one backward for the same target).
Reference: every heatmap recomputed with ``explain`` alone, batch by batch, and the prediction
from a plain forward pass; compared with ``torch.equal`` (no tolerance). Also counts the
forward passes, so that the sharing cannot silently stop.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _scoring_job import dataset, tiny_model

from xnn_toolkit import load_maps
from xnn_toolkit.attribution import explain
from xnn_toolkit.attribution._capture import shared_passes
from xnn_toolkit.models import load_model
from xnn_toolkit.report import ScoringConfig, score_dataset

METHODS = ("cmwp", "mwp", "gradcam", "gradcampp", "cam")


class _Count:
    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *_):
        self.n += 1


def _check_against_separate_passes(model, ds, out, cfg, layer):
    res_rows = {
        (r["index"], r["method"]): r for r in json.loads((out / "per_image.json").read_text())
    }
    by_method = {}
    for method in cfg.methods:
        saved = load_maps(out, method=method)
        by_method[method] = {r["index"]: m for r, m in zip(saved.records, saved.maps)}
    for a in range(0, cfg.n, cfg.batch_size):
        idx = list(range(a, min(a + cfg.batch_size, cfg.n)))
        x = torch.stack([ds[i][0] for i in idx])
        with torch.no_grad():
            pred = model(x).argmax(1)
        for method in cfg.methods:
            lay = None if method == "cam" else layer
            want = explain(model, x, pred, method=method, layer=lay).heatmap
            got = torch.stack([by_method[method][i] for i in idx])
            assert torch.equal(got, want), (method, idx)
            for j, i in enumerate(idx):
                row = res_rows[(i, method)]
                assert row["prediction"] == row["class"] == int(pred[j])


def test_shared_passes_equal_separate_passes_on_the_tiny_model(tmp_path):
    model, ds = tiny_model(), dataset(6)
    cfg = ScoringConfig(
        methods=METHODS,
        metrics=("pointing_game",),
        layer="4",
        target="predicted",
        batch_size=3,
        n=6,
        save_maps=True,
    )
    count = _Count(model)
    try:
        score_dataset(model, ds, cfg, out=tmp_path / "run", progress=False)
    finally:
        count.handle.remove()
    # per batch: one forward for c-MWP and MWP, one for Grad-CAM and Grad-CAM++, CAM's own;
    # no prediction pass
    assert count.n == 2 * 3
    _check_against_separate_passes(model, ds, tmp_path / "run", cfg, "4")


def test_shared_passes_equal_separate_passes_on_the_real_model_and_photos(tmp_path):
    from xnn_toolkit.data import SkimagePhotos

    lite0 = load_model("bundled:efficientnet_lite0")
    photos = SkimagePhotos.for_model(lite0)
    cfg = ScoringConfig(
        methods=("cmwp", "gradcam", "gradcampp"),
        metrics=("deletion",),
        target="predicted",
        batch_size=2,
        n=2,
        steps=2,
        save_maps=True,
    )
    count = _Count(lite0.model)
    try:
        score_dataset(lite0, photos, cfg, out=tmp_path / "run", progress=False)
    finally:
        count.handle.remove()
    # c-MWP, one shared forward for the two CAMs, and the 2 x 3 deletion-curve batches
    # (not counted by the hook: the curves run their own perturbed batches, 1 call each)
    x = lite0.preprocessing.normalize(torch.stack([photos[i][0] for i in range(2)]))

    class _Normalized:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return x[i], -1

    _check_against_separate_passes(lite0.model, _Normalized(), tmp_path / "run", cfg, None)
    assert count.n == 2 + 3  # 2 heatmap forwards, 1 deletion forward per method


def test_the_cache_only_lives_inside_the_block():
    model = tiny_model()
    x = dataset(2)[0][0][None].repeat(2, 1, 1, 1)
    count = _Count(model)
    try:
        with shared_passes(x) as passes:
            a = explain(model, x, 1, method="gradcam", layer="4").heatmap
            b = explain(model, x, 1, method="gradcampp", layer="4").heatmap
            c = explain(model, x, 2, method="gradcam", layer="4").heatmap  # another target
            assert count.n == 1
            assert torch.equal(passes.output, model(x).detach())
        explain(model, x, 1, method="gradcam", layer="4")
        assert count.n == 3  # the model call above and a fresh forward after the block
    finally:
        count.handle.remove()
    assert torch.equal(a, explain(model, x, 1, method="gradcam", layer="4").heatmap)
    assert torch.equal(b, explain(model, x, 1, method="gradcampp", layer="4").heatmap)
    assert torch.equal(c, explain(model, x, 2, method="gradcam", layer="4").heatmap)
    # another batch inside the block is not mistaken for the shared one
    y = x.flip(-1).contiguous()
    with shared_passes(x):
        got = explain(model, y, 1, method="gradcam", layer="4").heatmap
    assert torch.equal(got, explain(model, y, 1, method="gradcam", layer="4").heatmap)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_do_not_change_the_tables(tmp_path, workers):
    model, ds = tiny_model(), dataset(8)
    cfg = ScoringConfig(
        methods=("gradcam",), metrics=("pointing_game",), layer="4", batch_size=2, n=8
    )
    base = score_dataset(model, ds, cfg, out=tmp_path / "a", progress=False)
    other = dataclasses.replace(cfg, num_workers=workers)
    # the same folder resumes with another num_workers: it is not part of the run's identity
    res = score_dataset(model, ds, other, out=tmp_path / "b", progress=False)
    assert res.per_image == base.per_image
    for name in ("per_image.csv", "aggregate.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    again = score_dataset(model, ds, other, out=tmp_path / "a", progress=False)
    assert again.per_image == base.per_image


def test_cli_loads_photo_files_with_workers_and_the_tables_do_not_change(tmp_path, capsys):
    """The real path: the bundled ImageNet model on photo files read by 2 loader processes."""
    from PIL import Image
    from skimage import data as skdata

    from xnn_toolkit.cli import main

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(folder / f"{name}.png")
    base = [
        "score",
        "--model",
        "bundled:efficientnet_lite0",
        "--images",
        str(folder),
        "--target",
        "predicted",
        "--methods",
        "gradcam",
        "--metrics",
        "deletion",
        "--steps",
        "2",
        "--n",
        "2",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    assert main([*base, "--num-workers", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--num-workers", "0", "--out", str(tmp_path / "b")]) == 0
    a, b = tmp_path / "a" / "per_image.csv", tmp_path / "b" / "per_image.csv"
    assert a.read_bytes() == b.read_bytes() and len(a.read_text().splitlines()) == 3
    capsys.readouterr()
    assert main([*base, "--num-workers", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "--num-workers must be auto or an int >= 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_num_workers_is_an_input_error_naming_it(tmp_path, bad):
    from xnn_toolkit.errors import InputError

    cfg = ScoringConfig(methods=("gradcam",), metrics=("pointing_game",), layer="4", n=2)
    with pytest.raises(InputError, match="num_workers must be an int >= 0"):
        score_dataset(
            tiny_model(),
            dataset(2),
            dataclasses.replace(cfg, num_workers=bad),
            out=tmp_path / "run",
            progress=False,
        )
    assert not (tmp_path / "run").exists()  # nothing half-written
