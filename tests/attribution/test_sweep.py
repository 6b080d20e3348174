"""Architecture sweep: every method on many timm / torchvision families.

Small variants, 64 x 64 images, batch 2. Every method returns finite maps of the right
shape and leaves the model exactly unchanged; forward values are unchanged under the
excitation mode; undefined rules show up as recorded fallbacks, never silently.
"""

import pytest
import timm
import torch
import torchvision
from _attr_helpers import assert_unchanged, randomize_bn, snapshot

from xnn_toolkit.attribution import excitation_mode, explain
from xnn_toolkit.errors import SpecError

tv = torchvision.models


def _small_vgg():
    """VGG-11 with a narrow classifier MLP (the 4096-wide one only costs time here)."""
    net = tv.vgg11(num_classes=10)
    net.classifier = torch.nn.Sequential(
        torch.nn.Linear(512 * 7 * 7, 64),
        torch.nn.ReLU(True),
        torch.nn.Dropout(),
        torch.nn.Linear(64, 10),
    )
    return net


FAMILIES = {
    # name: (constructor, expected fallback substrings of MWP read at the input)
    "vgg11": (lambda: _small_vgg(), ["alpha1-beta0"]),
    "resnet18": (lambda: tv.resnet18(num_classes=10), ["alpha1-beta0"]),
    "densenet121": (lambda: tv.densenet121(num_classes=10), ["BatchNorm not right after"]),
    "mobilenet_v2": (lambda: tv.mobilenet_v2(num_classes=10), []),
    "mobilenet_v3_small": (lambda: tv.mobilenet_v3_small(num_classes=10), []),
    "efficientnet_b0": (lambda: timm.create_model("efficientnet_b0", num_classes=10), []),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", num_classes=10), ["layer_norm"]),
    "shufflenet_v2": (lambda: tv.shufflenet_v2_x0_5(num_classes=10), []),
    "squeezenet1_1": (lambda: tv.squeezenet1_1(num_classes=10), []),
    "regnetx_002": (lambda: timm.create_model("regnetx_002", num_classes=10), []),
    "mnasnet0_5": (lambda: tv.mnasnet0_5(num_classes=10), []),
    "timm_resnet10t": (lambda: timm.create_model("resnet10t", num_classes=10), []),
    "rexnet_100": (lambda: timm.create_model("rexnet_100", num_classes=10), []),
    "ghostnet_050": (lambda: timm.create_model("ghostnet_050", num_classes=10), []),
}

METHODS = [
    ("mwp", {}),
    ("cmwp", {}),
    ("mwp", {"layer": "input"}),
    ("gradcam", {}),
    ("gradcam++", {}),
    ("cam", {}),
    ("gradmap", {}),
    ("activmap", {}),
    ("saliency", {}),
    ("input_x_gradient", {}),
    ("integrated_gradients", {"n_steps": 2}),
    ("guided_backprop", {}),
    ("occlusion", {"window": 32, "stride": 32}),
]


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_on_every_family(family):
    make, expected = FAMILIES[family]
    net = randomize_bn(make())
    net.train()  # the guard must restore training mode too
    before = snapshot(net)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        net.eval()
        ref = net(x)
        net.train()
    xg = x.clone().requires_grad_(True)
    with excitation_mode(net):
        net.eval()
        out = net(xg)
        net.train()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ran = 0
    for method, kw in METHODS:
        target = [1, 2]
        try:
            res = explain(net, x, target, method=method, **kw)
        except SpecError:
            assert method == "cam", f"{family}: {method} raised"
            continue
        finally:
            assert_unchanged(net, before)
        ran += 1
        assert res.heatmap.shape == (2, 64, 64), (family, method)
        assert torch.isfinite(res.raw).all() and torch.isfinite(res.heatmap).all()
        assert res.raw.shape[0] == 2
        if method in ("cmwp", "gradcam", "gradcam++"):
            assert (res.heatmap >= 0).all()
        if method == "mwp" and kw.get("layer") == "input":
            text = " ".join(res.metadata.fallbacks)
            for piece in expected:
                assert piece in text, (family, res.metadata.fallbacks)
            assert "plain gradient" not in text, (family, res.metadata.fallbacks)
    assert ran >= len(METHODS) - 1
