"""CAM, Grad-CAM, Grad-CAM++: against the grad-cam package, Captum and CAM by hand."""

import numpy as np
import pytest
import torch
import torchvision
from _attr_helpers import assert_unchanged, randomize_bn, snapshot

from xnn_toolkit.attribution import CAM, GradCAM, GradCAMPlusPlus, Logits, Unit
from xnn_toolkit.errors import InputError, SpecError


@pytest.fixture(scope="module")
def resnet():
    return randomize_bn(torchvision.models.resnet18(num_classes=10).eval())


def _pytorch_grad_cam(cls, model, layer, x, classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = cls(model=model, target_layers=[layer])
    targets = [ClassifierOutputTarget(c) for c in classes]
    cam(input_tensor=x, targets=targets)
    acts = cam.activations_and_grads.activations[0].cpu().numpy()
    grads = cam.activations_and_grads.gradients[0].cpu().numpy()
    raw = cam.get_cam_image(x, layer, targets, acts, grads)  # before their min-max scaling
    cam.activations_and_grads.release()
    return torch.from_numpy(np.maximum(raw, 0))


def test_gradcam_matches_grad_cam_package_and_captum(resnet):
    from captum.attr import LayerGradCam
    from pytorch_grad_cam import GradCAM as PGC

    x = torch.randn(3, 3, 64, 64)
    classes = [1, 4, 9]
    before = snapshot(resnet)
    ours = GradCAM(resnet, layer="layer3").attribute(x, classes)
    assert_unchanged(resnet, before)
    ref = _pytorch_grad_cam(PGC, resnet, resnet.layer3, x, classes)
    torch.testing.assert_close(ours.raw, ref.float(), rtol=1e-5, atol=1e-5)
    cap = LayerGradCam(resnet, resnet.layer3).attribute(x, target=classes)
    torch.testing.assert_close(ours.raw, cap[:, 0].clamp(min=0), rtol=1e-5, atol=1e-5)
    assert ours.heatmap.shape == (3, 64, 64)
    up = torch.nn.functional.interpolate(
        ours.raw[:, None], size=(64, 64), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(ours.heatmap, up)


def test_gradcam_plus_plus_matches_grad_cam_package(resnet):
    from pytorch_grad_cam import GradCAMPlusPlus as PGCPP

    x = torch.randn(2, 3, 64, 64)
    ours = GradCAMPlusPlus(resnet, layer="layer4").attribute(x, [3, 8])
    ref = _pytorch_grad_cam(PGCPP, resnet, resnet.layer4, x, [3, 8])
    torch.testing.assert_close(ours.raw, ref.float(), rtol=1e-5, atol=1e-6)


def test_gradcam_default_layer_and_per_image_targets(resnet):
    x = torch.randn(2, 3, 64, 64)
    both = GradCAM(resnet).attribute(x, [2, 5])
    assert both.metadata.layer == "layer4"
    one = GradCAM(resnet).attribute(x[1:], 5)
    torch.testing.assert_close(both.raw[1:], one.raw, rtol=1e-5, atol=1e-6)


def test_gradcam_of_a_unit_is_linear_in_logit_weights(resnet):
    x = torch.randn(2, 3, 64, 64)
    w = torch.zeros(10)
    w[4] = 1
    via_weights = GradCAM(resnet, layer="layer3").attribute(x, Logits(w))
    via_class = GradCAM(resnet, layer="layer3").attribute(x, 4)
    via_unit = GradCAM(resnet, layer="layer3").attribute(x, Unit(None, 4))
    torch.testing.assert_close(via_weights.raw, via_class.raw)
    torch.testing.assert_close(via_unit.raw, via_class.raw)


def test_cam_is_the_class_weighted_sum_of_the_last_maps(resnet):
    x = torch.randn(2, 3, 64, 64)
    grabbed = {}
    h = resnet.layer4.register_forward_hook(lambda m, i, o: grabbed.setdefault("a", o.detach()))
    with torch.no_grad():
        resnet(x)
    h.remove()
    a, w = grabbed["a"], resnet.fc.weight.detach()
    ref = torch.stack(
        [sum(w[c, k] * a[n, k] for k in range(a.shape[1])) for n, c in enumerate([6, 0])]
    )
    res = CAM(resnet).attribute(x, [6, 0])
    torch.testing.assert_close(res.raw, ref, rtol=1e-5, atol=1e-5)
    assert res.metadata.layer == "fc.input_map"
    share = res.mask.float().mean((1, 2))
    assert torch.all(share >= 0.3)  # ties of the upsampled map may add a few pixels
    for n in range(2):
        assert res.heatmap[n][res.mask[n]].min() >= res.heatmap[n][~res.mask[n]].max()
    CAM(resnet, layer="layer4").attribute(x, 1)  # the pooled layer may be named explicitly
    with pytest.raises(InputError, match="does not output it"):
        CAM(resnet, layer="layer3").attribute(x, 1)


def test_cam_finds_a_functional_relu_before_the_pool():
    net = torchvision.models.densenet121(num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    grabbed = {}
    h = net.features.register_forward_hook(lambda m, i, o: grabbed.setdefault("a", o.detach()))
    res = CAM(net).attribute(x, 2)
    h.remove()
    a = torch.relu(grabbed["a"])
    ref = torch.einsum("k,nkhw->nhw", net.classifier.weight[2].detach(), a)
    torch.testing.assert_close(res.raw, ref, rtol=1e-5, atol=1e-5)


def test_cam_rejects_other_heads_and_targets(resnet):
    vgg = torchvision.models.vgg11(num_classes=4).eval()
    with pytest.raises(SpecError, match="global average pooling"):
        CAM(vgg).attribute(torch.randn(1, 3, 32, 32), 0)
    with pytest.raises(InputError, match="use GradCAM"):
        CAM(resnet).attribute(torch.randn(1, 3, 32, 32), Unit("layer3", 0))
