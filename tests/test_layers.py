"""Layer resolution: names, modules, stages, close-name suggestions, and an architecture sweep."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from xnn_toolkit.errors import LayerNotFoundError
from xnn_toolkit.layers import default_read_layer, list_layers, resolve_layer, stages

# (id, library, name, input size): one or two small members of each family, random weights
ARCHS = [
    ("tv-vgg11", "tv", "vgg11", 64),
    ("tv-resnet18", "tv", "resnet18", 64),
    ("tv-densenet121", "tv", "densenet121", 64),
    ("tv-mobilenet_v3_small", "tv", "mobilenet_v3_small", 64),
    ("tv-efficientnet_b0", "tv", "efficientnet_b0", 64),
    ("tv-convnext_tiny", "tv", "convnext_tiny", 64),
    ("tv-regnet_x_400mf", "tv", "regnet_x_400mf", 64),
    ("tv-googlenet", "tv", "googlenet", 64),
    ("tv-shufflenet_v2_x0_5", "tv", "shufflenet_v2_x0_5", 64),
    ("tv-squeezenet1_0", "tv", "squeezenet1_0", 64),
    ("tv-mnasnet0_5", "tv", "mnasnet0_5", 64),
    ("timm-resnet10t", "timm", "resnet10t", 64),
    ("timm-efficientnet_b0", "timm", "efficientnet_b0", 64),
    ("timm-convnext_atto", "timm", "convnext_atto", 64),
    ("timm-inception_v3", "timm", "inception_v3", 96),
    ("timm-regnetx_002", "timm", "regnetx_002", 64),
    ("timm-mobilenetv3_small_050", "timm", "mobilenetv3_small_050", 64),
    ("timm-densenet121", "timm", "densenet121", 64),
    ("timm-ghostnet_050", "timm", "ghostnet_050", 64),
    ("timm-dla34", "timm", "dla34", 64),
    ("timm-repvgg_a0", "timm", "repvgg_a0", 64),
]

# Known gaps of xnn_toolkit.layers, kept visible: strict xfail turns into a failure once fixed.
STAGE_GAPS: dict[str, str] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machines share two cores between several processes; with one intra-op thread
    # torch does not spin-wait for busy cores (ten times less CPU time under contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(lib: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
        if lib == "tv":
            import torchvision

            return torchvision.models.get_model(name, weights=None, num_classes=10)
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)


def _params(archs, gaps):
    out = []
    for arch_id, lib, name, size in archs:
        marks = [pytest.mark.xfail(strict=True, reason=gaps[arch_id])] if arch_id in gaps else []
        out.append(pytest.param(lib, name, size, id=arch_id, marks=marks))
    return out


def _outputs(model: nn.Module, names: list[str], size: int) -> dict[str, torch.Tensor]:
    """Outputs of named modules on one forward, with plain hooks (the independent reference)."""
    got: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: got.__setitem__(n, (o[0] if isinstance(o, tuple) else o))
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model.eval()(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return got


@pytest.mark.parametrize("lib, name, size", _params(ARCHS, STAGE_GAPS))
def test_sweep_layers_and_stages(lib, name, size):
    model = build(lib, name)
    names = list_layers(model)
    modules = dict(model.named_modules())
    assert names and "" not in names and set(names) == set(modules) - {""}
    convs = list_layers(model, nn.Conv2d)
    assert convs and all(isinstance(modules[n], nn.Conv2d) for n in convs)

    st = stages(model)
    assert len(st) >= 3, [s.name for s in st]
    outs = _outputs(model, [s.name for s in st], size)
    widths = []
    for i in (0, len(st) - 1):  # stage specs (each resolution probes the model again)
        s = st[i]
        assert resolve_layer(model, i) == (s.name, modules[s.name])
        assert resolve_layer(model, f"stage:{i - len(st)}") == (s.name, modules[s.name])
    for s in st:
        assert resolve_layer(model, s.name)[1] is modules[s.name]
        assert resolve_layer(model, modules[s.name])[0] == s.name
        out = outs[s.name]
        assert out.dim() == 4, f"stage {s.name} gives {tuple(out.shape)}"
        if s.channels is not None:
            assert out.shape[1] == s.channels, s.name
        widths.append(out.shape[-1])
    assert widths == sorted(widths, reverse=True)  # shallow to deep: never larger
    assert widths[0] > widths[-1]
    default = default_read_layer(model)
    assert resolve_layer(model, "default")[0] == default
    assert default in {s.name for s in st} or default in names


# --------------------------------------------------------------------------- unit cases


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))


def test_resolve_by_name_module_and_stage():
    net = _Net()
    assert resolve_layer(net, "features.3") == ("features.3", net.features[3])
    assert resolve_layer(net, net.head[1]) == ("head.1", net.head[1])
    # a VGG-style body: stages end at the pooling layers, pool4 is the default read layer
    assert [s.name for s in stages(net)] == [
        "features.2",
        "features.5",
        "features.8",
        "features.11",
    ]
    assert resolve_layer(net, 1)[0] == "features.5"
    assert resolve_layer(net, -1)[0] == "features.11"
    assert resolve_layer(net, "stage:2")[0] == "features.8"
    assert resolve_layer(net, "default")[0] == "features.11"


def test_resolve_errors_suggest_close_names():
    net = _Net()
    with pytest.raises(LayerNotFoundError, match=r"'features\.33'.*did you mean: .*features\.3"):
        resolve_layer(net, "features.33")
    with pytest.raises(LayerNotFoundError, match="did you mean: head"):
        resolve_layer(net, "haed")
    with pytest.raises(LayerNotFoundError, match="not a submodule"):
        resolve_layer(net, nn.Conv2d(1, 1, 1))
    with pytest.raises(LayerNotFoundError, match="out of range.*4 stages"):
        resolve_layer(net, 4)
    with pytest.raises(LayerNotFoundError, match="'stage:N'"):
        resolve_layer(net, "stage:x")
    with pytest.raises(LayerNotFoundError, match="got float"):
        resolve_layer(net, 1.5)  # type: ignore[arg-type]
    with pytest.raises(LayerNotFoundError, match="got bool"):
        resolve_layer(net, True)
    with pytest.raises(LayerNotFoundError):
        resolve_layer(net, "")  # the root is not a layer
    try:
        resolve_layer(net, "nope")
    except LayerNotFoundError as exc:  # the message is not wrapped in quotes like KeyError's
        assert str(exc).startswith("no layer named")


def test_timm_stages_follow_feature_info():
    import timm

    model = timm.create_model("resnet10t", pretrained=False, num_classes=2)
    info = model.feature_info
    assert [(s.name, s.channels, s.reduction) for s in stages(model)] == [
        (d["module"], d["num_chs"], d["reduction"]) for d in info
    ]


def test_list_layers_kinds():
    net = _Net()
    assert list_layers(net, nn.MaxPool2d) == [
        "features.2",
        "features.5",
        "features.8",
        "features.11",
    ]
    assert list_layers(net, (nn.Flatten, nn.LazyLinear))[0] == "head.0"
    assert list_layers(net)[:2] == ["features", "features.0"]
