"""The CAM family bridged from pytorch-grad-cam: equal to the package's own output."""

import sys

import numpy as np
import pytest
import torch
from _attr_helpers import assert_unchanged, snapshot

from xnn_toolkit.attribution import available_methods, explain, get_method
from xnn_toolkit.errors import InputError, MissingExtraError, SpecError
from xnn_toolkit.models import load_model

pytest.importorskip("pytorch_grad_cam")

BRIDGED = {
    "scorecam": "ScoreCAM",
    "layercam": "LayerCAM",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "ablationcam": "AblationCAM",
    "fullgrad": "FullGrad",
}
# the masked-forward methods run one forward per channel: a small batch keeps them quick
OPTIONS = {"scorecam": {"batch_size": 128}, "ablationcam": {"batch_size": 128}}


@pytest.fixture(scope="module")
def vgg():
    return load_model("bundled:vgg_synth").model


def _package_output(cls_name, model, layer, x, classes, options):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pytorch_grad_cam, cls_name)
    ctor = {k: v for k, v in options.items() if k != "batch_size" or cls_name != "ScoreCAM"}
    with cls(model=model, target_layers=[] if layer is None else [layer], **ctor) as cam:
        if cls_name == "ScoreCAM" and "batch_size" in options:
            cam.batch_size = options["batch_size"]
        out = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def test_registered():
    names = available_methods()
    for name in BRIDGED:
        assert name in names


@pytest.mark.parametrize("method", sorted(BRIDGED))
def test_equals_pytorch_grad_cam(vgg, method):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 48)
    classes = [1, 3]
    vgg.train()  # the package puts models in eval mode: the guard must undo it
    snap = snapshot(vgg)
    got = explain(vgg, x, classes, method=method, **OPTIONS.get(method, {}))
    assert_unchanged(vgg, snap)
    assert got.heatmap.shape == (2, 48, 48) and got.heatmap.dtype == torch.float32
    assert torch.isfinite(got.heatmap).all() and got.heatmap.max() > 0
    layer = None if method == "fullgrad" else vgg.features[21]
    if method != "fullgrad":
        assert got.metadata.layer == "features.21"
    vgg.eval()
    want = _package_output(BRIDGED[method], vgg, layer, x, classes, OPTIONS.get(method, {}))
    torch.testing.assert_close(got.heatmap, want, rtol=1e-5, atol=1e-6)


def test_target_changes_the_map(vgg):
    x = torch.rand(1, 3, 48, 48)
    a = explain(vgg, x, 0, method="layercam").heatmap
    b = explain(vgg, x, 2, method="layercam").heatmap
    assert not torch.allclose(a, b)


def test_errors_leave_model_unchanged(vgg):
    x = torch.rand(1, 3, 48, 48)
    snap = snapshot(vgg)
    with pytest.raises(InputError, match="classifier"):
        explain(vgg, x, 0, method="layercam", layer="classifier")
    assert_unchanged(vgg, snap)
    with pytest.raises(InputError, match="unknown option"):
        get_method("scorecam")(vgg, batch=3)
    with pytest.raises(InputError, match="leave it None"):
        get_method("fullgrad")(vgg, layer="features.21")
    with pytest.raises(SpecError, match="scorecam"):
        get_method("scorcam")


def test_missing_extra_names_it(vgg, monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(MissingExtraError, match=r"xnn_toolkit\[cam\]"):
        get_method("layercam")(vgg)
