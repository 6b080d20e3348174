"""Atomic writes and the safetensors + JSON estimator files (xnn_toolkit._io)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from xnn_toolkit._io import atomic_write, load_estimator_files, save_estimator_files
from xnn_toolkit.errors import AssetError


def test_estimator_files_round_trip(tmp_path):
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "classes": torch.tensor([3, 1])}
    meta = {"type": "Thing", "params": {"a": 1}}
    save_estimator_files(tmp_path / "head", tensors, meta)
    assert sorted(os.listdir(tmp_path)) == ["head.json", "head.safetensors"]
    got_meta, got = load_estimator_files(tmp_path / "head", "Thing", "the thing")
    assert got_meta == meta
    assert torch.equal(got["w"], tensors["w"]) and torch.equal(got["classes"], tensors["classes"])


def test_estimator_files_refuse_other_type_and_missing_files(tmp_path):
    save_estimator_files(tmp_path / "head", {"w": torch.zeros(1)}, {"type": "Other"})
    with pytest.raises(AssetError, match="does not describe Thing; it is not the thing"):
        load_estimator_files(tmp_path / "head", "Thing", "the thing")
    (tmp_path / "list.json").write_text(json.dumps([1, 2]))
    save_estimator_files(tmp_path / "x", {"w": torch.zeros(1)}, {"type": "Thing"})
    os.replace(tmp_path / "x.safetensors", tmp_path / "list.safetensors")
    with pytest.raises(AssetError, match="does not describe Thing"):
        load_estimator_files(tmp_path / "list", "Thing", "the thing")
    with pytest.raises(AssetError, match="could not read the thing saved at"):
        load_estimator_files(tmp_path / "absent", "Thing", "the thing")


def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
