"""Model loading by spec, preprocessing values, weight files with cards, input checks."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from xnn_toolkit.errors import AssetError, InputError, SpecError
from xnn_toolkit.models import (
    LoadedModel,
    Preprocessing,
    check_input,
    load_model,
    save_model,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machines share two cores between several processes; with one intra-op thread
    # torch does not spin-wait for busy cores (ten times less CPU time under contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _x(n=2, c=3, s=32, seed=0):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def _small_net(num_classes=4, in_chans=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, 6, 3),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, num_classes),
    )


# --------------------------------------------------------------------------- timm / torchvision


def test_timm_spec_and_preprocessing():
    lm = load_model("timm:resnet18", num_classes=10)
    assert isinstance(lm, LoadedModel)
    assert lm.spec == "timm:resnet18" and lm.name == "resnet18" and lm.num_classes == 10
    assert lm.preprocessing.mean == IMAGENET_MEAN and lm.preprocessing.std == IMAGENET_STD
    assert lm.preprocessing.input_size == (3, 224, 224)
    assert lm.preprocessing.interpolation == "bicubic"
    assert lm.class_names is None and lm.card is None  # random weights: no label names
    assert not any(m.training for m in lm.model.modules())
    assert lm.model(_x()).shape == (2, 10)


def test_timm_model_specific_preprocessing():
    # timm's inception_v3 weights were trained at 299 px with the "inception" statistics
    lm = load_model("timm:inception_v3", num_classes=3)
    assert lm.preprocessing.mean == (0.5, 0.5, 0.5) and lm.preprocessing.std == (0.5, 0.5, 0.5)
    assert lm.preprocessing.input_size == (3, 299, 299)


def test_timm_in_chans():
    lm = load_model("timm:resnet10t", num_classes=2, in_chans=1)
    assert lm.preprocessing.input_size == (1, 176, 176)  # resnet10t was trained at 176 px
    assert lm.preprocessing.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    assert lm.model(_x(c=1)).shape == (2, 2)


def test_torchvision_spec_and_preprocessing():
    lm = load_model("torchvision:resnet18", num_classes=7)
    assert lm.spec == "torchvision:resnet18" and lm.num_classes == 7
    assert lm.preprocessing == Preprocessing(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224), "bilinear")
    assert not lm.model.training
    assert lm.model(_x()).shape == (2, 7)
    eff = load_model("tv:efficientnet_b0", num_classes=3)  # its weights use bicubic resizing
    assert eff.preprocessing.interpolation == "bicubic"
    assert eff.preprocessing.input_size == (3, 224, 224)


def test_torchvision_in_chans_adapts_the_first_conv_like_timm():
    torch.manual_seed(0)
    import torchvision

    plain = torchvision.models.resnet18(num_classes=5)
    torch.manual_seed(0)
    grey = load_model("torchvision:resnet18", num_classes=5, in_chans=1)
    conv = grey.model.conv1
    assert conv.in_channels == 1 and conv.out_channels == 64
    # one input channel: the RGB filters summed (what timm.adapt_input_conv does)
    torch.testing.assert_close(conv.weight, plain.conv1.weight.sum(1, keepdim=True))
    assert grey.preprocessing.input_size == (1, 224, 224)
    assert grey.preprocessing.std == pytest.approx((sum(IMAGENET_STD) / 3,))
    assert grey.model(_x(c=1)).shape == (2, 5)


def test_device_and_kwargs():
    lm = load_model("timm:resnet10t", num_classes=3, device="cpu", drop_rate=0.3)
    assert lm.model.drop_rate == 0.3
    assert next(lm.model.parameters()).device == torch.device("cpu")
    with pytest.raises(SpecError, match="could not build timm model.*not_an_arg"):
        load_model("timm:resnet10t", not_an_arg=1)


@pytest.mark.parametrize(
    "spec, hint",
    [
        ("timm:resnet181", "resnet18"),
        ("timm:efficentnet_b0", "efficientnet_b0"),
        ("torchvision:resnt18", "resnet18"),
        ("tv:mobilenet_v3_smal", "mobilenet_v3_small"),
        ("resnet18", "'timm:resnet18'"),
        ("mobilenet_v3_small", "'torchvision:mobilenet_v3_small'"),
        ("keras:resnet18", "expected 'timm:NAME'"),
    ],
)
def test_unknown_specs_list_close_names(spec, hint):
    with pytest.raises(SpecError) as info:
        load_model(spec)
    assert hint in str(info.value)


def test_spec_type_errors():
    with pytest.raises(SpecError, match="string, a path or an nn.Module"):
        load_model(42)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="pretrained"):
        load_model(_small_net(), pretrained=True)


# --------------------------------------------------------------------------- modules


def test_module_spec_defaults_and_override():
    net = _small_net(num_classes=4, in_chans=1)
    net.train()
    lm = load_model(net)
    assert lm.model is net and not net.training  # eval mode, same object
    assert lm.num_classes == 4 and lm.spec == "module:Sequential" and lm.card is None
    assert lm.preprocessing.input_size == (1, 224, 224)
    assert lm.preprocessing.mean == pytest.approx((0.449,))
    custom = Preprocessing((0.5,), (0.25,), (1, 28, 28), "nearest")
    lm = load_model(net, preprocessing=custom, num_classes=4)
    assert lm.preprocessing == custom


# --------------------------------------------------------------------------- bundled / zoo


@pytest.fixture()
def fake_zoo(monkeypatch):
    card = {
        "name": "tiny_fmnist",
        "num_classes": 4,
        "class_names": ["a", "b", "c", "d"],
        "mean": [0.2860],
        "std": [0.3530],
        "input_size": [1, 28, 28],
        "test_accuracy": 0.9,
    }
    calls = []

    def load_bundled(name):
        calls.append(name)
        if name != "tiny_fmnist":
            raise AssetError(f"no bundled model {name!r}; did you mean: tiny_fmnist?")
        return _small_net(4, 1).eval(), dict(card)

    def build_model(arch, num_classes=10, in_chans=3):
        if arch != "tiny":
            raise SpecError(f"unknown architecture {arch!r}")
        return _small_net(num_classes, in_chans)

    zoo = types.ModuleType("xnn_toolkit.zoo")
    zoo.load_bundled = load_bundled
    zoo.build_model = build_model
    monkeypatch.setitem(sys.modules, "xnn_toolkit.zoo", zoo)
    return calls


def test_bundled_spec_with_fake_zoo(fake_zoo):
    lm = load_model("bundled:tiny_fmnist")
    assert fake_zoo == ["tiny_fmnist"]
    assert lm.name == "tiny_fmnist" and lm.spec == "bundled:tiny_fmnist"
    assert lm.num_classes == 4 and lm.class_names == ["a", "b", "c", "d"]
    assert lm.preprocessing == Preprocessing((0.2860,), (0.3530,), (1, 28, 28), "bilinear")
    assert lm.card["test_accuracy"] == 0.9
    with pytest.raises(SpecError, match="num_classes=4, not 10"):
        load_model("bundled:tiny_fmnist", num_classes=10)
    with pytest.raises(AssetError, match="did you mean"):
        load_model("bundled:tiny_mnist")
    with pytest.raises(SpecError, match="pretrained"):
        load_model("bundled:tiny_fmnist", pretrained=True)


def test_zoo_spec_with_fake_zoo(fake_zoo):
    lm = load_model("zoo:tiny", num_classes=3, in_chans=1)
    assert lm.num_classes == 3 and lm.preprocessing.input_size[0] == 1
    with pytest.raises(SpecError, match="unknown architecture"):
        load_model("zoo:huge")


# --------------------------------------------------------------------------- files


def test_safetensors_file_with_card_round_trip(tmp_path):
    lm = load_model("timm:resnet10t", num_classes=3)
    with torch.no_grad():  # weights that differ from a fresh initialisation
        for p in lm.model.parameters():
            p.add_(0.01)
    lm.preprocessing = Preprocessing((0.1, 0.2, 0.3), (0.4, 0.5, 0.6), (3, 64, 64), "bilinear")
    lm.class_names = ["x", "y", "z"]
    path = save_model(lm, tmp_path / "mine", dataset="synthetic", seed=3)
    assert path.name == "mine.safetensors" and (tmp_path / "mine.json").is_file()
    again = load_model(path)
    assert again.spec == str(path) and again.name == "resnet10t"
    assert again.preprocessing == lm.preprocessing
    assert again.class_names == ["x", "y", "z"] and again.num_classes == 3
    assert again.card["dataset"] == "synthetic" and again.card["arch"] == "timm:resnet10t"
    x = _x(s=48)
    with torch.no_grad():
        assert torch.equal(again.model(x), lm.model(x))


def test_hand_written_card_for_torchvision(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    import torchvision

    net = torchvision.models.squeezenet1_0(num_classes=6).eval()
    save_file(net.state_dict(), str(tmp_path / "sq.safetensors"))
    (tmp_path / "sq.json").write_text(
        json.dumps({"arch": "torchvision:squeezenet1_0", "kwargs": {"num_classes": 6}})
    )
    lm = load_model(str(tmp_path / "sq.safetensors"))
    assert lm.preprocessing.mean == IMAGENET_MEAN and lm.num_classes == 6
    x = _x(s=64)
    with torch.no_grad():
        assert torch.equal(lm.model(x), net(x))


def test_state_dict_pt_with_card_needs_no_pickle(tmp_path, fake_zoo):
    net = _small_net()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    torch.save({"state_dict": net.state_dict()}, tmp_path / "w.pt")
    (tmp_path / "w.json").write_text(json.dumps({"arch": "zoo:tiny", "num_classes": 4}))
    lm = load_model(tmp_path / "w.pt")
    for k, v in net.state_dict().items():
        assert torch.equal(lm.model.state_dict()[k], v)


def test_weight_file_errors(tmp_path):
    lm = load_model("timm:resnet10t", num_classes=3)
    path = save_model(lm, tmp_path / "m.safetensors")
    card = json.loads((tmp_path / "m.json").read_text())

    # wrong class count in the card: the weights do not fit
    (tmp_path / "m.json").write_text(json.dumps({**card, "arch_kwargs": {"num_classes": 5}}))
    with pytest.raises(AssetError, match="do not fit.*fc.weight"):
        load_model(path)
    # unknown architecture in the card
    (tmp_path / "m.json").write_text(json.dumps({**card, "arch": "timm:resnet10x"}))
    with pytest.raises(SpecError, match="resnet10t"):
        load_model(path)
    (tmp_path / "m.json").write_text(json.dumps({**card, "arch": None}))
    with pytest.raises(AssetError, match="needs 'arch'"):
        load_model(path)
    (tmp_path / "m.json").write_text("{broken")
    with pytest.raises(AssetError, match=r"m\.json"):
        load_model(path)
    # no card at all
    (tmp_path / "m.json").unlink()
    with pytest.raises(AssetError, match=r"card .*m\.json"):
        load_model(path)
    # truncated weights
    (tmp_path / "m.json").write_text(json.dumps(card))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match="is damaged.*weights_sha256"):  # the card's hash
        load_model(path)
    (tmp_path / "m.json").write_text(
        json.dumps({k: v for k, v in card.items() if k != "weights_sha256"})
    )
    with pytest.raises(AssetError, match="corrupt or truncated"):  # no hash: safetensors
        load_model(path)
    with pytest.raises(AssetError, match="no weights file"):
        load_model(tmp_path / "absent.safetensors")


def test_pickled_module_needs_trust(tmp_path):
    net = _small_net().eval()
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(SpecError, match="trust_pickle=True"):
        load_model(tmp_path / "whole.pt")
    lm = load_model(tmp_path / "whole.pt", trust_pickle=True)
    assert lm.spec == str(tmp_path / "whole.pt") and lm.num_classes == 4
    x = _x()
    with torch.no_grad():
        assert torch.equal(lm.model(x), net(x))
    torch.save({"a": 1}, tmp_path / "dict.pt")
    with pytest.raises(AssetError, match="not an nn.Module"):
        load_model(tmp_path / "dict.pt", trust_pickle=True)


def test_save_model_needs_an_architecture(tmp_path):
    lm = load_model(_small_net())
    with pytest.raises(SpecError, match="arch="):
        save_model(lm, tmp_path / "x")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- preprocessing


def test_normalize_denormalize_by_hand():
    p = Preprocessing((0.5, 0.25), (0.5, 2.0), (2, 1, 2), "bilinear")
    x = torch.tensor([[[[1.0, 0.0]], [[0.25, 0.75]]]])
    want = torch.tensor([[[[1.0, -1.0]], [[0.0, 0.25]]]])
    assert torch.equal(p.normalize(x), want)
    assert torch.equal(p.denormalize(want), x)
    x64 = _x(c=2).double().sigmoid()  # images in [0, 1]
    torch.testing.assert_close(p.denormalize(p.normalize(x64)), x64)
    assert p.normalize(x64).dtype == torch.float64
    with pytest.raises(InputError, match="N x 2 x H x W"):
        p.normalize(_x(c=3))


def test_preprocessing_validation():
    with pytest.raises(SpecError, match="one value per input channel"):
        Preprocessing((0.5,), (0.5, 0.5), (2, 8, 8))
    with pytest.raises(SpecError, match=r"\(C, H, W\)"):
        Preprocessing((0.5,), (0.5,), (8, 8))
    with pytest.raises(SpecError, match="positive"):
        Preprocessing((0.5,), (0.0,), (1, 8, 8))


# --------------------------------------------------------------------------- input checks


def test_check_input_accepts_a_good_batch():
    x = _x()
    assert check_input(x, in_chans=3, min_size=32) is x


@pytest.mark.parametrize(
    "x, kwargs, hint",
    [
        (np.zeros((1, 3, 8, 8), np.float32), {}, "torch.as_tensor"),
        ([[0.0]], {}, "ToTensor"),
        (torch.zeros(3, 8, 8), {}, "x.unsqueeze(0)"),
        (torch.zeros(8, 8), {}, "x[None, None]"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), {}, "x.float() / 255"),
        (torch.zeros(0, 3, 8, 8), {}, "empty"),
        (
            torch.zeros(2, 1, 8, 8),
            {"in_chans": 3},
            "got 1 channel, the model expects 3: repeat the grey channel with "
            "x.expand(-1, 3, -1, -1)",
        ),
        (torch.zeros(2, 3, 8, 8), {"in_chans": 1}, "x.mean(1, keepdim=True)"),
        (torch.zeros(2, 8, 8, 3), {"in_chans": 3}, "x.permute(0, 3, 1, 2)"),
        (torch.zeros(2, 3, 16, 40), {"min_size": 32}, "interpolate(x, size=(32, 40)"),
    ],
)
def test_check_input_errors_say_how_to_fix(x, kwargs, hint):
    with pytest.raises(InputError) as info:
        check_input(x, **kwargs)
    assert hint in str(info.value)


def test_check_input_non_finite_names_the_images():
    x = _x(n=4)
    x[2, 0, 0, 0] = float("nan")
    x[3, 1, 2, 2] = float("inf")
    with pytest.raises(InputError, match=r"1 NaN and 1 infinite values \(images \[2, 3\]\)"):
        check_input(x)
