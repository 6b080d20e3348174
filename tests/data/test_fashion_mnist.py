"""Fashion-MNIST idx reader, file search and dataset.

Oracles: hand-written idx bytes with known content, and torchvision's own idx parser
(``read_sn3_pascalvincent_tensor``) on the real bundled files.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from xnn_toolkit.data import fashion_mnist as fm
from xnn_toolkit.errors import AssetError, InputError

BUNDLED = fm.BUNDLED_DIR


def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Literal idx encoding: 0, 0, type, ndim, big-endian uint32 sizes, big-endian data."""
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[code]
    return head + arr.astype(dt).tobytes()


def _write_split(
    folder: Path, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = True
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pre = {"train": "train", "test": "t10k"}[split]
    for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
        name = f"{pre}-{kind}-idx{nd}-ubyte"
        data = _idx_bytes(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)


def _toy(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % 10


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_hand_made(tmp_path, gz):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    data = _idx_bytes(arr)
    assert data[:4] == b"\x00\x00\x08\x03"  # magic 2051, as in the Fashion-MNIST files
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = fm.read_idx(path, ndim=3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    assert np.array_equal(out, arr)


def test_read_idx_multibyte_big_endian(tmp_path):
    arr = np.array([[1, -2, 300], [-32768, 32767, 0]], dtype=np.int16)
    (tmp_path / "s").write_bytes(_idx_bytes(arr, 0x0B))
    out = fm.read_idx(tmp_path / "s")
    assert out.dtype == np.int16 and np.array_equal(out, arr)
    farr = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    (tmp_path / "f").write_bytes(_idx_bytes(farr, 0x0D))
    assert np.array_equal(fm.read_idx(tmp_path / "f"), farr)


def test_read_idx_errors_name_the_file(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good = _idx_bytes(arr)
    cases = {
        "badmagic": b"\x01\x02\x08\x03" + good[4:],
        "badtype": b"\x00\x00\x07\x03" + good[4:],
        "truncdata": good[:-3],
        "trunchead": good[:9],
        "padded": good + b"\x00",
        "empty": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(AssetError, match=re.escape(str(tmp_path / name))):
            fm.read_idx(tmp_path / name)
    with pytest.raises(AssetError, match="dimensions, expected 1"):
        (tmp_path / "ok").write_bytes(good)
        fm.read_idx(tmp_path / "ok", ndim=1)
    # A gzip stream cut short, and one with a flipped byte inside (CRC / zlib error).
    gz = gzip.compress(good * 50)
    (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
    with pytest.raises(AssetError, match="cut.gz.*(corrupt|truncated)"):
        fm.read_idx(tmp_path / "cut.gz")
    bad = bytearray(gz)
    bad[len(bad) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(bad))
    with pytest.raises(AssetError, match="flip.gz"):
        fm.read_idx(tmp_path / "flip.gz")
    with pytest.raises(AssetError, match="does not exist"):
        fm.read_idx(tmp_path / "nope")


def test_bundled_matches_torchvision_parser(tmp_path):
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    ds = fm.FashionMNIST(BUNDLED, split="test")
    assert len(ds) == 10000 and ds.root == BUNDLED
    for kind, ours in (("images-idx3", ds.data), ("labels-idx1", ds.targets)):
        raw = tmp_path / f"t10k-{kind}-ubyte"
        with gzip.open(BUNDLED / f"t10k-{kind}-ubyte.gz", "rb") as f:
            raw.write_bytes(f.read())
        ref = read_sn3_pascalvincent_tensor(str(raw))
        assert torch.equal(ours, ref.to(ours.dtype))
    assert torch.equal(torch.bincount(ds.targets), torch.full((10,), 1000))


def test_dataset_items_and_transform():
    ds = fm.FashionMNIST(BUNDLED, split="test", transform=lambda x: x * 2)
    img, label = ds[3]
    assert img.shape == (1, 28, 28) and img.dtype == torch.float32
    assert label == int(ds.targets[3]) and isinstance(label, int)
    assert torch.allclose(img, ds.data[3].float()[None] / 255 * 2)
    plain = fm.FashionMNIST(BUNDLED, split="test")
    x, _ = plain[0]
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5
    assert plain.classes[9] == "Ankle boot" and len(plain.classes) == 10


def test_bundled_sha256_matches_readme():
    readme = (BUNDLED / "README.md").read_text()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        digest = hashlib.sha256((BUNDLED / name).read_bytes()).hexdigest()
        assert digest in readme, name
    assert "MIT" in (BUNDLED / "LICENSE").read_text()


def test_mean_std_constants_match_train_set():
    if fm._split_files(fm.SYSTEM_DIR, "train") is None:
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    x = fm.FashionMNIST(split="train").data.float() / 255
    assert abs(x.mean().item() - fm.MEAN[0]) < 1e-4
    assert abs(x.std().item() - fm.STD[0]) < 1e-4


def test_find_plain_and_torchvision_roots(tmp_path):
    images, labels = _toy()
    _write_split(tmp_path / "plain", "test", images, labels, gz=False)
    _write_split(tmp_path / "tv" / "FashionMNIST" / "raw", "train", images, labels)
    assert fm.find_fashion_mnist(tmp_path / "plain") == tmp_path / "plain"
    assert fm.find_fashion_mnist(tmp_path / "tv") == tmp_path / "tv" / "FashionMNIST" / "raw"
    ds = fm.FashionMNIST(tmp_path / "tv", split="train")
    assert torch.equal(ds.data, torch.from_numpy(images))
    assert ds.targets.tolist() == labels.tolist()
    with pytest.raises(AssetError, match="searched .*plain"):
        fm.FashionMNIST(tmp_path / "plain", split="train")
    with pytest.raises(InputError, match="split"):
        fm.FashionMNIST(tmp_path / "plain", split="val")


def test_only_bundled_test_set_train_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    assert fm.find_fashion_mnist() == BUNDLED
    assert len(fm.FashionMNIST(split="test")) == 10000
    with pytest.raises(AssetError) as info:
        fm.FashionMNIST(split="train")
    msg = str(info.value)
    assert "only the test split" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "root=" in msg


def test_mismatched_or_bad_labels(tmp_path):
    images, labels = _toy(5)
    _write_split(tmp_path, "test", images, labels[:4])
    with pytest.raises(AssetError, match="4 uint8 labels for 5 images"):
        fm.FashionMNIST(tmp_path, split="test")
    labels = labels.copy()
    labels[2] = 12
    _write_split(tmp_path, "test", images, labels)
    with pytest.raises(AssetError, match="label 12"):
        fm.FashionMNIST(tmp_path, split="test")
    _write_split(tmp_path, "test", images[:, :20], labels)
    with pytest.raises(AssetError, match="28 x 28"):
        fm.FashionMNIST(tmp_path, split="test")


def test_truncated_bundled_copy_is_asset_error(tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(BUNDLED / name, tmp_path / name)
    data = (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(data[: len(data) - 1000])
    with pytest.raises(AssetError, match="t10k-images-idx3-ubyte.gz"):
        fm.FashionMNIST(tmp_path, split="test")


def test_assets_env_var_moves_the_bundled_copy(tmp_path, monkeypatch):
    images, labels = _toy(3)
    _write_split(tmp_path / "fashion_mnist", "test", images, labels)
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "absent")
    monkeypatch.setenv("XNN_TOOLKIT_ASSETS", str(tmp_path))
    assert fm.find_fashion_mnist() == tmp_path / "fashion_mnist"
    assert len(fm.FashionMNIST(split="test")) == 3
