"""Activation bank: extraction against a hand-run forward, disk format, resumption, failures."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from xnn_toolkit.bank import ActivationBank, extract
from xnn_toolkit.errors import BankError, InputError, LayerNotFoundError

LAYERS = ["2", "5", "8"]  # after conv1-BN-ReLU, after conv2-ReLU-pool, the linear layer


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machines share two cores between several processes; with one intra-op thread
    # torch does not spin-wait for busy cores (ten times less CPU time under contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0
        nn.BatchNorm2d(8),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(8, 6, 3, padding=1),  # 3
        nn.ReLU(),  # 4
        nn.MaxPool2d(2),  # 5
        nn.AdaptiveAvgPool2d(2),  # 6
        nn.Flatten(),  # 7
        nn.Linear(24, 5),  # 8
    )
    # non-trivial BatchNorm statistics, so eval and train mode differ
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net


def _data(n: int = 37) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def _reference(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Activations computed by running the Sequential's prefixes by hand (no hooks)."""
    net = net.eval()
    with torch.no_grad():
        return {name: net[: int(name) + 1](x) for name in LAYERS} | {"logits": net(x)}


def _state(net: nn.Module) -> dict:
    return {
        "tensors": {k: v.clone() for k, v in net.state_dict().items()},
        "modes": [m.training for m in net.modules()],
        "flags": [p.requires_grad for p in net.parameters()],
        "hooks": [dict(m._forward_hooks) for m in net.modules()],
    }


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["modes"] == b["modes"] and a["flags"] == b["flags"] and a["hooks"] == b["hooks"]


def _assert_banks_equal(a: ActivationBank, b: ActivationBank) -> None:
    assert a.layers == b.layers and len(a) == len(b)
    for layer in a.layers:
        assert torch.equal(a.activations(layer), b.activations(layer)), layer
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.indices, b.indices)


# --------------------------------------------------------------------------- extraction


def test_in_memory_bank_matches_hand_run_forward():
    net, (x, y) = _net(), _data()
    ref = _reference(net, x)
    bank = extract(net, TensorDataset(x, y), LAYERS, batch_size=37, progress=False)
    assert bank.path is None and len(bank) == 37 and bank.layers == LAYERS
    for name in LAYERS:
        assert bank.shape(name) == tuple(ref[name].shape)
        torch.testing.assert_close(bank.activations(name), ref[name], rtol=0, atol=0)
    torch.testing.assert_close(bank.logits, ref["logits"], rtol=0, atol=0)
    assert torch.equal(bank.labels, y) and torch.equal(bank.indices, torch.arange(37))


def test_batches_of_other_sizes_agree_up_to_rounding():
    net, (x, _) = _net(), _data()
    ref = _reference(net, x)
    bank = extract(net, x, LAYERS, batch_size=5, progress=False)
    for name in LAYERS:
        torch.testing.assert_close(bank.activations(name), ref[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(bank.labels, torch.full((37,), -1))


def test_model_left_unchanged_also_from_train_mode():
    net, (x, _) = _net(), _data()
    net.train()
    net[0].weight.requires_grad_(False)
    handle = net[3].register_forward_hook(lambda *a: None)
    before = _state(net)
    extract(net, x, LAYERS, batch_size=16, progress=False)
    _assert_same_state(before, _state(net))  # BN running stats included
    assert net.training
    handle.remove()


def test_disk_bank_equals_memory_bank(tmp_path):
    net, (x, y) = _net(), _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    mem = extract(net, loader, LAYERS, progress=False)
    disk = extract(net, loader, LAYERS, path=tmp_path / "b", shard_size=10, progress=False)
    assert disk.path == tmp_path / "b"
    _assert_banks_equal(mem, disk)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["n"] for s in manifest["shards"]] == [10, 10, 10, 7]
    assert manifest["complete"] and manifest["num_samples"] == 37
    for f in (tmp_path / "b").glob("*.npy"):  # plain arrays, loadable without pickle
        np.load(f, allow_pickle=False)


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_pooled_bank_equals_manual_pooling(pool):
    net, (x, _) = _net(), _data()
    ref = _reference(net, x)
    bank = extract(net, x, LAYERS, pool=pool, batch_size=37, progress=False)
    for name in LAYERS[:2]:
        manual = ref[name].mean((2, 3)) if pool == "avg" else ref[name].amax((2, 3))
        assert bank.shape(name) == (37, ref[name].shape[1])
        torch.testing.assert_close(bank.activations(name), manual, rtol=1e-6, atol=1e-6)
    # a linear layer's N x D output is not pooled
    torch.testing.assert_close(bank.activations("8"), ref["8"], rtol=0, atol=0)


def test_float16_storage(tmp_path):
    net, (x, _) = _net(), _data()
    ref = _reference(net, x)
    bank = extract(
        net, x, LAYERS, dtype=torch.float16, batch_size=37, path=tmp_path / "h", progress=False
    )
    full = extract(net, x, LAYERS, batch_size=37, path=tmp_path / "f", progress=False)
    assert bank.dtype == torch.float16
    for name in LAYERS:
        got = bank.activations(name)
        assert got.dtype == torch.float32
        assert torch.equal(got, ref[name].half().float())
    assert torch.equal(bank.logits, ref["logits"])  # logits stay float32
    size_h = (tmp_path / "h" / "s00000-act0.npy").stat().st_size
    size_f = (tmp_path / "f" / "s00000-act0.npy").stat().st_size
    assert size_h < 0.55 * size_f
    assert full.dtype == torch.float32


def test_data_forms_and_labels():
    net, (x, y) = _net(), _data(10)
    ref = _reference(net, x)

    class Dicts(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return {"image": x[i], "label": int(y[i])}

    class Triples(Dataset):  # (x, annotation-with-label, extra), like part datasets
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return x[i], type("Ann", (), {"label": int(y[i])})(), "extra"

    forms = {
        "dict dataset": Dicts(),
        "triples": Triples(),
        "list of pairs": [(x[:4], y[:4]), (x[4:], y[4:].tolist())],
        "generator of x": (x[i : i + 3] for i in range(0, 10, 3)),
        "dict batches": [{"image": x[:6], "label": y[:6]}, {"image": x[6:], "label": y[6:]}],
    }
    for what, data in forms.items():
        bank = extract(net, data, ["5"], batch_size=4, progress=False)
        torch.testing.assert_close(bank.activations("5"), ref["5"], rtol=1e-5, atol=1e-6, msg=what)
        want = torch.full((10,), -1) if what == "generator of x" else y
        assert torch.equal(bank.labels, want), what


def test_layers_by_module_and_stage_and_duplicates():
    net, (x, _) = _net(), _data(6)
    bank = extract(net, x, [net[2], "5", "5", 2], progress=False)
    assert bank.layers[:2] == ["2", "5"]


def test_non_finite_activations_name_layer_and_batch():
    net, (x, _) = _net(), _data(20)
    x = x.clone()
    x[13, 0, 3, 3] = float("nan")
    # a NaN image is refused at the door, naming its batch, before any layer sees it
    with pytest.raises(InputError, match=r"data \(images 8..15\).*1 NaN.*images \[5\]"):
        extract(net, x, LAYERS, batch_size=8, progress=False)
    # finite input that overflows inside the network is named by layer and batch
    with torch.no_grad():
        net[3].bias[0] = float("inf")
    with pytest.raises(InputError, match=r"layer '5' at batch 0 \(samples \[0"):
        extract(net, _data(20)[0], LAYERS, batch_size=8, progress=False)


def test_float16_overflow_is_reported():
    net, (x, _) = _net(), _data(4)
    with pytest.raises(InputError, match="overflow float16.*dtype=torch.float32"):
        extract(net, x * 1e6, ["0"], dtype=torch.float16, progress=False)


def test_empty_data_is_an_input_error(tmp_path):
    net = _net()
    with pytest.raises(InputError, match="empty"):
        extract(net, torch.empty(0, 3, 12, 12), LAYERS, progress=False)
    with pytest.raises(InputError, match="no samples"):
        extract(net, [], LAYERS, path=tmp_path / "e", progress=False)
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_bad_arguments():
    net, (x, _) = _net(), _data(4)
    with pytest.raises(InputError, match="pool"):
        extract(net, x, LAYERS, pool="mean", progress=False)
    with pytest.raises(InputError, match="dtype"):
        extract(net, x, LAYERS, dtype=torch.int8, progress=False)
    with pytest.raises(InputError, match="batch_size"):
        extract(net, x, LAYERS, batch_size=0, progress=False)
    with pytest.raises(LayerNotFoundError, match="no layer named '80'"):
        extract(net, x, ["80"], progress=False)
    with pytest.raises(InputError, match=r"model\.to\("):
        extract(net, x, LAYERS, device="meta", progress=False)


def test_progress_bar(capsys):
    net, (x, _) = _net(), _data(8)
    extract(net, x, ["2"], batch_size=4, progress=True)
    assert "extract" in capsys.readouterr().err
    extract(net, x, ["2"], batch_size=4, progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the bank API


def test_from_tensors_and_reading_api():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(11, 4, 3, 3, generator=g)
    b = torch.randn(11, 7, generator=g)
    logits = torch.randn(11, 3, generator=g)
    bank = ActivationBank.from_tensors(
        {"conv": a, "fc": b}, logits=logits, labels=torch.arange(11) % 3
    )
    assert bank.layers == ["conv", "fc"] and len(bank) == 11
    assert torch.equal(bank.activations("conv"), a)
    idx = [10, 0, 3, 3]
    assert torch.equal(bank.activations("conv", idx), a[idx])
    assert torch.equal(bank.activations("fc", torch.tensor(idx)), b[idx])
    assert torch.equal(torch.cat(list(bank.iter_batches("conv", 4))), a)
    assert [t.shape[0] for t in bank.iter_batches("conv", 4)] == [4, 4, 3]
    assert torch.equal(bank.logits, logits) and torch.equal(bank.labels, torch.arange(11) % 3)
    assert ActivationBank.from_tensors({"fc": b}).logits is None
    for got in (bank.activations("fc"), next(bank.iter_batches("fc", 11)), bank.logits):
        got.zero_()  # what a caller does with its copy never reaches the bank
    assert torch.equal(bank.activations("fc"), b) and torch.equal(bank.logits, logits)
    with pytest.raises(LayerNotFoundError, match="did you mean: conv"):
        bank.activations("cnv")
    with pytest.raises(InputError, match="0 .. 10"):
        bank.activations("fc", [11])
    with pytest.raises(InputError, match="samples"):
        ActivationBank.from_tensors({"a": a, "b": b[:5]})
    with pytest.raises(InputError, match="logits"):
        ActivationBank.from_tensors({"a": a}, logits=logits[:4])


def test_iter_batches_across_shards_and_indices(tmp_path):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(23, 5, 2, 2, generator=g)
    ActivationBank.from_tensors({"a": a}).save(tmp_path / "b", shard_size=4)
    bank = ActivationBank.load(tmp_path / "b")
    assert len(list((tmp_path / "b").glob("*-act0.npy"))) == 6
    batches = list(bank.iter_batches("a", 5))
    assert [t.shape[0] for t in batches] == [5, 5, 5, 5, 3]
    for k, t in enumerate(batches):
        assert torch.equal(t, a[5 * k : 5 * k + 5])
    idx = torch.tensor([22, 0, 4, 3, 4, 17])
    assert torch.equal(bank.activations("a", idx), a[idx])


def test_save_load_round_trip(tmp_path):
    net, (x, y) = _net(), _data()
    mem = extract(net, TensorDataset(x, y), LAYERS, progress=False)
    mem.save(tmp_path / "m")
    loaded = ActivationBank.load(tmp_path / "m", verify=True)
    _assert_banks_equal(mem, loaded)
    assert loaded.pool is None and loaded.dtype == torch.float32
    loaded.save(tmp_path / "copy", shard_size=9)  # disk to disk, re-sharded
    _assert_banks_equal(mem, ActivationBank.load(tmp_path / "copy"))
    with pytest.raises(BankError, match="overwrite=True"):
        mem.save(tmp_path / "m")
    mem.save(tmp_path / "m", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(BankError, match="notes.txt"):
        mem.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- resumption


class _Counting(Dataset):
    """Map-style dataset that counts the items read."""

    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("resume_with", ["dataset", "loader"])
def test_resume_after_error_in_data_iterator(tmp_path, resume_with):
    net, (x, y) = _net(), _data()
    ref = extract(net, TensorDataset(x, y), LAYERS, batch_size=4, progress=False)

    def failing():
        for a in range(0, 37, 4):
            if a == 24:
                raise RuntimeError("disk unplugged")
            yield x[a : a + 4], y[a : a + 4]

    with pytest.raises(RuntimeError, match="unplugged"):
        extract(net, failing(), LAYERS, path=tmp_path / "b", shard_size=10, progress=False)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["n"] for s in manifest["shards"]] == [10, 10] and not manifest["complete"]
    with pytest.raises(BankError, match="unfinished"):
        ActivationBank.load(tmp_path / "b")
    data = _Counting(x, y)
    source = data if resume_with == "dataset" else DataLoader(data, batch_size=4)
    bank = extract(net, source, LAYERS, path=tmp_path / "b", batch_size=4, progress=False)
    # only the samples after the two finished shards, plus the 8 of the data fingerprint and
    # the first image, read at the door to check the channels
    assert data.reads == 17 + 8 + 1
    _assert_banks_equal(ref, bank)
    # a finished bank is returned as is, without running the model
    data.reads = 0
    again = extract(net, data, LAYERS, path=tmp_path / "b", progress=False)
    assert data.reads == 8 + 1  # the fingerprint's probe and the door's first image only
    _assert_banks_equal(ref, again)


_KILLED_RUN = """
import os, signal, sys
import numpy as np, torch
from safetensors.torch import load_file
sys.path.insert(0, {root!r})
from test_bank import _net
from xnn_toolkit import bank as features

net = _net()
net.load_state_dict(load_file({weights!r}))
x = torch.from_numpy(np.load({xs!r}))
mode = sys.argv[1]

def batches():
    for k, a in enumerate(range(0, len(x), 4)):
        if mode == "iterator" and k == 7:  # in the middle of the third shard
            os.kill(os.getpid(), signal.SIGKILL)
        yield x[a:a + 4]

if mode == "write":
    real = np.lib.format.write_array
    count = [0]
    def half_then_die(f, arr, **kw):
        count[0] += 1
        if count[0] == 2 * 6 + 3:  # the third file of shard 2
            f.write(b"\\x93NUMPY half a shard")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(f, arr, **kw)
    np.lib.format.write_array = half_then_die

features.extract(net, batches(), ["2", "5", "8"], path={bank!r}, shard_size=10,
                 progress=False)
"""


@pytest.mark.parametrize("mode", ["iterator", "write"])
def test_resume_after_sigkill(tmp_path, mode):
    from safetensors.torch import save_file

    net, (x, _) = _net(), _data()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    np.save(tmp_path / "x.npy", x.numpy())
    script = tmp_path / "run.py"
    script.write_text(
        _KILLED_RUN.format(
            root=str(Path(__file__).parent),
            weights=str(tmp_path / "w.safetensors"),
            xs=str(tmp_path / "x.npy"),
            bank=str(tmp_path / "b"),
        )
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    proc = subprocess.run(
        [sys.executable, str(script), mode], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["n"] for s in manifest["shards"]] == [10, 10] and not manifest["complete"]
    leftovers = sorted(p.name for p in (tmp_path / "b").iterdir())
    if mode == "write":
        assert any(n.startswith(".tmp-") for n in leftovers)  # the half-written file
    else:
        assert not any(n.startswith(".tmp-") for n in leftovers)

    ref = extract(net, x, LAYERS, batch_size=4, progress=False)
    bank = extract(net, x, LAYERS, path=tmp_path / "b", batch_size=4, progress=False)
    _assert_banks_equal(ref, bank)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "b").iterdir())
    ActivationBank.load(tmp_path / "b", verify=True)


def test_resume_refuses_a_different_extraction(tmp_path):
    net, (x, _) = _net(), _data()
    extract(net, x, LAYERS, path=tmp_path / "b", progress=False)
    with pytest.raises(BankError, match="layers.*resume=False"):
        extract(net, x, ["2"], path=tmp_path / "b", progress=False)
    with pytest.raises(BankError, match="pool"):
        extract(net, x, LAYERS, pool="avg", path=tmp_path / "b", progress=False)
    other = _net()
    with torch.no_grad():
        other[3].weight[0, 0, 0, 0] += 0.5
    with pytest.raises(BankError, match="another model"):
        extract(other, x, LAYERS, path=tmp_path / "b", progress=False)
    with pytest.raises(BankError, match="samples"):
        extract(net, x[:30], LAYERS, path=tmp_path / "b", progress=False)
    fresh = extract(other, x, ["2"], path=tmp_path / "b", resume=False, progress=False)
    assert fresh.layers == ["2"]
    assert torch.equal(fresh.activations("2"), _reference(other, x)["2"])


# --------------------------------------------------------------------------- damage


@pytest.fixture()
def saved_bank(tmp_path) -> Path:
    net, (x, y) = _net(), _data()
    extract(net, TensorDataset(x, y), LAYERS, path=tmp_path / "b", shard_size=16, progress=False)
    return tmp_path / "b"


def test_truncated_shard(saved_bank):
    f = saved_bank / "s00001-act1.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-7])
    with pytest.raises(BankError, match=r"s00001-act1\.npy.*truncated"):
        ActivationBank.load(saved_bank)


def test_corrupt_shard_header(saved_bank):
    f = saved_bank / "s00000-logits.npy"
    data = bytearray(f.read_bytes())
    data[:6] = b"garbag"
    f.write_bytes(bytes(data))
    with pytest.raises(BankError, match=r"s00000-logits\.npy.*corrupt"):
        ActivationBank.load(saved_bank)


def test_wrong_shape_in_shard(saved_bank):
    np.save(saved_bank / "s00002-labels.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(BankError, match=r"s00002-labels\.npy"):
        ActivationBank.load(saved_bank)


def test_missing_shard(saved_bank):
    (saved_bank / "s00002-act0.npy").unlink()
    with pytest.raises(BankError, match=r"s00002-act0\.npy.*missing"):
        ActivationBank.load(saved_bank)


def test_flipped_data_byte_found_by_verify(saved_bank):
    f = saved_bank / "s00000-act2.npy"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    ActivationBank.load(saved_bank)  # sizes and headers are fine ...
    with pytest.raises(BankError, match=r"s00000-act2\.npy.*CRC"):
        ActivationBank.load(saved_bank, verify=True)  # ... the checksum is not


@pytest.mark.parametrize("damage", ["truncated", "not json", "wrong count", "no manifest"])
def test_corrupt_manifest(saved_bank, damage):
    f = saved_bank / "manifest.json"
    text = f.read_text()
    if damage == "truncated":
        f.write_text(text[: len(text) // 2])
    elif damage == "not json":
        f.write_text("hello")
    elif damage == "wrong count":
        m = json.loads(text)
        m["num_samples"] += 1
        f.write_text(json.dumps(m))
    else:
        f.unlink()
    with pytest.raises(BankError, match="manifest.json"):
        ActivationBank.load(saved_bank)


# --------------------------------------------------------------------------- failed writes


def test_failed_first_write_leaves_no_manifest(tmp_path, monkeypatch):
    net, (x, _) = _net(), _data()

    def broken_replace(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(BankError):
        extract(net, x, LAYERS, path=tmp_path / "b", shard_size=10, progress=False)
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()  # no manifest, no temporary file, no folder


def test_failed_shard_write_keeps_finished_shards(tmp_path, monkeypatch):
    net, (x, _) = _net(), _data()
    real = np.lib.format.write_array
    calls = [0]

    def full_disk(f, arr, **kw):
        calls[0] += 1
        if calls[0] == 6 + 2:  # the second file of shard 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, arr, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", full_disk)
    with pytest.raises(BankError, match="disk space"):
        extract(net, x, LAYERS, path=tmp_path / "b", shard_size=10, progress=False)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [s["n"] for s in manifest["shards"]] == [10] and not manifest["complete"]
    assert not any(n.startswith(".tmp-") for n in os.listdir(tmp_path / "b"))
    bank = extract(net, x, LAYERS, path=tmp_path / "b", progress=False)
    _assert_banks_equal(extract(net, x, LAYERS, progress=False), bank)


def test_failed_manifest_update_keeps_previous_manifest(tmp_path, monkeypatch):
    net, (x, _) = _net(), _data()
    real = os.replace
    calls = [0]

    def flaky(src, dst):
        calls[0] += 1
        if str(dst).endswith("manifest.json") and calls[0] > 10:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(BankError, match="manifest"):
        extract(net, x, LAYERS, path=tmp_path / "b", shard_size=10, progress=False)
    monkeypatch.undo()
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())  # still valid JSON
    assert not manifest["complete"]
    bank = extract(net, x, LAYERS, path=tmp_path / "b", progress=False)
    _assert_banks_equal(extract(net, x, LAYERS, progress=False), bank)


# --------------------------------------------------------------------------- bounded memory


def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs) on this system")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no VmHWM in /proc/self/status")


def test_iter_batches_memory_is_bounded(tmp_path):
    import gc

    n, d = 4000, 8000  # 128 MB of float32 activations, shards of 3.2 MB, batches of 1 MB
    acts = torch.from_numpy(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32))
    ActivationBank.from_tensors({"z": acts}).save(tmp_path / "big", shard_size=100)
    first, last = acts[:32].clone(), acts[-1].clone()
    del acts
    gc.collect()
    bank = ActivationBank.load(tmp_path / "big")
    bank_bytes = n * d * 4

    _peak_rss_reset()
    base = _peak_rss()
    total, seen = 0.0, 0
    for k, batch in enumerate(bank.iter_batches("z", 32)):
        if k == 0:
            assert torch.equal(batch, first)
        total += float(batch[:, 0].sum())
        seen += batch.shape[0]
    assert seen == n and torch.equal(batch[-1], last)
    streamed = _peak_rss() - base
    # a shard mapped, a batch and the allocator's slack; nothing that grows with the bank
    assert streamed < bank_bytes / 5, f"iter_batches peaked at {streamed / 1e6:.1f} MB"

    # the measurement sees a full load: it is not blind
    _peak_rss_reset()
    base = _peak_rss()
    full = bank.activations("z")
    loaded = _peak_rss() - base
    del full
    assert loaded > 0.9 * bank_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extract_on_cuda_matches_cpu(tmp_path):
    net, (x, y) = _net(), _data()
    cpu = extract(net, TensorDataset(x, y), LAYERS, pool="avg", progress=False)
    gpu_net = copy.deepcopy(net).cuda()
    with pytest.raises(InputError, match="model.to"):
        extract(net, x, LAYERS, device="cuda", progress=False)
    gpu = extract(
        gpu_net,
        TensorDataset(x, y),
        LAYERS,
        pool="avg",
        device="cuda",
        path=tmp_path / "g",
        progress=False,
    )
    for name in LAYERS:
        torch.testing.assert_close(
            gpu.activations(name), cpu.activations(name), rtol=1e-4, atol=1e-5
        )
    assert torch.equal(gpu.labels, cpu.labels)


def test_memory_collector_preallocates_and_falls_back():
    from xnn_toolkit.bank.extraction import _MemoryCollector

    a = torch.arange(18.0).reshape(9, 2)
    for total, chunks in ((9, [4, 5]), (5, [3, 4, 2]), (12, [4, 5]), (None, [9])):
        col = _MemoryCollector(total)
        at = 0
        for n in chunks:
            col.add({"a": a[at : at + n]}, at)
            at += n
        assert torch.equal(col.result(at)["a"], a), total
