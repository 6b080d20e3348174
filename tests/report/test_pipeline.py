"""The end-to-end report: every section filled, names escaped, the model untouched, bad
settings refused before any work, and the page checked in headless Chromium.

One small report is built once for the module: a tiny VGG (random weights, 32 px synthetic
birds) whose top module and class names contain ``<script>``, so that escaping is checked
on text that really went through the pipeline.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil

import pytest
import torch
from _browser import broken_images, chromium, needs_chromium, probe_page
from torch import nn

from xnn_toolkit._guard import HOOK_DICTS
from xnn_toolkit.errors import InputError, SpecError
from xnn_toolkit.report.pipeline import ExplainConfig, run_explain
from xnn_toolkit.zoo import vgg_small

EVIL = "<script>alert(1)</script>"
CLASSES = [f"<script>c{i}</script>" for i in range(10)]


class Wrapped(nn.Module):
    """A tiny VGG whose only child is named ``<script>alert(1)</script>``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        net = vgg_small(
            10, channels=(8, 16, 16, 16), convs_per_block=(1, 1, 1, 1), fc=(32, 32), pool_size=2
        )
        self.add_module(EVIL, net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, EVIL)(x)


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [
            [len(getattr(m, d)) for d in HOOK_DICTS if hasattr(m, d)] for m in model.modules()
        ],
    }


def _config(model: nn.Module, **kw) -> ExplainConfig:
    base = dict(
        model=model,
        image_size=32,
        fc_layer=f"{EVIL}.fc6",
        conv_layer=f"{EVIL}.features.8",
        class_names=CLASSES,
        n_train=200,
        n_test=60,
        heatmap_images=20,
        xnn_epochs=2,
        z_units=2,
        nmf_rank=3,
        progress=False,
    )
    base.update(kw)
    return ExplainConfig.quick(**base)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    model = Wrapped()
    model.train()  # a user's model in training mode, one layer frozen: both must survive
    getattr(model, EVIL).fc7.linear.weight.requires_grad_(False)
    before = _snapshot(model)
    out = tmp_path_factory.mktemp("report") / "rep"
    index = run_explain(_config(model), out)
    return {"model": model, "before": before, "out": out, "index": index}


def _csv(out, name):
    with open(out / "tables" / f"{name}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_section_is_filled(built):
    out = built["out"]
    page = open(built["index"], encoding="utf-8").read()
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles == [
        "Model",
        "Activations",
        "XNN explanation heads",
        "x-feature heatmaps",
        "Heatmap methods on class logits",
        "NMF concepts",
        "Class paths",
        "Class-specific gates",
        "Run",
    ]
    # Table 3.1: metrics down, methods across, Z and 1-heatmap only where defined
    t31 = {r["metric"]: r for r in _csv(out, "table_3_1")}
    assert list(t31) == [
        "F_reg train",
        "F_reg test",
        "F_cls train %",
        "F_cls test %",
        "O1",
        "O2",
        "locality",
    ]
    for kind in ("SRAE", "NN"):
        for metric in t31:
            assert math.isfinite(float(t31[metric][kind])), (metric, kind)
        assert 0 <= float(t31["F_cls test %"][kind]) <= 100
        assert 0 <= float(t31["locality"][kind]) <= math.log(16) + 1e-6  # 15 parts + context
    assert t31["F_reg test"]["Z"] == "" and float(t31["locality"]["Z"]) >= 0
    assert float(t31["locality"]["1-heatmap"]) >= 0
    # one XNN row per class present among the heatmap images, per kind
    assert {r["method"] for r in _csv(out, "localization")} == {"cmwp", "gradcam"}
    assert len(_csv(out, "class_accuracy")) == 10
    for name in (
        "xnn_faithfulness",
        "nmf_faithfulness",
        "nmf_importance",
        "path_layers",
        "path_misclassification",
        "gates",
        "gate_localization",
        "timings",
        "activations",
    ):
        assert _csv(out, name), name
    assert len(_csv(out, "nmf_importance")) == 3
    (nmf_row,) = _csv(out, "nmf_faithfulness")
    for key in ("relative reconstruction error (train)", "activation relative error (test)"):
        assert 0 <= float(nmf_row[key]) <= 1, (key, nmf_row[key])
    assert 0 <= float(nmf_row["prediction agreement %"]) <= 100
    figures = {f for f in os.listdir(out / "figures")}
    for name in (
        "samples",
        "xnn_explanations_srae",
        "xnn_explanations_nn",
        "methods",
        "nmf_concepts",
        "nmf_top_images",
        "path_masks",
        "path_similarity",
        "path_hit_rate",
        "gate_matrix",
        "gate_filters_class0",
        "gate_filters_class1",
    ):
        assert f"{name}.png" in figures, name
        assert (out / "figures" / f"{name}.png").stat().st_size > 2000
        assert f"src='figures/{name}.png'" in page
    stages = {r["stage"]: float(r["seconds"]) for r in _csv(out, "timings")}
    assert {"xnn", "heatmaps", "paths", "gates", "draw figures", "total"} <= set(stages)
    manifest = json.load(open(out / "manifest.json"))
    assert torch.__version__.startswith(manifest["versions"]["torch"])
    assert {"python", "xnn_toolkit", "numpy", "matplotlib"} <= set(manifest["versions"])
    assert manifest["config"]["model"] == "module:Wrapped"
    assert manifest["stages"][0] == "model"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_report_escapes_class_and_layer_names(built):
    out = built["out"]
    for name in ("index.html", "report.md"):
        text = open(out / name, encoding="utf-8").read()
        assert "<script" not in text, name
    page = open(out / "index.html", encoding="utf-8").read()
    for c in CLASSES:  # per-class accuracy table
        assert c.replace("<", "&lt;").replace(">", "&gt;") in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.fc6" in page  # the XNN layer in the card
    # the data files keep the names as they are
    assert _csv(out, "class_accuracy")[0]["class"] == CLASSES[0]


def test_model_is_left_exactly_as_it_was(built):
    now, before = _snapshot(built["model"]), built["before"]
    assert now["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["training"] == before["training"] and all(now["training"])
    assert now["requires_grad"] == before["requires_grad"]
    assert now["hooks"] == before["hooks"]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(methods=("cmwp", "gradcm")), SpecError, "did you mean: gradcam"),
        (dict(methods=("activmap",)), InputError, "maps one filter"),
        (dict(kinds=("srae", "vae")), InputError, "unknown XNN kinds"),
        (dict(n_train=0), InputError, "n_train"),
        (dict(figure_formats=("gif",)), InputError, "figure formats"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, change, error, match):
    def boom(*a, **k):  # loading the model is the first piece of work
        raise AssertionError("the pipeline started")

    cfg = _config(model="bundled:does_not_matter", **change)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("xnn_toolkit.report.pipeline._load", boom)
        with pytest.raises(error, match=match):
            run_explain(cfg, tmp_path / "out")
        with pytest.raises(InputError, match="unknown stage 'nfm'; did you mean: nmf"):
            run_explain(_config(model="x"), tmp_path / "out", stages=["xnn", "nfm"])
        full = tmp_path / "full"
        full.mkdir()
        (full / "keep").write_text("x")
        with pytest.raises(InputError, match="not empty; pass --overwrite"):
            run_explain(_config(model="x"), full)
    assert not (tmp_path / "out").exists()
    assert os.listdir(full) == ["keep"]


# ------------------------------------------------------------------------ browser check


@needs_chromium
def test_report_opens_in_headless_chromium(built, tmp_path):
    # a copy of the report with a probe script in front, next to the original's files
    site = tmp_path / "site"
    shutil.copytree(built["out"], site)
    check, console, n_img = probe_page(site / "index.html", tmp_path)
    assert n_img >= 12
    assert len(check["images"]) == n_img
    assert broken_images(check) == []
    assert check["errors"] == []
    assert console == [], console  # the report has no scripts: any console output is a fault
    # a screenshot of the report itself, kept in the test's folder
    shot = tmp_path / "report.png"
    res = chromium(
        [
            "--window-size=1280,4000",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            (site / "index.html").as_uri(),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_missing_train_split_fits_on_unscored_test_images(tmp_path, monkeypatch):
    import xnn_toolkit.data as data
    from xnn_toolkit.errors import AssetError
    from xnn_toolkit.report.pipeline import build_report

    real = data.load_dataset
    seen = []

    def no_train(spec, *, split="test", **kw):
        seen.append((split, kw.get("n")))
        if split == "train":
            raise AssetError("no train split here")
        return real(spec, split=split, **kw)

    monkeypatch.setattr(data, "load_dataset", no_train)
    report = build_report(_config(Wrapped(), n_train=30, n_test=20), stages=["activations"])
    text = " ".join(b.text for s in report.sections for b in s.blocks if hasattr(b, "text"))
    assert "fitted on test images 20 to 49, never scored" in text
    assert ("test", 50) in seen
    shapes = {
        r["layer"]: r["shape"]
        for s in report.sections
        for b in s.blocks
        if getattr(b, "name", "") == "activations"
        for r in b.rows
    }
    assert shapes[f"{EVIL}.fc6"] == "20x32"


def test_orthogonality_per_class_counts_dead_x_features_without_warning(recwarn):
    from xnn_toolkit.metrics import orthogonality
    from xnn_toolkit.report._explain_stages import _orthogonality_per_class

    gen = torch.Generator().manual_seed(0)
    maps = torch.rand(6, 3, 4, 4, generator=gen)
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 has one image: skipped
    maps[:3, 1] = 0.0  # x-feature 1 is dead on class 0
    maps[3:5, 0] = 0.0
    maps[3:5, 2] = 0.0  # two dead on class 1
    scores, constant = _orthogonality_per_class(maps, labels)
    assert constant == 3 and len(scores) == 2
    assert not [w for w in recwarn if "zero variance" in str(w.message)]
    with pytest.warns(RuntimeWarning, match="2 of 3 variables have zero variance"):
        assert scores[1].o1 == pytest.approx(orthogonality(maps[3:5]).o1)
