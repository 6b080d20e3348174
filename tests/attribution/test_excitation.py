"""Excitation Backprop (MWP, c-MWP): literal formula, conservation, peers as oracles."""

import copy

import pytest
import torch
import torchvision
from _attr_helpers import (
    PlainNet,
    ResidualConcatNet,
    assert_unchanged,
    planted_net,
    randomize_bn,
    snapshot,
)
from torch import nn

from xnn_toolkit.attribution import (
    Channel,
    ContrastiveExcitationBackprop,
    ExcitationBackprop,
    GradCAM,
    HeadOutput,
    Unit,
    excitation_mode,
)
from xnn_toolkit.errors import InputError


def _literal_mwp(layers: list[nn.Module], x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """docs/methods/excitation.rst written out with dense matrices, float64, one image.

    Every linear map (conv, average pool, linear; biases dropped) is turned into its matrix
    ``M`` (outputs x inputs); contributions are ``c_ij = max(a_j M_ij, 0)`` (``a_j w+_ij``
    for ``a >= 0``; the documented alpha1-beta0 fallback for signed inputs), and
    ``P_j = sum_i c_ij / sum_j' c_ij' P_i``. Max pooling hands ``P_i`` to its winner; ReLU and
    Flatten pass ``P`` through.
    """
    acts = [x.double()]
    for layer in layers:
        acts.append(layer.double()(acts[-1]))
    p = top.double().flatten()
    for layer, a in zip(reversed(layers), reversed(acts[:-1])):
        if isinstance(layer, nn.ReLU | nn.Flatten):
            continue
        a_flat = a.flatten()
        if isinstance(layer, nn.Conv2d):

            def fn(t, layer=layer):
                return nn.functional.conv2d(t, layer.weight, None, layer.stride, layer.padding)

        elif isinstance(layer, nn.Linear):

            def fn(t, layer=layer):
                return t @ layer.weight.T

        else:
            fn = layer
        jac = torch.autograd.functional.jacobian(fn, a).reshape(p.numel(), a_flat.numel())
        new = torch.zeros_like(a_flat)
        if isinstance(layer, nn.MaxPool2d):
            for i in range(p.numel()):
                new[int(jac[i].argmax())] += p[i]
        else:
            for i in range(p.numel()):
                c = (a_flat * jac[i]).clamp(min=0)
                if c.sum() > 0:
                    new += c / c.sum() * p[i]
        p = new
    return p.view_as(x).float()


def test_mwp_matches_the_literal_formula():
    net = PlainNet(classes=5, size=16).eval()
    x = torch.randn(2, 3, 16, 16)  # signed input: the first layer takes the fallback
    res = ExcitationBackprop(net, layer="input").attribute(x, [1, 4])
    for n, c in enumerate([1, 4]):
        top = torch.zeros(1, 5)
        top[0, c] = 1
        ref = _literal_mwp(list(copy.deepcopy(net)), x[n : n + 1], top)
        torch.testing.assert_close(res.raw[n : n + 1], ref, rtol=1e-4, atol=1e-7)
    assert any("alpha1-beta0" in f for f in res.metadata.fallbacks)
    # biases are ignored and the mass is conserved down to the input
    torch.testing.assert_close(res.raw.flatten(1).sum(1), torch.ones(2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("layer", ["input", "c1", "tap_add", "tap_iadd", "tap_cat", "c4"])
def test_mwp_mass_is_conserved_through_adds_concat_and_pooling(layer):
    """Every layer listed is a cut of the graph (all paths to the output cross it)."""
    net = ResidualConcatNet().eval()
    x = torch.rand(3, 3, 16, 16)
    res = ExcitationBackprop(net, layer=layer).attribute(x, [0, 2, 4])
    assert (res.raw >= -1e-7).all()
    torch.testing.assert_close(res.raw.flatten(1).sum(1), torch.ones(3), atol=1e-4, rtol=0)
    assert res.metadata.fallbacks == ()


def test_mwp_splits_between_a_residual_branch_and_its_shortcut():
    net = ResidualConcatNet().eval()
    x = torch.rand(2, 3, 16, 16)
    branch = ExcitationBackprop(net, layer="c2").attribute(x, 1).raw.flatten(1).sum(1)
    assert ((branch > 0.01) & (branch < 0.99)).all()


def test_rules_are_recorded_per_module_type():
    net = ResidualConcatNet().eval()
    res = ExcitationBackprop(net, layer="input").attribute(torch.rand(1, 3, 16, 16), 0)
    rules = res.metadata.rules
    assert rules["Conv2d"].startswith("z+")
    assert rules["ReLU"] == "pass-through"
    assert rules["ResidualConcatNet.add"] == "positive split over the branches"
    assert rules["ResidualConcatNet.add_"] == "positive split over the branches"
    assert rules["ResidualConcatNet.cat"] == "routed to its parts"
    assert rules["ResidualConcatNet.max_pool2d"] == "winner takes all"


def test_forward_values_are_unchanged_inside_the_mode():
    net = torchvision.models.resnet18(num_classes=7).eval()
    randomize_bn(net)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
    xg = x.clone().requires_grad_(True)
    with excitation_mode(net) as mode:
        out = net(xg)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "BasicBlock.add_" in mode.log.rules


def _dual(model: nn.Module, last: str) -> nn.Module:
    dual = copy.deepcopy(model)
    layer = dual.get_submodule(last)
    layer.weight.data.neg_()
    return dual


@pytest.mark.parametrize("layer", ["input", "c2", "tap_cat"])
def test_cmwp_equals_mwp_minus_mwp_of_the_dual(layer):
    net = ResidualConcatNet().eval()
    x = torch.rand(2, 3, 16, 16)
    c = ContrastiveExcitationBackprop(net, layer=layer).attribute(x, [1, 3])
    pos = ExcitationBackprop(net, layer=layer).attribute(x, [1, 3])
    neg = ExcitationBackprop(_dual(net, "fc"), layer=layer).attribute(x, [1, 3])
    torch.testing.assert_close(c.raw, pos.raw - neg.raw, rtol=1e-4, atol=1e-7)
    assert c.metadata.params["contrast_layer"] == "fc"
    assert (c.heatmap >= 0).all()


def test_cmwp_equals_two_passes_on_resnet18_with_batchnorm():
    net = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    c = ContrastiveExcitationBackprop(net).attribute(x, [2, 5])
    pos = ExcitationBackprop(net).attribute(x, [2, 5])
    neg = ExcitationBackprop(_dual(net, "fc")).attribute(x, [2, 5])
    assert c.metadata.layer == "layer3"
    torch.testing.assert_close(c.raw, pos.raw - neg.raw, rtol=1e-3, atol=1e-6)


def test_batchnorm_fold_equals_a_literally_fused_model():
    net = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    fused = copy.deepcopy(net)
    pairs = [("conv1", "bn1")]
    for name, mod in fused.named_modules():
        if isinstance(mod, torchvision.models.resnet.BasicBlock):
            pairs += [(f"{name}.conv1", f"{name}.bn1"), (f"{name}.conv2", f"{name}.bn2")]
            if mod.downsample is not None:
                pairs.append((f"{name}.downsample.0", f"{name}.downsample.1"))
    for conv_name, bn_name in pairs:
        conv, bn = fused.get_submodule(conv_name), fused.get_submodule(bn_name)
        new = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        parent, _, leaf = conv_name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, leaf, new)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(fused.get_submodule(parent) if parent else fused, leaf, nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    ours = ExcitationBackprop(net, layer="layer2", batchnorm="fold").attribute(x, [1, 7])
    ref = ExcitationBackprop(fused, layer="layer2").attribute(x, [1, 7])
    torch.testing.assert_close(ours.raw, ref.raw, rtol=1e-4, atol=1e-7)
    assert ours.metadata.rules["BatchNorm2d"] == "folded into the preceding conv"
    ident = ExcitationBackprop(net, layer="layer2", batchnorm="identity").attribute(x, [1, 7])
    assert not torch.allclose(ident.raw, ours.raw, rtol=1e-3)


def _zennit_mwp(model, x, classes, canonizers):
    from zennit.composites import ExcitationBackprop as ZennitEB

    composite = ZennitEB(stabilizer=1e-6, zero_params=["bias"], canonizers=canonizers)
    xg = x.clone().requires_grad_(True)
    with composite.context(model) as modified:
        out = modified(xg)
        onehot = torch.zeros_like(out)
        onehot[torch.arange(len(classes)), classes] = 1
        (rel,) = torch.autograd.grad(out, xg, onehot)
    return rel


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_mwp_matches_zennit_excitation_backprop(arch):
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    net = randomize_bn(getattr(torchvision.models, arch)(num_classes=20).eval())
    for p in net.parameters():
        p.requires_grad_(False)
    canon = [ResNetCanonizer()] if arch.startswith("resnet") else [VGGCanonizer()]
    x = torch.randn(2, 3, 64, 64)
    classes = [3, 11]
    ref = _zennit_mwp(net, x, classes, canon)
    for p in net.parameters():
        p.requires_grad_(True)
    before = snapshot(net)
    # zennit: an absolute stabiliser and the proportional split of residual sums
    ours = ExcitationBackprop(
        net, layer="input", stabilizer=1e-6, stabilizer_mode="absolute", residual="proportional"
    )
    ours = ours.attribute(x, classes).raw
    assert_unchanged(net, before)
    for n in range(2):
        corr = torch.corrcoef(torch.stack([ours[n].flatten(), ref[n].flatten()]))[0, 1]
        assert corr >= 0.999
        # where a residual sum nearly cancels, both stabilised ratios amplify rounding
        torch.testing.assert_close(ours[n], ref[n], rtol=1e-3, atol=1e-5)


def test_mwp_and_cmwp_match_torchray_on_vgg16_at_pool4():
    from torchray.attribution.excitation_backprop import (
        contrastive_excitation_backprop,
        excitation_backprop,
    )

    # float64: c-MWP is a small difference of two maps that each carry mass 1
    net = torchvision.models.vgg16(num_classes=20).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    kw = {"stabilizer": 1e-20, "stabilizer_mode": "absolute"}  # TorchRay's form
    ours = ExcitationBackprop(net, layer="features.23", **kw).attribute(x, [4, 9])
    ours_c = ContrastiveExcitationBackprop(net, layer="features.23", **kw)
    ours_c = ours_c.attribute(x, [4, 9])
    for n, c in enumerate([4, 9]):
        ref = excitation_backprop(net, x[n : n + 1], c, saliency_layer="features.23")
        torch.testing.assert_close(ours.raw[n : n + 1].sum(1, keepdim=True), ref)
        ref = contrastive_excitation_backprop(
            net,
            x[n : n + 1],
            c,
            saliency_layer="features.23",
            contrast_layer="features.30",
            classifier_layer="classifier.6",
        )
        mine = ours_c.raw[n : n + 1].sum(1, keepdim=True).clamp(min=0)
        corr = torch.corrcoef(torch.stack([mine.flatten(), ref.flatten()]))[0, 1]
        assert corr >= 0.999
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    for p in net.parameters():  # TorchRay leaves them frozen
        p.requires_grad_(True)


def test_mwp_matches_torchray_resnet_with_identity_batchnorm():
    from torchray.attribution.excitation_backprop import excitation_backprop, update_resnet

    net = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    patched = update_resnet(copy.deepcopy(net))  # TorchRay edits the blocks' forward
    x = torch.randn(1, 3, 64, 64)
    ref = excitation_backprop(patched, x, 6, saliency_layer="layer3")
    ours = ExcitationBackprop(
        net,
        batchnorm="identity",
        stabilizer=1e-20,
        stabilizer_mode="absolute",
        residual="proportional",  # TorchRay's split of the skip connections
    ).attribute(x, 6)
    torch.testing.assert_close(ours.raw.sum(1, keepdim=True), ref, rtol=1e-4, atol=1e-7)


def test_planted_region_pointing_game():
    size, region = 32, (6, 14, 18, 28)
    net = planted_net(size, region).eval()
    x = torch.randn(100, 3, size, size)
    y0, y1, x0, x1 = region
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[y0 - 1 : y1 + 1, x0 - 1 : x1 + 1] = True  # the first conv's one-pixel reach
    target = torch.arange(100) % 3
    methods = [
        ExcitationBackprop(net, layer="input"),
        ContrastiveExcitationBackprop(net, layer="input"),
        ExcitationBackprop(net, layer="3"),
        GradCAM(net, layer="2"),
    ]
    for method in methods:
        heat = method.attribute(x, target).heatmap
        flat = heat.flatten(1)
        assert (flat.max(1).values > 0).all()
        peak = flat.argmax(1)
        hits = inside.flatten()[peak]
        assert hits.all(), f"{method!r}: {int(hits.sum())}/100"


def test_unit_channel_and_head_targets():
    net = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 64, 64)
    head = nn.Sequential(
        nn.Conv2d(256, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)
    ).eval()
    # Reference: the network truncated at layer3 with the head on top, explaining a class.
    trunk = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, head
    ).eval()
    for cls in (ExcitationBackprop, ContrastiveExcitationBackprop):
        ours = cls(net, layer="layer2").attribute(x, HeadOutput("layer3", head, [1, 3]))
        ref = cls(trunk, layer="5").attribute(x, [1, 3])
        torch.testing.assert_close(ours.raw, ref.raw, rtol=1e-4, atol=1e-7)
    assert ours.metadata.params["contrast_layer"] == "head.4"
    # A unit: the map at its own layer is one-hot; below, mass 1 arrives.
    conv = "layer3.1.conv2"
    unit = ExcitationBackprop(net, layer=conv).attribute(x, Unit(conv, (5, 1, 2)))
    onehot = torch.zeros_like(unit.raw)
    onehot[:, 5, 1, 2] = 1
    torch.testing.assert_close(unit.raw, onehot)
    below = ExcitationBackprop(net, layer="layer2").attribute(x, Unit("layer3", [7, 300]))
    torch.testing.assert_close(below.raw.flatten(1).sum(1), torch.ones(2), atol=1e-4, rtol=0)
    # A channel equals a head that average-pools that channel.
    pool = _ChannelPool(9)
    chan = ExcitationBackprop(net, layer="layer2").attribute(x, Channel("layer3", 9))
    via_head = ExcitationBackprop(net, layer="layer2").attribute(x, HeadOutput("layer3", pool, 0))
    torch.testing.assert_close(chan.raw, via_head.raw, rtol=1e-4, atol=1e-7)


class _ChannelPool(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, a):
        return a[:, self.c].mean((1, 2))[:, None]


def test_layernorm_and_signed_inputs_take_recorded_fallbacks():
    import timm

    net = timm.create_model("convnext_atto", num_classes=5).eval()
    res = ExcitationBackprop(net).attribute(torch.randn(2, 3, 64, 64), [0, 1])
    text = " ".join(res.metadata.fallbacks)
    assert "layer_norm" in text and "alpha1-beta0" in text
    assert torch.isfinite(res.raw).all()
    # each fallback names the modules where it was taken, by their dotted names
    (norms,) = [f for f in res.metadata.fallbacks if "layer_norm" in f]
    places = norms.split("[at ", 1)[1].rstrip("]").split(", ")
    names = dict(net.named_modules())
    assert places[0] in names and places[0].startswith("stages.")
    assert all(p in names for p in places if " and " not in p)


def test_errors_leave_the_model_unchanged():
    net = ResidualConcatNet()
    net.train()
    net.c1.weight.grad = torch.ones_like(net.c1.weight)
    before = snapshot(net)
    with pytest.raises(InputError, match="out of range"):
        ExcitationBackprop(net, layer="c2").attribute(torch.rand(2, 3, 16, 16), [0, 99])
    assert_unchanged(net, before)
    ExcitationBackprop(net, layer="c2").attribute(torch.rand(2, 3, 16, 16), [0, 1])
    assert_unchanged(net, before)


def test_cmwp_needs_a_layer_below_the_target():
    net = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(InputError, match="c-MWP needs a conv or linear layer"):
        ContrastiveExcitationBackprop(net, layer="layer2").attribute(
            torch.randn(1, 3, 32, 32), Channel("layer3", 2)
        )


class _SignFlip(nn.Module):
    """A ReLU output made negative in place before a conv: the sign check must notice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        a.neg_()  # no rule for neg_: plain gradient, and the tensor is no longer >= 0
        return self.fc(self.c2(a).mean((2, 3)))


def test_in_place_changes_reset_the_non_negativity_shortcut():
    res = ExcitationBackprop(_SignFlip().eval(), layer="c1").attribute(torch.rand(1, 3, 8, 8), 0)
    text = " ".join(res.metadata.fallbacks)
    assert "neg_: no excitation rule" in text
    assert "alpha1-beta0) [at c2]" in text
