"""Call shape, registry, explain() and validation at the door."""

import pytest
import torch
from _attr_helpers import PlainNet, ResidualConcatNet, assert_unchanged, snapshot
from torch import nn

from xnn_toolkit.attribution import (
    Attribution,
    Channel,
    Class,
    ExcitationBackprop,
    GradCAM,
    HeadOutput,
    Logits,
    Unit,
    as_target,
    available_methods,
    explain,
    get_method,
)
from xnn_toolkit.errors import InputError, LayerNotFoundError, SpecError, XnnError


def test_registry_lists_every_method():
    names = available_methods()
    for n in [
        "mwp",
        "cmwp",
        "cam",
        "gradcam",
        "gradcam++",
        "gradmap",
        "activmap",
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "guided_backprop",
        "occlusion",
    ]:
        assert n in names
    assert get_method("Grad-CAM").name == "gradcam"


def test_unknown_method_names_close_matches():
    with pytest.raises(SpecError, match="did you mean: .*gradcam"):
        explain(PlainNet(), torch.randn(1, 3, 16, 16), 0, method="gradcan")


def test_explain_returns_an_attribution_with_metadata():
    net = ResidualConcatNet().eval()
    r = explain(net, torch.rand(2, 3, 16, 16), [1, 2], method="cmwp", layer="tap_cat")
    assert isinstance(r, Attribution)
    assert r.raw.shape == (2, 16, 8, 8) and r.heatmap.shape == (2, 16, 16)
    assert r.metadata.method == "cmwp" and r.metadata.layer == "tap_cat"
    assert r.metadata.target == "Class([1, 2])"
    assert r.metadata.batchnorm == "fold"


def test_target_conversion():
    assert isinstance(as_target(3, 2), Class)
    assert isinstance(as_target([1, 2], 2), Class)
    assert isinstance(as_target(torch.tensor([1, 2]), 2), Class)
    assert isinstance(as_target(torch.ones(5), 2), Logits)
    assert isinstance(as_target(None, 2), Class)
    with pytest.raises(InputError, match="3 values for a batch of 2"):
        as_target([1, 2, 3], 2)
    with pytest.raises(InputError, match="rows for a batch"):
        as_target(torch.ones(3, 5), 2)
    with pytest.raises(InputError, match="cannot use"):
        as_target("cat", 2)
    with pytest.raises(InputError, match="bool"):
        as_target(True, 2)


def test_target_weights_by_hand():
    out = torch.zeros(2, 3, 2, 2)
    g = Unit("x", (1, 0, 1)).weights(out)
    assert g[:, 1, 0, 1].tolist() == [1.0, 1.0] and g.sum() == 2
    g = Unit("x", [0, 11]).weights(out)
    assert g.flatten(1)[0, 0] == 1 and g.flatten(1)[1, 11] == 1
    a = torch.arange(24.0).view(2, 3, 2, 2)
    c = Channel("x", [2, 0])
    torch.testing.assert_close(c.score(a), torch.stack([a[0, 2].mean(), a[1, 0].mean()]))
    e = c.excitation(a)
    torch.testing.assert_close(e[0, 2], a[0, 2] / a[0, 2].sum(), rtol=1e-6, atol=1e-9)
    assert e[0, :2].abs().sum() == 0
    with pytest.raises(InputError, match="out of range in dimension 1"):
        Unit("x", (3, 0, 0)).weights(out)
    with pytest.raises(InputError, match="out of range"):
        Unit("x", [0, 12]).weights(out)
    with pytest.raises(InputError, match="N x K logits"):
        Class(0).weights(out)


def test_bad_inputs_raise_clear_errors():
    net = ResidualConcatNet().eval()
    before = snapshot(net)
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(InputError, match="out of range"):
        ExcitationBackprop(net, layer="c1").attribute(x, [0, 5])
    with pytest.raises(InputError, match="3 values for a batch of 2"):
        GradCAM(net, layer="c4").attribute(x, [0, 1, 2])
    with pytest.raises(InputError, match="N x C x H x W"):
        ExcitationBackprop(net).attribute(torch.rand(3, 16, 16), 0)
    with pytest.raises(InputError, match="float"):
        ExcitationBackprop(net).attribute(torch.ones(1, 3, 16, 16, dtype=torch.long), 0)
    # a read layer above the target's layer never runs before the target
    with pytest.raises(InputError, match="did not run before the target layer"):
        ExcitationBackprop(net, layer="c4").attribute(x, Unit("c2", 0))
    with pytest.raises(LayerNotFoundError, match="did you mean"):
        ExcitationBackprop(net, layer="c5").attribute(x, 0)
    assert_unchanged(net, before)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.unused = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.side(x)  # runs, but nothing downstream uses it
        return self.fc(torch.relu(self.body(x)).mean((2, 3)))


class _DictModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return {"logits": self.c(x).mean((2, 3))}


def test_layers_not_between_input_and_target():
    net = _TwoHeads().eval()
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(InputError, match="did not run at all"):
        ExcitationBackprop(net, layer="unused").attribute(x, 0)
    with pytest.raises(InputError, match="not between the input and the target"):
        ExcitationBackprop(net, layer="side").attribute(x, 0)
    with pytest.raises(InputError, match="not between the input and the target"):
        GradCAM(net, layer="side").attribute(x, 0)


def test_models_whose_output_is_not_a_tensor():
    for method in ["mwp", "gradcam", "saliency", "cam"]:
        with pytest.raises(XnnError, match="not a tensor"):
            explain(
                _DictModel(),
                torch.rand(1, 3, 8, 8),
                0,
                method=method,
                layer=None if method in ("saliency", "cam") else "c",
            )


def test_head_must_be_a_module():
    with pytest.raises(InputError, match="nn.Module"):
        HeadOutput("c1", lambda a: a, 0)
