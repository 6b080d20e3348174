"""Property-based bad-input suite: every public entry point, fed generated inputs.

The property, for every generated case: the call returns a correct-looking result (no NaN
or infinity out of finite input) or raises an :class:`~xnn_toolkit.errors.XnnError` whose
message names the bad argument; never another exception type, never a file left behind on
failure, and the model exactly as it was. Generated: shapes, dtypes, value ranges, NaN / Inf
placement, label types, layer names, specs, configuration values, argv and file corruptions.

Runs are reproducible: ``derandomize=True`` (the examples follow from the test's name),
no example database, bounded example counts. With ``XNN_BAD_INPUT_COUNTS=FILE`` in the
environment the number of cases each entry point met is written to ``FILE`` (JSON), the
figures of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import Dataset

from xnn_toolkit import metrics as M
from xnn_toolkit.attribution import get_method
from xnn_toolkit.bank import ActivationBank, extract
from xnn_toolkit.cli import main
from xnn_toolkit.data import load_dataset
from xnn_toolkit.errors import XnnError
from xnn_toolkit.heads import XNN, ClassPaths, ClassSpecificGates, InformationDropout, NMFConcepts
from xnn_toolkit.models import load_model
from xnn_toolkit.report import ScoringConfig, score_dataset
from xnn_toolkit.report.scoring import _canonical_methods

COUNTS: Counter[str] = Counter()
RESULTS: Counter[str] = Counter()  # entry points that returned a result
SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


def _examples(n: int):
    return settings(max_examples=n, **SETTINGS)


@pytest.fixture(autouse=True, scope="module")
def _setup():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    dump = os.environ.get("XNN_BAD_INPUT_COUNTS")
    if dump:
        old = json.loads(Path(dump).read_text()) if Path(dump).is_file() else {}
        new = {k: {"cases": v, "results": RESULTS[k]} for k, v in sorted(COUNTS.items())}
        Path(dump).write_text(json.dumps({**old, **new}, indent=1))


# --------------------------------------------------------------------------- the property


def _state(model: nn.Module | None):
    if model is None:
        return None
    return (
        [(k, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()],
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [
            tuple(
                len(getattr(m, d))
                for d in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_backward_pre_hooks",
                )
            )
            for m in model.modules()
        ],
    )


def _same_state(a, b) -> bool:
    if a is None:
        return True
    (sa, ma, ra, ga, ha), (sb, mb, rb, gb, hb) = a, b
    return (
        [k for k, _ in sa] == [k for k, _ in sb]
        and all(torch.equal(x, y) for (_, x), (_, y) in zip(sa, sb))
        and ma == mb
        and ra == rb
        and ha == hb
        and all(x is y for x, y in zip(ga, gb))
    )


def _nonfinite(obj, depth: int = 0) -> bool:
    """Any NaN / infinity in a result (tensors, floats, dataclasses, containers)."""
    if depth > 4:
        return False
    if isinstance(obj, torch.Tensor):
        return obj.is_floating_point() and not bool(torch.isfinite(obj).all())
    if isinstance(obj, float):
        return not math.isfinite(obj)
    if isinstance(obj, list | tuple):
        return any(_nonfinite(v, depth + 1) for v in obj[:64])
    if isinstance(obj, dict):
        return any(_nonfinite(v, depth + 1) for v in list(obj.values())[:64])
    if is_dataclass(obj) and not isinstance(obj, type):
        return any(_nonfinite(getattr(obj, f.name), depth + 1) for f in fields(obj))
    if hasattr(obj, "heatmap") and isinstance(obj.heatmap, torch.Tensor):
        return _nonfinite(obj.heatmap)
    return False


def _files(folder: Path | None) -> list[str]:
    if folder is None or not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def check(entry: str, call, *, names, model=None, finite=True, folder=None, nan_ok=False):
    """Run ``call`` and assert the property; return the result or the XnnError."""
    before, files = _state(model), _files(folder)
    COUNTS[entry] += 1
    try:
        result = call()
    except XnnError as exc:
        msg = str(exc)
        assert any(n.lower() in msg.lower() for n in names), (
            f"{entry}: the message names none of {names}: {type(exc).__name__}: {msg}"
        )
        assert _files(folder) == files, f"{entry}: files left behind after {msg}"
        result = exc
        if os.environ.get("XNN_BAD_INPUT_LOG"):
            with open(os.environ["XNN_BAD_INPUT_LOG"], "a") as f:
                f.write(f"{entry}\t{type(exc).__name__}\t{msg[:90]}\n")
    except Exception as exc:  # noqa: BLE001 - the property: nothing but XnnError escapes
        raise AssertionError(f"{entry}: {type(exc).__name__} escaped: {exc}") from exc
    else:
        RESULTS[entry] += 1
        if finite and not nan_ok:
            assert not _nonfinite(result), f"{entry}: NaN or infinity out of finite input"
    finally:
        assert _same_state(before, _state(model)), f"{entry}: the model was changed"
    return result


# --------------------------------------------------------------------------- strategies

# weighted towards well-formed values, so that about half the cases reach a result
DTYPES = [torch.float32] * 6 + [torch.float64, torch.float16, torch.int64, torch.uint8, torch.bool]
SPECIALS = [None] * 9 + [float("nan"), float("inf"), float("-inf")]


@st.composite
def tensors(draw, dims=(0, 1, 2, 3, 4, 5), max_side=9, chans=(1, 2, 3, 4), lead=None, nonneg=False):
    """A tensor of a generated shape, dtype and value range, maybe one NaN / Inf.

    Returns ``(tensor, finite)``.
    """
    d = draw(st.sampled_from(dims))
    shape = []
    for i in range(d):
        if d == 4 and i == 1:
            shape.append(draw(st.sampled_from(chans)))
        elif i == 0 and lead is not None:
            shape.append(draw(lead))
        elif i == 0 and draw(st.sampled_from([False] * 7 + [True])):
            shape.append(0)  # an empty batch
        else:
            shape.append(draw(st.integers(1, max_side)))
    dtype = draw(st.sampled_from(DTYPES))
    scale = draw(st.sampled_from([1.0] * 6 + [255.0, 1e-3, 1e6, -1.0]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g) * scale
    if draw(st.sampled_from([False, False, True])) and not nonneg:
        x = x - 0.5 * scale
    x = x.to(dtype) if dtype != torch.bool else x > 0.5
    special = draw(st.sampled_from(SPECIALS))
    if special is not None and x.is_floating_point() and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    finite = not x.is_floating_point() or bool(torch.isfinite(x).all())
    return x, finite


def labels_for(n: int):
    """Labels of ``n`` items: good ones, out of range, negative, float, bool, wrong length."""
    return st.one_of(
        st.lists(st.integers(0, 3), min_size=n, max_size=n).map(torch.tensor),
        st.lists(st.integers(-3, 40), min_size=n, max_size=n).map(torch.tensor),
        st.lists(st.floats(-1, 11, allow_nan=False), min_size=n, max_size=n).map(torch.tensor),
        st.lists(st.booleans(), min_size=n, max_size=n).map(torch.tensor),
        st.lists(st.integers(0, 3), min_size=0, max_size=n + 2).map(torch.tensor),
        st.sampled_from(["abc", None, 3.5]),
    )


_NAMES = st.sampled_from(
    ["conv", "relu", "fc", "conv", "relu", "pool", 0, 1, 7, "nope", "", "conv.weight"]
)
NET_LAYERS = st.one_of(_NAMES, _NAMES, _NAMES, st.text(max_size=4))


class _Net(nn.Module):
    """Conv -> ReLU -> global pool -> linear: any image size from 1 x 1."""

    def __init__(self, in_chans: int = 3, k: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, k)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def net():
    return _Net().eval()


@pytest.fixture(scope="module")
def vgg():
    return load_model("bundled:vgg_synth")


# --------------------------------------------------------------------------- load_model

SPECS = st.one_of(
    st.sampled_from(
        [
            "bundled:vgg_synth",
            "bundled:nope",
            "zoo:vgg_small",
            "zoo:vgg_smal",
            "timm:",
            "timm:resnet10x",
            "tv:nothing",
            "banana:x",
            "",
            ":",
            "bundled:",
            "/no/such/file.safetensors",
            "weights.pt",
            "zoo:resnet_small",
        ]
    ),
    st.text(max_size=12),
)


@_examples(60)
@given(
    spec=SPECS,
    num_classes=st.one_of(st.none(), st.integers(-2, 12), st.just("ten"), st.just(2.5)),
    device=st.one_of(
        st.none(), st.sampled_from(["cpu", "banana", "cuda:0", "cuda:9", "mps", "cpu:0", ""])
    ),
)
def test_load_model_specs(spec, num_classes, device):
    if device and device.startswith(("cuda", "mps")) and torch.cuda.is_available():
        device = "banana"
    check(
        "load_model(spec)",
        lambda: load_model(spec, num_classes=num_classes, device=device),
        names=[
            "spec",
            "num_classes",
            "device",
            "bundled",
            "zoo",
            "timm",
            "torchvision",
            "architecture",
            "weights",
            "model",
            "card",
            "file",
            "prefix",
        ],
    )


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from xnn_toolkit.models import save_model

    folder = tmp_path_factory.mktemp("weights")
    path = save_model(load_model("zoo:vgg_small", num_classes=3), folder / "w.safetensors")
    return path


CARD_EDITS = st.sampled_from(
    [
        ("arch", None),
        ("arch", "zoo:nope"),
        ("arch", 3),
        ("num_classes", 7),
        ("num_classes", "x"),
        ("mean", [0.5]),
        ("std", [0, 0, 0]),
        ("input_size", [3]),
        ("class_names", 5),
        ("weights_sha256", "0" * 64),
        ("arch_kwargs", "junk"),
        ("interpolation", None),
    ]
)


@_examples(50)
@given(
    kind=st.sampled_from(["truncate", "flip", "card", "no-card", "garbage-card"]),
    where=st.floats(0, 1),
    edit=CARD_EDITS,
)
def test_load_model_corrupted_files(weights_file, tmp_path_factory, kind, where, edit):
    folder = tmp_path_factory.mktemp("corrupt")
    path = folder / "w.safetensors"
    shutil.copy(weights_file, path)
    shutil.copy(weights_file.with_suffix(".json"), folder / "w.json")
    data = bytearray(path.read_bytes())
    at = min(int(where * len(data)), len(data) - 1)
    if kind == "truncate":
        path.write_bytes(bytes(data[:at]))
    elif kind == "flip":
        data[at] ^= 0x41
        path.write_bytes(bytes(data))
    elif kind == "card":
        card = json.loads((folder / "w.json").read_text())
        card[edit[0]] = edit[1]
        (folder / "w.json").write_text(json.dumps(card))
    elif kind == "no-card":
        (folder / "w.json").unlink()
    else:
        (folder / "w.json").write_text("{not json")
    res = check(
        "load_model(file)",
        lambda: load_model(path),
        names=["w.safetensors", "w.json", "card", "weights"],
    )
    if kind in ("truncate", "flip"):
        assert isinstance(res, XnnError), "damaged weights loaded without complaint"


# --------------------------------------------------------------------------- extract


@_examples(80)
@given(
    x=tensors(dims=(0, 1, 3) + (4,) * 8 + (5,), chans=(3, 3, 3, 1, 4)),
    layer=NET_LAYERS,
    labels=st.data(),
    on_disk=st.booleans(),
    batch=st.sampled_from([1, 2, 4, 4, 0, -1]),
)
def test_extract(net, tmp_path_factory, x, layer, labels, on_disk, batch):
    x, finite = x
    folder = tmp_path_factory.mktemp("bank") if on_disk else None
    data: object = x
    if x.dim() >= 1 and labels.draw(st.booleans()):
        y = labels.draw(labels_for(int(x.shape[0])))
        data = list(zip(x, y)) if isinstance(y, torch.Tensor) and len(y) == len(x) else (x, y)
        if isinstance(data, list):
            data = _ListDataset(data)
    res = check(
        "extract",
        lambda: extract(
            net,
            data,
            layer,
            path=None if folder is None else folder / "b",
            batch_size=batch,
            progress=False,
        ),
        model=net,
        finite=finite,
        folder=folder,
        names=[
            "data",
            "layer",
            "batch_size",
            "labels",
            "images",
            "inputs",
            "input",
            "tensor",
            "batch",
            "channel",
            "dataset",
            "empty",
        ],
    )
    if isinstance(res, ActivationBank):
        assert not _nonfinite(res.activations(res.layers[0])) or not finite
    # the same case repaired (float, finite, 3 channels, a real layer) must give the result a
    # hand-run forward gives
    good = _repair(x)
    bank = check(
        "extract (repaired)",
        lambda: extract(net, good, "relu", batch_size=2, progress=False),
        model=net,
        names=[],
    )
    with torch.no_grad():
        want = net.relu(net.conv(good))
    torch.testing.assert_close(bank.activations("relu"), want)


def _repair(x: torch.Tensor) -> torch.Tensor:
    """A well-formed batch made from a generated tensor: what a careful user would pass."""
    if x.dim() != 4 or 0 in x.shape:
        return torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(x.numel()))
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-3, 3)
    return x[:, :1].expand(-1, 3, -1, -1).contiguous() if x.shape[1] != 3 else x


class _ListDataset(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# --------------------------------------------------------------------------- attribution

METHODS = _canonical_methods()
TARGETS = st.one_of(
    st.integers(0, 3),
    st.integers(0, 3),
    st.integers(-2, 6),
    st.none(),
    st.just(2.5),
    st.just("cat"),
    st.lists(st.integers(-1, 5), max_size=4),
)


@pytest.mark.parametrize("method", METHODS)
@_examples(16)
@given(
    x=tensors(dims=(3,) + (4,) * 6, max_side=12, chans=(1, 3, 3, 3, 4)),
    target=TARGETS,
    layer=st.sampled_from([None, "conv", "relu", None, "conv", "relu", "fc", "nope", 0]),
)
def test_attribution_methods(net, method, x, target, layer):
    x, finite = x
    res = check(
        f"attribute:{method}",
        lambda: get_method(method)(net, layer=layer).attribute(x, target),
        model=net,
        finite=finite,
        names=["inputs", "target", "layer", "class", "channel", "model"],
    )
    if not isinstance(res, XnnError):
        assert res.heatmap.shape[0] == x.shape[0]
    # repaired (well-formed batch, class 0, the method's own or a conv read layer): a finite
    # heatmap per image, and the first layer that works is enough
    good = _repair(x)
    errors = []
    for read in (None, "relu"):
        got = check(
            f"attribute:{method} (repaired)",
            lambda r=read: get_method(method)(net, layer=r).attribute(good, 0),
            model=net,
            names=["layer", "None", "input"],
        )
        if not isinstance(got, XnnError):
            assert got.heatmap.shape[0] == good.shape[0]
            break
        errors.append(str(got))
    else:
        raise AssertionError(f"{method} gave no heatmap for a well-formed batch: {errors}")


# --------------------------------------------------------------------------- heads


@st.composite
def head_data(draw):
    n = draw(st.sampled_from([0, 3, 40, 40, 40]))
    z, z_ok = draw(tensors(dims=(2, 2, 2, 4, 1, 3), lead=st.just(n), max_side=6, nonneg=True))
    good = tensors(dims=(2,), lead=st.just(n), max_side=4)
    logits, l_ok = draw(
        st.one_of(
            good,
            good,
            good,
            st.sampled_from([("abc", True), (None, True)]),
        )
    )
    labels = draw(st.one_of(st.none(), st.none(), labels_for(n)))
    return z, logits, labels, z_ok and l_ok


HEAD_NAMES = [
    "activations",
    "logits",
    "labels",
    "examples",
    "classes",
    "n_features",
    "Z",
    "features",
    "dim",
    "shape",
    "X",
    "positive",
    "negative",
    "layer",
    "data",
]


@_examples(50)
@given(data=head_data(), n_features=st.sampled_from([1, 2, 0, 50, "2"]))
def test_xnn_fit_and_transform(data, n_features):
    z, logits, labels, finite = data
    head = XNN(
        n_features=n_features,
        hidden=(4,),
        n_positive=4,
        n_negative=8,
        max_epochs=1,
        batch_size=16,
        val_fraction=0.25,
    )
    res = check(
        "XNN.fit", lambda: head.fit(z, logits, labels=labels), finite=finite, names=HEAD_NAMES
    )
    if not isinstance(res, XnnError):
        check("XNN.transform", lambda: head.transform(z), finite=finite, names=HEAD_NAMES)
        return
    # repaired (finite float activations with at least 3 dimensions, balanced logits): it must
    # fit, and its x-features must be finite
    good = (
        torch.nan_to_num(z.float(), posinf=1.0, neginf=-1.0).reshape(len(z), -1)
        if (z.dim() >= 2 and len(z) == 40 and z.is_floating_point())
        else _rand40()
    )
    if good.shape[1] < 3:
        good = _rand40()
    w = torch.randn(good.shape[1], 3, generator=torch.Generator().manual_seed(0))
    balanced = torch.nn.functional.one_hot(torch.arange(40) % 3, 3).float() * 10
    ok = XNN(
        n_features=2,
        hidden=(4,),
        n_positive=4,
        n_negative=8,
        max_epochs=1,
        batch_size=16,
        val_fraction=0.25,
    )
    y = balanced + 0.1 * good @ w
    check("XNN.fit (repaired)", lambda: ok.fit(good, y, labels=torch.arange(40) % 3), names=[])
    out = check("XNN.transform (repaired)", lambda: ok.transform(good), names=[])
    assert out.shape[0] == len(good)


def _rand40() -> torch.Tensor:
    return torch.rand(40, 6, generator=torch.Generator().manual_seed(1))


@_examples(50)
@given(data=head_data(), rank=st.sampled_from([1, 2, 0, 9, "2"]))
def test_nmf_fit_and_transform(data, rank):
    z, _, labels, finite = data
    head = NMFConcepts(rank=rank, max_iter=5)
    res = check(
        "NMFConcepts.fit",
        lambda: head.fit(z, labels),
        finite=finite,
        names=HEAD_NAMES + ["rank", "negative"],
    )
    if not isinstance(res, XnnError):
        check(
            "NMFConcepts.transform",
            lambda: head.transform(z),
            finite=finite,
            names=HEAD_NAMES + ["rank"],
        )


@pytest.fixture(scope="module")
def saved_heads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("heads")
    g = torch.Generator().manual_seed(0)
    z = torch.rand(40, 6, generator=g)
    logits = z @ torch.randn(6, 3, generator=g)
    XNN(n_features=2, hidden=(4,), n_positive=5, n_negative=10, val_fraction=0.2, max_epochs=1).fit(
        z, logits
    ).save(folder / "xnn")
    NMFConcepts(rank=2, max_iter=20).fit(z).save(folder / "nmf.safetensors")
    return folder


@_examples(60)
@given(
    head=st.sampled_from(["xnn", "nmf"]),
    kind=st.sampled_from(["truncate", "flip", "json-junk", "json-key", "missing"]),
    where=st.floats(0, 1),
    key=st.sampled_from(
        [
            "kind",
            "n_features",
            "hidden",
            "classes_",
            "n_inputs_",
            "scale_",
            "spatial_",
            "type",
            "params",
            "x_activation",
        ]
    ),
    value=st.sampled_from(["junk", -1, None, [1, "a"], 1e300, {}]),
)
def test_head_load_corruptions(saved_heads, tmp_path_factory, head, kind, where, key, value):
    folder = tmp_path_factory.mktemp("load")
    for f in saved_heads.iterdir():
        if f.name.startswith(head):
            shutil.copy(f, folder / f.name)
    weights = folder / ("xnn.safetensors" if head == "xnn" else "nmf.safetensors")
    if kind in ("truncate", "flip"):
        data = bytearray(weights.read_bytes())
        at = min(int(where * len(data)), len(data) - 1)
        if kind == "truncate":
            weights.write_bytes(bytes(data[:at]))
        else:
            data[at] ^= 0x41
            weights.write_bytes(bytes(data))
    elif kind == "missing":
        weights.unlink()
    elif head == "xnn":
        meta = json.loads((folder / "xnn.json").read_text())
        if kind == "json-junk":
            (folder / "xnn.json").write_text("[1, 2")
        else:
            target = meta["params"] if key in meta["params"] else meta
            target[key] = value
            (folder / "xnn.json").write_text(json.dumps(meta))
    if head == "xnn":
        load = lambda: XNN.load(folder / "xnn")  # noqa: E731
        entry = "XNN.load"
    else:
        load = lambda: NMFConcepts.load(weights)  # noqa: E731
        entry = "NMFConcepts.load"
    res = check(entry, load, names=["xnn", "nmf", "saved", "safetensors", "json"])
    if not isinstance(res, XnnError) and head == "xnn":
        out = res.transform(torch.rand(3, 6))  # what loaded must work
        assert torch.isfinite(out).all()


MODEL_HEADS = {
    "ClassSpecificGates": (
        lambda: ClassSpecificGates(layer="relu", epochs=1, batch_size=8, warmup=0),
        lambda h, net, x, y: h.fit(net, (x, y)),
    ),
    "ClassPaths": (
        lambda: ClassPaths(layers=["relu"], epochs=1, batch_size=8, min_images=2),
        lambda h, net, x, y: h.fit(net, (x, y)),
    ),
    "InformationDropout": (
        lambda: InformationDropout(layers=["relu"], epochs=1, batch_size=8, min_images=2),
        lambda h, net, x, y: h.fit(net, (x, y)),
    ),
}


@pytest.mark.parametrize("head", sorted(MODEL_HEADS))
@_examples(12)
@given(
    x=tensors(
        dims=(4,) * 6 + (3,),
        max_side=8,
        chans=(3, 3, 3, 1),
        lead=st.sampled_from([16, 16, 16, 0, 2]),
    ),
    labels=st.data(),
    kind=st.sampled_from(["none", "truncate", "json", "edit", "edit"]),
    edit=st.tuples(st.integers(0, 40), st.sampled_from(["junk", -1, None, [1, "a"], 1e300])),
)
def test_model_heads(net, tmp_path_factory, head, x, labels, kind, edit):
    x, finite = x
    n = int(x.shape[0]) if x.dim() else 0
    y = labels.draw(st.one_of(st.just(torch.arange(n) % 4), labels_for(n)))
    make, fit = MODEL_HEADS[head]
    h = make()
    res = check(
        f"{head}.fit",
        lambda: fit(h, net, x, y),
        model=net,
        finite=finite,
        names=[
            "data",
            "labels",
            "images",
            "inputs",
            "class",
            "layer",
            "batch",
            "channel",
            "examples",
            "samples",
            "dataset",
            "min_images",
        ],
    )
    if isinstance(res, XnnError):
        return
    if head == "ClassSpecificGates":
        good = _repair(x)
        check(f"{head}.transform", lambda: h.transform(good), model=net, names=["images"])
    folder = tmp_path_factory.mktemp("mh")
    h.save(folder / "h")
    files = sorted(folder.iterdir())
    if kind == "truncate":
        w = next(f for f in files if f.suffix == ".safetensors")
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif kind == "json":
        j = next(f for f in files if f.suffix == ".json")
        j.write_text(j.read_text().replace("{", "[", 1))
    elif kind == "edit":  # one value of the JSON (or of its params) replaced by junk
        j = next(f for f in files if f.suffix == ".json")
        meta = json.loads(j.read_text())
        keys = [(meta, k) for k in meta] + [(meta["params"], k) for k in meta["params"]]
        where, key = keys[edit[0] % len(keys)]
        where[key] = edit[1]
        j.write_text(json.dumps(meta))
    check(
        f"{head}.load",
        lambda: type(h).load(folder / "h"),
        names=["saved", "safetensors", "json", "gates", "paths", "dropout", str(folder)],
    )


# --------------------------------------------------------------------------- metrics


@st.composite
def maps_and_masks(draw):
    maps, ok = draw(tensors(dims=(2, 3, 3, 3, 4), max_side=8))
    shape = tuple(maps.shape) if maps.dim() == 3 else None
    mask_shape = draw(
        st.one_of(st.just(shape), st.lists(st.integers(0, 8), min_size=2, max_size=4).map(tuple))
    )
    if mask_shape is None:
        mask_shape = (2, 4, 4)
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    masks = torch.rand(mask_shape, generator=g) > draw(st.sampled_from([0.5, 0.0, 1.0]))
    if draw(st.booleans()):
        masks = masks.float()
    return maps, masks, ok


METRICS = {
    "pointing_game": lambda m, k: M.pointing_game(m, k),
    "energy_pointing_game": lambda m, k: M.energy_pointing_game(m, k),
    "iou": lambda m, k: M.iou(m > 0.5 if m.is_floating_point() else m, k),
    "top_k_intersection": lambda m, k: M.top_k_intersection(m, k, 0.3),
    "pixel_ranks": lambda m, k: M.pixel_ranks(m),
    "top_pixels": lambda m, k: M.top_pixels(m, 0.3),
    "orthogonality": lambda m, k: M.orthogonality(m),
    "spearman_correlation": lambda m, k: M.spearman_correlation(m, k),
    "pearson_correlation": lambda m, k: M.pearson_correlation(m, k),
    "pixel_probabilities": lambda m, k: M.pixel_probabilities(m),
}
METRIC_NAMES = [
    "heatmap",
    "mask",
    "pred",
    "target",
    "shape",
    "maps",
    "input",
    "a ",
    "b ",
    "tensor",
    "dtype",
    "k ",
    "N x",
    "empty",
    "finite",
    "NaN",
    "size",
    "same",
]


@pytest.mark.parametrize("metric", sorted(METRICS))
@_examples(20)
@given(case=maps_and_masks())
def test_metrics(metric, case):
    maps, masks, finite = case
    check(
        f"metric:{metric}", lambda: METRICS[metric](maps, masks), finite=finite, names=METRIC_NAMES
    )


@_examples(40)
@given(
    acts=tensors(dims=(1, 2, 2, 3), max_side=30),
    labels=st.data(),
    which=st.sampled_from(
        [
            "f_reg",
            "f_cls",
            "gaussian_total_correlation",
            "mutual_information_score",
            "entropy_split",
        ]
    ),
)
def test_feature_metrics(acts, labels, which):
    a, finite = acts
    n = int(a.shape[0]) if a.dim() else 0
    y = labels.draw(labels_for(n))
    calls = {
        "f_reg": lambda: M.f_reg(a, a),
        "f_cls": lambda: M.f_cls(a, a),
        "gaussian_total_correlation": lambda: M.gaussian_total_correlation(a),
        "mutual_information_score": lambda: M.mutual_information_score(a, y),
        "entropy_split": lambda: M.entropy_split(a, y),
    }
    check(
        f"metric:{which}",
        calls[which],
        finite=finite,
        names=METRIC_NAMES
        + ["activations", "labels", "y_bar", "y_hat", "logits", "example", "samples", "classes"],
    )


@pytest.mark.parametrize("curve", ["deletion_curve", "insertion_curve"])
@_examples(16)
@given(
    x=tensors(dims=(4,) * 5 + (3,), max_side=8, chans=(3, 3, 3, 1)),
    maps=tensors(dims=(3,) * 5 + (2, 4), max_side=8),
    target=TARGETS,
    steps=st.sampled_from([4, 4, 0, -1, 1000]),
)
def test_curves(net, curve, x, maps, target, steps):
    (x, x_ok), (m, m_ok) = x, maps
    if x.dim() == 4 and m.dim() == 3 and m.shape[0] == x.shape[0]:
        # maps of the images' size (the other shapes stay as generated), so results are reached
        m = m[:, :1, :1].expand(-1, x.shape[2], x.shape[3]).contiguous()
    check(
        f"metric:{curve}",
        lambda: getattr(M, curve)(net, x, m, target, steps=steps),
        model=net,
        finite=x_ok and m_ok,
        names=METRIC_NAMES + ["inputs", "target", "steps", "model"],
    )


# --------------------------------------------------------------------------- score_dataset


class _Mutated(Dataset):
    """Synthetic raw birds with one generated defect."""

    def __init__(self, base, defect: str, at: int, space) -> None:
        self.base, self.defect, self.at = base, defect, at
        self.part_names = base.part_names
        if space is not None:
            self.image_space = space

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, label, ann = self.base[i]
        if i == self.at:
            if self.defect == "nan":
                img = img.clone()
                img[0, 1, 1] = float("nan")
            elif self.defect == "grey":
                img = img[:1]
            elif self.defect == "255":
                img = img * 255
            elif self.defect == "float-label":
                label = label + 0.5
            elif self.defect == "big-label":
                label = 99
            elif self.defect == "uint8":
                img = (img * 255).to(torch.uint8)
        return img, label, ann


@_examples(32)
@given(
    defect=st.sampled_from(
        ["none", "none", "none", "nan", "grey", "255", "float-label", "big-label", "uint8"]
    ),
    at=st.integers(0, 3),
    space=st.sampled_from(["raw"] * 4 + [None, "normalized", "junk"]),
    methods=st.sampled_from([("gradcam",), ("gradcam",), ("nope",), ()]),
    batch=st.sampled_from([2, 2, 2, 0, -1, "2"]),
    on_disk=st.booleans(),
)
def test_score_dataset(vgg, tmp_path_factory, defect, at, space, methods, batch, on_disk):
    base = load_dataset("synthetic", n=4, size=32)
    ds = _Mutated(base, defect, at, space)
    folder = tmp_path_factory.mktemp("score") if on_disk else None
    cfg = lambda: ScoringConfig(  # noqa: E731
        methods=methods,
        metrics=("pointing_game",),
        batch_size=batch,
        steps=2,
    )
    res = check(
        "score_dataset",
        lambda: score_dataset(
            vgg, ds, cfg(), out=None if folder is None else folder / "run", progress=False
        ),
        model=vgg.model,
        folder=folder,
        nan_ok=True,
        names=[
            "dataset",
            "image",
            "label",
            "method",
            "batch_size",
            "config",
            "metric",
            "channel",
            "methods",
        ],
    )
    if defect in ("nan", "grey", "255", "float-label", "big-label", "uint8") or space in (
        None,
        "normalized",
        "junk",
    ):
        assert isinstance(res, XnnError), f"{defect} / {space} scored without complaint"


# --------------------------------------------------------------------------- CLI

CLI_VALUES = st.sampled_from(
    [
        "0",
        "-1",
        "2",
        "abc",
        "",
        "bundled:vgg_synth",
        "fc66",
        "cuda:7",
        "banana",
        "synthetic",
        "fashion-mnist",
        "cmwp,nope",
        "1e3",
    ]
)


@_examples(60)
@given(
    command=st.sampled_from(["extract", "score", "data", "models", "nope"]),
    options=st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "--n",
                    "--layer",
                    "--device",
                    "--model",
                    "--dataset",
                    "--methods",
                    "--batch-size",
                    "--seed",
                    "--steps",
                    "--threads",
                    "--x",
                ]
            ),
            CLI_VALUES,
        ),
        max_size=4,
    ),
)
def test_cli(tmp_path_factory, capsys, command, options):
    folder = tmp_path_factory.mktemp("cli")
    argv = [command, "--out", str(folder / "out")] if command != "models" else [command]
    base = {
        "extract": ["--model", "bundled:vgg_synth", "--layer", "fc6", "--n", "2"],
        "score": [
            "--model",
            "bundled:vgg_synth",
            "--n",
            "2",
            "--methods",
            "gradcam",
            "--metrics",
            "pointing_game",
            "--steps",
            "2",
        ],
        "data": ["--n", "2"],
    }.get(command, [])
    argv += base
    for k, v in options:
        argv += [k, v]
    if command != "models":
        argv += ["--no-progress"] if command in ("extract", "score") else []

    def run():
        try:
            return main(argv)
        except SystemExit as exc:  # argparse: usage errors exit 2 with one message
            return exc.code

    before = _files(folder)
    COUNTS["cli"] += 1
    try:
        rc = run()
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"xnn {argv}: {type(exc).__name__} escaped: {exc}") from exc
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, rc, err[-500:])
    RESULTS["cli"] += rc == 0
    if rc == 2:
        assert "error" in err and "Traceback" not in err, err[-1000:]
        assert _files(folder) == before, f"xnn {argv} failed and left {_files(folder)}"
