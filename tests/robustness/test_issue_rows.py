"""One test per silent wrong answer that was found by trying bad inputs (each failed before
the fix): the input now gives the correct result or a clear ``XnnError`` that names the
argument, what was expected and what to try."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from xnn_toolkit.attribution import get_method
from xnn_toolkit.bank import extract
from xnn_toolkit.cli import main
from xnn_toolkit.data import Normalized, load_dataset
from xnn_toolkit.errors import AssetError, BankError, InputError
from xnn_toolkit.heads import XNN
from xnn_toolkit.models import load_model, save_model
from xnn_toolkit.report import ScoringConfig, score_dataset

CFG = ScoringConfig(methods=("gradcam",), metrics=("pointing_game",), batch_size=4)


@pytest.fixture(scope="module")
def vgg():
    return load_model("bundled:vgg_synth")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(in_chans: int = 3, k: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, k),
    ).eval()


# --------------------------------------------------------------- preprocessing and fit


def test_raw_dataset_is_normalised_with_the_models_preprocessing(vgg):
    raw = load_dataset("synthetic", n=8)
    assert raw.image_space == "raw"
    normed = load_dataset("synthetic", n=8, preprocessing=vgg.preprocessing)
    assert normed.image_space == "normalized"
    a = score_dataset(vgg, raw, CFG, progress=False)
    b = score_dataset(vgg, normed, CFG, progress=False)
    assert a.per_image == b.per_image
    assert a.value("pointing_game", "gradcam") == 1.0  # the card's model finds every bird


class _Undeclared(Dataset):
    """The items of a dataset, without its image_space (as a user's own dataset would be)."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def test_batches_that_contradict_the_image_space_are_refused(vgg):
    raw = load_dataset("synthetic", n=4)
    # never normalised, declared nothing: every value in [0, 1]
    with pytest.raises(InputError, match=r"dataset \(images 0..3\).*never normalised.*'raw'"):
        score_dataset(vgg, _Undeclared(raw), CFG, progress=False)
    # normalised twice
    twice = Normalized(
        normed := Normalized(raw, vgg.preprocessing.mean, vgg.preprocessing.std),
        vgg.preprocessing.mean,
        vgg.preprocessing.std,
    )
    with pytest.raises(InputError, match="normalised twice"):
        score_dataset(vgg, twice, CFG, progress=False)
    # declared raw but normalised
    normed.image_space = "raw"  # an instance attribute: the wrapper now lies
    with pytest.raises(InputError, match="declare image_space 'raw'.*'normalized'"):
        score_dataset(vgg, normed, CFG, progress=False)
    # raw images for a bare module: no preprocessing to normalise them with
    with pytest.raises(InputError, match="LoadedModel"):
        score_dataset(vgg.model, raw, CFG, progress=False)


def test_grey_dataset_for_colour_model_is_refused_then_class_names_are_shown(capsys, tmp_path):
    out = tmp_path / "s"
    args = [
        "score",
        "--model",
        "bundled:vgg_synth",
        "--dataset",
        "fashion-mnist",
        "--n",
        "4",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1-channel" in err and "--grey-to-rgb" in err
    assert main([*args, "--grey-to-rgb"]) == 2
    err = capsys.readouterr().err
    assert "class names differ" in err and "Ankle boot" in err and "Barred_Gull" in err
    assert not out.exists()


def test_labels_beyond_the_models_classes_are_refused():
    model = _tiny(k=4)
    x = torch.rand(6, 3, 8, 8)
    with pytest.raises(InputError, match="image 5 has label 7, the model has 4 classes"):
        extract(model, TensorDataset(x, torch.tensor([0, 1, 2, 3, 0, 7])), ["0"], progress=False)


def test_normalize_refuses_uint8_and_0_255(vgg):
    x = (torch.rand(1, 3, 4, 4) * 255).to(torch.uint8)
    with pytest.raises(InputError, match=r"uint8.*x.float\(\) / 255"):
        vgg.preprocessing.normalize(x)
    with pytest.raises(InputError, match="divide by 255"):
        vgg.preprocessing.normalize(x.float())
    torch.testing.assert_close(
        vgg.preprocessing.normalize(x.float() / 255),
        (x.float() / 255 - torch.tensor(vgg.preprocessing.mean).view(1, 3, 1, 1))
        / torch.tensor(vgg.preprocessing.std).view(1, 3, 1, 1),
    )


# --------------------------------------------------------------- files


def test_bank_refuses_other_data_of_the_same_length(tmp_path):
    model = _tiny()
    a, b = torch.rand(10, 3, 8, 8), torch.rand(10, 3, 8, 8)
    bank = extract(model, a, ["0"], path=tmp_path / "bank", progress=False)
    with pytest.raises(BankError, match="other data.*reuse=True"):
        extract(model, b, ["0"], path=tmp_path / "bank", progress=False)
    again = extract(model, b, ["0"], path=tmp_path / "bank", progress=False, reuse=True)
    assert torch.equal(again.activations("0"), bank.activations("0"))
    same = extract(model, a.clone(), ["0"], path=tmp_path / "bank", progress=False)
    assert torch.equal(same.activations("0"), bank.activations("0"))


def test_file_spec_weights_are_checked_against_the_cards_hash(tmp_path):
    lm = load_model("timm:resnet10t", num_classes=3)
    path = save_model(lm, tmp_path / "m.safetensors")
    assert "weights_sha256" in json.loads((tmp_path / "m.json").read_text())
    load_model(path)  # intact
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of one weight: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(AssetError, match="damaged.*sha256"):
        load_model(path)


def test_extract_failing_at_the_door_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "D"
    rc = main(
        [
            "extract",
            "--model",
            "bundled:vgg_synth",
            "--layer",
            "fc66",
            "--n",
            "4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 2 and "fc66" in capsys.readouterr().err
    assert not out.exists()


class _NaNAt(Dataset):
    image_space = "raw"

    def __init__(self, ds: Dataset, bad: int) -> None:
        self.ds, self.bad, self.part_names = ds, bad, ds.part_names

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        item = self.ds[i]
        if i == self.bad:
            img = item[0].clone()
            img[0, 0, 0] = float("nan")
            item = (img, *item[1:])
        return item


def test_scoring_that_fails_on_a_nan_image_leaves_nothing(vgg, tmp_path):
    ds = _NaNAt(load_dataset("synthetic", n=4), bad=2)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"images 0..3.*NaN.*images \[2\]"):
        score_dataset(vgg, ds, CFG, out=out, progress=False)
    assert not out.exists()
    out.mkdir()  # an existing empty folder stays, empty
    with pytest.raises(InputError):
        score_dataset(vgg, ds, CFG, out=out, progress=False)
    assert out.is_dir() and os.listdir(out) == []


def test_files_get_the_users_umask(vgg, tmp_path):
    old = os.umask(0o022)
    try:
        bank = tmp_path / "bank"
        extract(_tiny(), torch.rand(4, 3, 8, 8), ["0"], path=bank, progress=False)
        score_dataset(vgg, load_dataset("synthetic", n=4), CFG, out=tmp_path / "s", progress=False)
        files = [*bank.iterdir(), *(tmp_path / "s").rglob("*.json")]
        assert files
        for f in files:
            if f.is_file():
                assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    finally:
        os.umask(old)


# --------------------------------------------------------------- heads


def _problem(n: int = 60, d: int = 6, k: int = 3):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(n, d, generator=g)
    logits = z @ torch.randn(d, k, generator=g)
    return z, logits, logits.argmax(1)


def test_float_labels_are_refused_not_truncated():
    z, logits, labels = _problem()
    with pytest.raises(InputError, match="labels must be integer.*never rounded"):
        XNN(n_features=2, hidden=(4,), max_epochs=1).fit(z, logits, labels=labels.float() + 0.7)


def test_xnn_load_validates_json_and_weights(tmp_path):
    z, logits, labels = _problem()
    m = XNN(n_features=2, hidden=(4,), n_positive=10, n_negative=10, max_epochs=1)
    m.fit(z, logits, labels=labels)
    m.save(tmp_path / "h")
    meta = json.loads((tmp_path / "h.json").read_text())
    meta["params"]["kind"] = "junk"
    (tmp_path / "h.json").write_text(json.dumps(meta))
    with pytest.raises(AssetError, match=r"h\.json is not a valid XNN.*kind"):
        XNN.load(tmp_path / "h")
    m.save(tmp_path / "h")
    data = (tmp_path / "h.safetensors").read_bytes()
    (tmp_path / "h.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AssetError, match="could not read the XNN"):
        XNN.load(tmp_path / "h")


def test_non_numeric_logits_are_an_input_error():
    z, _, _ = _problem()
    with pytest.raises(InputError, match="logits must be a numeric"):
        XNN().fit(z, "abc")


# --------------------------------------------------------------- attribution


def test_attribute_refuses_nan_converts_float64_and_names_channels():
    model = _tiny()
    method = get_method("gradcam")(model, layer="0")
    x = torch.rand(2, 3, 8, 8)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(InputError, match=r"inputs: .*1 NaN.*images \[1\]"):
        method.attribute(bad, 0)
    ref = method.attribute(x, 0).heatmap
    torch.testing.assert_close(method.attribute(x.double(), 0).heatmap, ref)
    with pytest.raises(InputError, match="1 channel, the model expects 3"):
        method.attribute(x[:, :1], 0)


def test_extract_converts_float64_and_refuses_grey_unless_asked():
    model = _tiny()
    x = torch.rand(3, 3, 8, 8)
    a = extract(model, x, ["0"], progress=False).activations("0")
    b = extract(model, x.double(), ["0"], progress=False).activations("0")
    torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="1-channel.*grey_to_rgb=True"):
        extract(model, x[:, :1], ["0"], progress=False)
    c = extract(model, x[:, :1], ["0"], progress=False, grey_to_rgb=True).activations("0")
    d = extract(model, x[:, :1].expand(-1, 3, -1, -1), ["0"], progress=False).activations("0")
    assert torch.equal(c, d)


# --------------------------------------------------------------- CLI


@pytest.mark.parametrize("device", ["banana", "cuda:0"])
def test_cli_device_errors_are_one_line(device, capsys, tmp_path):
    if device == "cuda:0" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = main(
        [
            "extract",
            "--model",
            "bundled:vgg_synth",
            "--layer",
            "fc6",
            "--device",
            device,
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--device" in err and device in err and "cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_torchrun_parser_accepts_the_documented_score_command():
    from torch.distributed.run import get_args_parser

    tail = ["-m", "xnn_toolkit.cli", "score", "--model", "bundled:vgg_synth"]
    ok = get_args_parser().parse_args(["--nproc_per_node", "2", *tail, "--num-images", "64"])
    from xnn_toolkit.cli import build_parser

    args = build_parser().parse_args(ok.training_script_args)
    assert args.n == 64
    with pytest.raises(SystemExit):  # torchrun's own parser: "--n" is ambiguous there
        get_args_parser().parse_args(["--nproc_per_node", "2", *tail, "--n", "64"])


def test_existing_out_under_torchrun_is_one_line_on_every_rank(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"
    out.mkdir()
    (out / "x").write_text("")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["score", "--model", "bundled:vgg_synth", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "exists and is not empty" in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------- processes


def test_every_shard_is_scored_with_the_configured_threads(vgg, monkeypatch):
    import xnn_toolkit.report._score_shard as scoring

    seen = []
    real = scoring._heatmaps

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(scoring, "_heatmaps", spy)
    ds = load_dataset("synthetic", n=4)
    torch.set_num_threads(2)
    try:
        score_dataset(vgg, ds, CFG, progress=False)
        assert seen and set(seen) == {1}  # the default, whatever the process had
        assert torch.get_num_threads() == 2  # restored
        seen.clear()
        score_dataset(vgg, ds, ScoringConfig(**{**CFG.__dict__, "threads": 2}), progress=False)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(1)
    with pytest.raises(InputError, match="threads"):
        score_dataset(vgg, ds, ScoringConfig(threads=0), progress=False)


class _Renamed(Dataset):
    """Synthetic birds that call their classes otherwise (labelled for another model)."""

    image_space = "raw"

    def __init__(self, ds: Dataset) -> None:
        self.ds, self.part_names = ds, ds.part_names
        self.classes = [f"other{i}" for i in range(len(ds.classes))]

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def test_class_names_must_agree_only_where_labels_are_read_as_classes(vgg):
    ds = _Renamed(load_dataset("synthetic", n=4))
    with pytest.raises(InputError, match=r"class names differ.*other0.*Red_crowned_Warbler"):
        score_dataset(vgg, ds, CFG, progress=False)
    cfg = ScoringConfig(**{**CFG.__dict__, "target": "predicted"})
    res = score_dataset(vgg, ds, cfg, progress=False)  # the labels are not used as classes
    assert len(res.per_image) == 4


def test_heads_normalise_raw_datasets_with_the_loaded_models_preprocessing(vgg):
    from xnn_toolkit.heads import ClassPaths

    raw = load_dataset("synthetic", n=24)
    normed = load_dataset("synthetic", n=24, preprocessing=vgg.preprocessing)
    kw = dict(layers=["avgpool"], epochs=1, min_images=2, batch_size=8)
    with pytest.raises(InputError, match="raw images.*LoadedModel"):
        ClassPaths(**kw).fit(vgg.model, raw)
    a = ClassPaths(**kw).fit(vgg, raw)  # annotated samples, raw: normalised at the door
    b = ClassPaths(**kw).fit(vgg.model, normed)
    for name in a.masks_:
        torch.testing.assert_close(a.masks_[name], b.masks_[name])
