"""Captum bridge: the same numbers as calling Captum directly, for any target."""

import captum.attr as ca
import pytest
import torch
from _attr_helpers import PlainNet, assert_unchanged, snapshot
from torch import nn

from xnn_toolkit.attribution import (
    GuidedBackprop,
    HeadOutput,
    InputXGradient,
    IntegratedGradients,
    Logits,
    Occlusion,
    Saliency,
    explain,
)
from xnn_toolkit.errors import InputError


@pytest.fixture
def net():
    return PlainNet(classes=5, size=16).eval()


CASES = [
    (Saliency, ca.Saliency, {}, {}),
    (InputXGradient, ca.InputXGradient, {}, {}),
    (IntegratedGradients, ca.IntegratedGradients, {"n_steps": 8}, {"n_steps": 8}),
    (GuidedBackprop, ca.GuidedBackprop, {}, {}),
    (
        Occlusion,
        ca.Occlusion,
        {"window": 4, "stride": 4},
        {"sliding_window_shapes": (3, 4, 4), "strides": (3, 4, 4)},
    ),
]


@pytest.mark.parametrize("ours_cls, captum_cls, kw, captum_kw", CASES)
def test_bridge_equals_captum_on_class_targets(net, ours_cls, captum_cls, kw, captum_kw):
    x = torch.randn(3, 3, 16, 16)
    before = snapshot(net)
    ours = ours_cls(net, **kw).attribute(x, [0, 4, 2])
    assert_unchanged(net, before)
    ref = captum_cls(net).attribute(x.clone(), target=[0, 4, 2], **captum_kw)
    torch.testing.assert_close(ours.raw, ref.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.heatmap, ref.detach().sum(1), rtol=1e-4, atol=1e-6)
    assert ours.metadata.layer == "input"


def test_bridge_handles_logit_mixtures_and_head_outputs(net):
    x = torch.randn(2, 3, 16, 16)
    w = torch.tensor([[1.0, -2.0, 0, 0, 0.5], [0, 0, 1.0, 0, 0]])
    ours = IntegratedGradients(net, n_steps=6).attribute(x, Logits(w))

    for n in range(2):  # one image at a time: no batch expansion to get right

        def mix(inp, n=n):
            return (net(inp) * w[n]).sum(1)

        ref = ca.IntegratedGradients(mix).attribute(x[n : n + 1], n_steps=6)
        torch.testing.assert_close(ours.raw[n : n + 1], ref, rtol=1e-4, atol=1e-6)
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3)).eval()
    got = Saliency(net).attribute(x, HeadOutput("2", head, [2, 1]))

    def head_out(inp):
        return head(nn.Sequential(*list(net)[:3])(inp))

    ref = ca.Saliency(head_out).attribute(x, target=[2, 1])
    torch.testing.assert_close(got.raw, ref, rtol=1e-4, atol=1e-6)


def test_bridge_reads_at_the_input_only(net):
    with pytest.raises(InputError, match="attributes to the input"):
        Saliency(net, layer="3")
    r = explain(net, torch.randn(1, 3, 16, 16), 1, method="ig", n_steps=4)
    assert r.metadata.method == "integrated_gradients"
    assert r.metadata.params["n_steps"] == 4
