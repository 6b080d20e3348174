"""Zoo architectures, bundled models (cards, sha256, accuracy) and the training command."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from torch import nn

from xnn_toolkit import zoo
from xnn_toolkit.data import fashion_mnist as fm
from xnn_toolkit.errors import AssetError, SpecError
from xnn_toolkit.hooks import record
from xnn_toolkit.layers import default_read_layer, stages
from xnn_toolkit.zoo import train as train_mod

MAX_BYTES = 10 * 1024 * 1024


@pytest.mark.parametrize(
    "arch, kwargs, shape",
    [
        ("vgg_small", {}, (3, 64, 64)),
        (
            "vgg_small",
            dict(channels=(8, 16, 32), convs_per_block=(2, 2, 2), pool_size=3),
            (1, 28, 28),
        ),
        ("resnet_small", dict(channels=(8, 16, 32, 64)), (1, 28, 28)),
        ("resnet_small", dict(channels=(8, 16, 32, 64), stem_pool=True), (3, 64, 64)),
    ],
)
def test_build_forward_and_feature_info(arch, kwargs, shape):
    torch.manual_seed(0)
    model = zoo.build_model(arch, num_classes=7, in_chans=shape[0], **kwargs).eval()
    x = torch.randn(2, *shape)
    st = stages(model)
    with record(model, [s.name for s in st]) as rec, torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7)
    # feature_info's channels and reductions are what the stages really output
    for s in st:
        act = rec.activations[s.name]
        assert act.shape[1] == s.channels, s.name
        # max-pooling floors (28 -> 14 -> 7 -> 3), padded stride-2 convs ceil (7 -> 4)
        n, r = shape[-1], s.reduction
        assert act.shape[-1] == (n // r if arch == "vgg_small" else -(-n // r)), s.name


def test_vgg_fc_layers_are_post_relu_and_default_layer():
    torch.manual_seed(0)
    model = zoo.vgg_small(num_classes=5).eval()
    # blocks of 1, 1, 2, 2 convs: (conv relu pool) x 2 + (conv relu conv relu pool) x 2
    assert default_read_layer(model) == "features.15"  # pool4
    assert isinstance(model.get_submodule("features.15"), nn.MaxPool2d)
    x = torch.randn(3, 3, 64, 64)
    with record(model, ["fc6", "fc6.linear", "fc7", "fc7.linear"]) as rec, torch.no_grad():
        logits = model(x)
    a = rec.activations
    assert torch.equal(a["fc6"], a["fc6.linear"].clamp(min=0))
    assert torch.equal(a["fc7"], a["fc7.linear"].clamp(min=0))
    # the classifier reads fc7 directly (dropout is the identity in eval mode)
    assert torch.allclose(logits, model.classifier(a["fc7"]), atol=1e-6)
    resnet = zoo.resnet_small(channels=(8, 16, 32, 64))
    assert default_read_layer(resnet) == "layer3"
    assert type(resnet).__module__ == "timm.models.resnet"


def test_build_model_errors():
    with pytest.raises(SpecError, match="did you mean: vgg_small"):
        zoo.build_model("vgg_smal")
    with pytest.raises(SpecError, match="bad arguments for resnet_small"):
        zoo.build_model("resnet_small", depth=3)
    with pytest.raises(SpecError, match="same, non-zero length"):
        zoo.build_model("vgg_small", channels=(8, 16), convs_per_block=(1,))
    assert zoo.arch_names() == ["resnet_small", "vgg_small"]


@pytest.mark.parametrize("name", train_mod.recipe_names())
def test_every_recipe_fits_the_size_budget(name):
    rec = train_mod._RECIPES[name]
    in_chans = 1 if rec.dataset == "fashion_mnist" else 3
    model = zoo.build_model(rec.arch, num_classes=10, in_chans=in_chans, **rec.arch_kwargs)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert nbytes <= MAX_BYTES


# ----------------------------------------------------------------------------- bundled


def test_fashion_mnist_models_are_bundled():
    assert {"vgg_fmnist", "resnet_fmnist"} <= set(zoo.bundled_names())


#: Models trained here (the others take their weights from a package: test_real_model.py).
TRAINED = [n for n in zoo.bundled_names() if not zoo.model_card(n).get("weights_package")]


@pytest.mark.parametrize("name", TRAINED)
def test_card_and_weights(name):
    card = zoo.model_card(name)
    assert set(zoo.CARD_KEYS) <= set(card) and card["name"] == name
    path = zoo.assets_dir() / f"{name}.safetensors"
    assert path.stat().st_size <= MAX_BYTES
    assert hashlib.sha256(path.read_bytes()).hexdigest() == card["weights_sha256"]
    assert card["train_command"].startswith(f"python -m xnn_toolkit.zoo.train --model {name}")
    target = 0.90 if card["dataset"] == "fashion_mnist" else 0.95
    assert card["test_accuracy"] >= target
    assert len(card["class_names"]) == card["num_classes"] == 10
    assert len(card["mean"]) == len(card["std"]) == card["in_chans"] == card["input_size"][0]


def _fmnist_sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = fm.FashionMNIST(fm.BUNDLED_DIR, split="test")
    return ds.data[:n].unsqueeze(1).float() / 255, ds.targets[:n]


def _synth_sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from xnn_toolkit.data import synthetic

    ds = synthetic.SyntheticParts(n, size=64, seed=1)
    items = [ds[i] for i in range(n)]
    return torch.stack([it[0] for it in items]), torch.tensor([int(it[1]) for it in items])


@pytest.mark.parametrize("name", TRAINED)
def test_bundled_accuracy_agrees_with_card(name):
    model, card = zoo.load_bundled(name)
    assert not model.training
    assert model.pretrained_cfg["input_size"] == tuple(card["input_size"])
    n = 500 if card["dataset"] == "fashion_mnist" else 300
    x, y = _fmnist_sample(n) if card["dataset"] == "fashion_mnist" else _synth_sample(n)
    assert tuple(x.shape[1:]) == tuple(card["input_size"])
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        acc = (model((x - mean) / std).argmax(1) == y).float().mean().item()
    # a sample of n images: binomial standard error ~ 1.3 points at n = 500
    assert abs(acc - card["test_accuracy"]) <= 0.04, (acc, card["test_accuracy"])


def _copy_bundle(name, dst):
    for ext in (".json", ".safetensors"):
        shutil.copy(zoo.assets_dir() / f"{name}{ext}", dst / f"{name}{ext}")
    return dst / f"{name}.safetensors"


def test_damaged_weights_raise_asset_error_with_retrain_command(tmp_path):
    name = "resnet_fmnist"
    path = _copy_bundle(name, tmp_path)
    model, _ = zoo.load_bundled(name, root=tmp_path)  # the copy is intact
    cmd = zoo.model_card(name)["train_command"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AssetError, match="corrupt or truncated") as info:
        zoo.load_bundled(name, root=tmp_path)
    assert cmd in str(info.value)
    flipped = bytearray(data)
    flipped[len(data) - 10] ^= 0x01  # one bit inside a weight
    path.write_bytes(bytes(flipped))
    with pytest.raises(AssetError, match="sha256"):
        zoo.load_bundled(name, root=tmp_path)
    path.unlink()
    with pytest.raises(AssetError, match="missing.*" + cmd.replace(" ", r"\s")):
        zoo.load_bundled(name, root=tmp_path)


def test_bad_cards(tmp_path):
    name = "vgg_fmnist"
    _copy_bundle(name, tmp_path)
    with pytest.raises(AssetError, match="did you mean: vgg_fmnist"):
        zoo.load_bundled("vgg_fmist", root=tmp_path)
    card_path = tmp_path / f"{name}.json"
    card = json.loads(card_path.read_text())
    del card["weights_sha256"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(AssetError, match="lacks weights_sha256"):
        zoo.model_card(name, root=tmp_path)
    card_path.write_text("{not json")
    with pytest.raises(AssetError, match="unreadable"):
        zoo.model_card(name, root=tmp_path)
    assert zoo.bundled_names(tmp_path / "none") == []


# ---------------------------------------------------------------------------- training


def test_train_command_is_reproducible_and_loadable(tmp_path):
    if fm._split_files(fm.SYSTEM_DIR, "train") is None:
        pytest.skip("needs the Fashion-MNIST training files (dataset-fashion-mnist)")
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    kw = dict(epochs=1, train_size=256, test_size=200, threads=1, verbose=False)
    card = train_mod.train("vgg_fmnist", out=tmp_path / "a", **kw)
    again = train_mod.train("vgg_fmnist", out=tmp_path / "b", **kw)
    other = train_mod.train("vgg_fmnist", out=tmp_path / "c", seed=1, **kw)
    assert card["weights_sha256"] == again["weights_sha256"] != other["weights_sha256"]
    # global torch state is restored
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng)
    # the written card and weights load, and the recorded accuracy is re-measured exactly
    model, loaded = zoo.load_bundled("vgg_fmnist", root=tmp_path / "a")
    assert loaded == card and set(zoo.CARD_KEYS) <= set(card)
    assert card["train_command"].endswith("--threads 1 --train-size 256 --test-size 200")
    x, y = _fmnist_sample(200)
    x = (x - torch.tensor(card["mean"]).view(1, -1, 1, 1)) / card["std"][0]
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(card["test_accuracy"], abs=1e-4)
    assert not list(tmp_path.glob("*/*.tmp"))


def test_train_cli_errors(capsys):
    with pytest.raises(SpecError, match="did you mean: vgg_fmnist"):
        train_mod.train("vgg_fmnst")
    with pytest.raises(SystemExit):
        train_mod.main(["--model", "nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_assets_env_var(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    _copy_bundle("vgg_fmnist", tmp_path / "models")
    monkeypatch.setenv("XNN_TOOLKIT_ASSETS", str(tmp_path / "elsewhere"))
    assert zoo.assets_dir() == tmp_path / "elsewhere" / "models"
    assert zoo.bundled_names() == []
    monkeypatch.setenv("XNN_TOOLKIT_ASSETS", str(tmp_path))
    assert zoo.bundled_names() == ["vgg_fmnist"]
    assert zoo.load_bundled("vgg_fmnist")[1]["name"] == "vgg_fmnist"
