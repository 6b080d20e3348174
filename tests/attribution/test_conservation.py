"""Excitation Backprop keeps its books: MWP is a probability on every architecture.

With a one-hot target the marginal winning probability is non-negative and sums to 1 per
image, minus what the rules could not pass down (units with no positive contribution),
which every call books in ``metadata.conservation``. Random weights, small inputs.
"""

import warnings

import pytest
import timm
import torch
import torchvision
from _attr_helpers import assert_unchanged, randomize_bn, snapshot
from torch import nn

from xnn_toolkit.attribution import ContrastiveExcitationBackprop, ExcitationBackprop
from xnn_toolkit.attribution.rules import OpCall, SplitSum
from xnn_toolkit.errors import ConservationWarning, InputError
from xnn_toolkit.layers import default_read_layer

tv = torchvision.models


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


def _tv(name):
    return lambda: getattr(tv, name)(num_classes=10)


ARCHS = {
    "repvgg_a0": _timm("repvgg_a0"),
    "hrnet_w18_small": _timm("hrnet_w18_small"),
    "xception41": _timm("xception41"),
    "googlenet": lambda: tv.googlenet(num_classes=10, aux_logits=False, init_weights=True),
    "efficientnet_b0": _timm("efficientnet_b0"),
    "tf_efficientnet_lite0": _timm("tf_efficientnet_lite0"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "mobilenet_v3_small": _tv("mobilenet_v3_small"),
    "mobilenetv3_small_050": _timm("mobilenetv3_small_050"),
    "shufflenet_v2_x0_5": _tv("shufflenet_v2_x0_5"),
    "ghostnet_100": _timm("ghostnet_100"),
    "fastvit_t8": _timm("fastvit_t8"),
    "convnext_atto": _timm("convnext_atto"),
    "densenet121": _tv("densenet121"),
    "regnetx_002": _timm("regnetx_002"),
    "regnet_y_400mf": _tv("regnet_y_400mf"),
    "resnet18": _tv("resnet18"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "vgg11": _tv("vgg11"),
    "alexnet": _tv("alexnet"),
    "squeezenet1_0": _tv("squeezenet1_0"),
    "mnasnet_small": _timm("mnasnet_small"),
    "ese_vovnet19b_dw": _timm("ese_vovnet19b_dw"),
    "hgnetv2_b0": _timm("hgnetv2_b0"),
    "dla34": _timm("dla34"),
    "cspresnet50": _timm("cspresnet50"),
    "dpn48b": _timm("dpn48b"),
    "selecsls42b": _timm("selecsls42b"),
}


def _build(arch):
    torch.manual_seed(0)
    return randomize_bn(ARCHS[arch]().eval())


def _attribute(method, x, target):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = method.attribute(x, target)
    lost_warnings = [w for w in caught if issubclass(w.category, ConservationWarning)]
    assert all("winning probability" in str(w.message) for w in lost_warnings)
    return res, lost_warnings


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_mwp_is_conserved_or_its_loss_booked(arch):
    net = _build(arch)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = snapshot(net)
    res, warned = _attribute(ExcitationBackprop(net, layer="input"), x, 3)
    assert_unchanged(net, before)
    books = res.metadata.conservation
    raw = res.raw.double()
    assert torch.isfinite(raw).all()
    assert float(raw.min()) >= -1e-9 * float(raw.abs().max())  # non-negative
    torch.testing.assert_close(books.top, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(books.read_sum, raw.flatten(1).sum(1), rtol=1e-9, atol=1e-9)
    # nothing is lost silently: what reaches the input plus what was booked is the whole
    assert abs(float(books.read_sum[0] + books.lost[0]) - 1.0) < 1e-4
    assert -1e-6 <= float(books.lost[0]) <= 1.0 + 1e-6
    share = float(books.lost_share[0])
    assert bool(warned) == (share > 0.01), (share, warned)
    if share > 1e-4:
        assert books.by_layer and max(books.by_layer.values()) > 0
        assert abs(sum(books.by_layer.values()) - share) < 1e-6
        assert float(books.lost_zero[0]) > 0.5 * float(books.lost[0])


#: Architectures whose ReLU-and-pooling paths lose nothing (a literal probability).
LOSSLESS = [
    "resnet18",
    "vgg11",
    "googlenet",
    "regnetx_002",
    "hrnet_w18_small",
    "selecsls42b",
    "dla34",
]


@pytest.mark.parametrize("arch", LOSSLESS)
def test_mwp_sums_to_one_and_cmwp_to_zero(arch):
    net = _build(arch)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    mwp, _ = _attribute(ExcitationBackprop(net, layer="input"), x, [3, 7])
    cmwp, _ = _attribute(ContrastiveExcitationBackprop(net, layer="input"), x, [3, 7])
    sums = mwp.raw.double().flatten(1).sum(1)
    torch.testing.assert_close(sums, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-4)
    csums = cmwp.raw.double().flatten(1).sum(1)
    torch.testing.assert_close(csums, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["repvgg_a0", "googlenet", "efficientnet_b0", "mobilenet_v2"])
def test_no_nan_without_stabiliser_and_default_layer_bounded(arch):
    net = _build(arch)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for layer in (None, "input"):
        res, _ = _attribute(ExcitationBackprop(net, layer=layer, stabilizer=0.0), x, 5)
        assert torch.isfinite(res.raw).all()
        books = res.metadata.conservation
        # bounded: |P| totals what arrives, no mass created by cancelling branches
        assert float(books.read_abs[0]) <= 1.0 + 1e-4
        assert float(books.read_sum[0]) >= float(books.read_abs[0]) - 1e-6


def test_repvgg_old_proportional_split_is_unbounded():
    """The reason for the default: TorchRay's split explodes where branches cancel."""
    net = _build("repvgg_a0")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    new, _ = _attribute(ExcitationBackprop(net, layer="input"), x, 3)
    old, _ = _attribute(ExcitationBackprop(net, layer="input", residual="proportional"), x, 3)
    assert float(new.metadata.conservation.read_abs[0]) <= 1.0 + 1e-4
    assert float(old.metadata.conservation.read_abs[0]) > 1.05  # mass made by cancellation


def _plain_net(scale: float) -> nn.Module:
    torch.manual_seed(5)
    layers, c = [], 3
    for width in (8, 16, 16, 32, 32, 32):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.ReLU()]
        c = width
        if width == 32 or width == 16:
            layers.append(nn.AvgPool2d(2) if len(layers) % 2 else nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5, bias=False)]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def test_relative_stabiliser_does_not_depend_on_activation_magnitude():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    ref = ExcitationBackprop(_plain_net(1.0), layer="input").attribute(x, [1, 4]).raw
    tiny_net = _plain_net(1e-3)  # activations ~1e-21 at the top: absolute 1e-9 swamps them
    tiny = ExcitationBackprop(tiny_net, layer="input").attribute(x, [1, 4]).raw
    torch.testing.assert_close(tiny, ref, rtol=1e-4, atol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        absolute = ExcitationBackprop(tiny_net, layer="input", stabilizer_mode="absolute")
        absolute = absolute.attribute(x, [1, 4]).raw
    assert float(absolute.flatten(1).sum(1).max()) < 0.5  # the old form loses the mass


def _sum_call():
    return OpCall(torch.add, "add", [None, None], {}, (0, 1), (1.0, 1.0))


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("positive", [[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.75, 0.25]]),
        ("absolute", [[2 / 3, 1 / 3], [1 / 3, 2 / 3], [0.5, 0.5], [0.75, 0.25]]),
        ("proportional", [[2.0, -1.0], [-1.0, 2.0], [0.0, 0.0], [0.75, 0.25]]),
    ],
)
def test_residual_splits_by_hand(split, expected):
    # branches (a, b): (2, -1) -> y = 1; (1, -2) -> y = -1; (0, 0); (3, 1) -> y = 4
    a = torch.tensor([2.0, 1.0, 0.0, 3.0])
    b = torch.tensor([-1.0, -2.0, 0.0, 1.0])
    p_y = torch.ones(4)
    pa, pb = SplitSum(0.0, "absolute", split).backward(_sum_call(), (a, b), p_y)
    got = torch.stack([pa, pb], 1)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_unknown_split_and_mode_are_refused():
    net = _plain_net(1.0)
    with pytest.raises(InputError, match="residual"):
        ExcitationBackprop(net, residual="half")
    with pytest.raises(InputError, match="stabilizer_mode"):
        ExcitationBackprop(net, stabilizer_mode="banana")


def test_default_read_layers_are_on_the_main_path_near_stride_16():
    xception = _build("xception41")
    assert default_read_layer(xception) == "blocks.10"  # not the tap inside block 11
    hrnet = _build("hrnet_w18_small")
    name = default_read_layer(hrnet)
    seen = {}

    def hook(_m, _i, out):
        seen.setdefault("shape", tuple(out.shape))

    handle = hrnet.get_submodule(name).register_forward_hook(hook)
    try:
        with torch.no_grad():
            hrnet(torch.zeros(1, 3, 64, 64))
    finally:
        handle.remove()
    assert seen["shape"][-1] == 64 // 16, (name, seen)
    # HRNet's branches join above every stride-16 module: the map says it misses mass
    res, warned = _attribute(ExcitationBackprop(hrnet), torch.randn(1, 3, 64, 64), 3)
    books = res.metadata.conservation
    assert float(books.read_sum[0]) < 0.9 and abs(float(books.lost[0])) < 1e-4
    assert any("does not pass through the read layer" in str(w.message) for w in warned)
    assert default_read_layer(tv.resnet18()) == "layer3"
    assert default_read_layer(tv.vgg11()) == "features.15"  # pool4


def test_fixed_input_size_model_has_a_default_read_layer():
    layers, c = [], 3
    for width in (8, 16, 16, 32, 32):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = width
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 3 * 3, 4)).eval()
    net.pretrained_cfg = {"input_size": (3, 96, 96)}  # only 96 px works
    name = default_read_layer(net)
    res = ExcitationBackprop(net).attribute(torch.rand(1, 3, 96, 96), 2)
    assert res.metadata.layer == name
    assert res.raw.shape[-1] == 96 // 16
