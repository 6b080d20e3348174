"""The ``xnn`` command: help, models, data, extract, demo and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xnn_toolkit.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "explain", "models", "data", "extract"):
        assert cmd in out


def test_models_lists_bundled_cards(capsys):
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in cards}
    assert {"vgg_fmnist", "vgg_synth"} <= names
    for c in cards:
        assert 0 < c["test_accuracy"] <= 1


def test_data_writes_annotated_samples(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["data", "--n", "6", "--out", str(out)]) == 0
    assert (out / "samples.png").stat().st_size > 1000
    assert (out / "samples.pdf").read_bytes()[:5] == b"%PDF-"


def test_refusals_leave_nothing(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert os.listdir(out) == ["keep"]
    f = tmp_path / "file"
    f.write_text("")
    assert main(["data", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["data", "--dataset", "nonsense", "--out", str(tmp_path / "n")]) == 2
    assert "unknown dataset spec" in capsys.readouterr().err
    assert main(["explain", "--model", "timm:no_such_net", "--out", str(tmp_path / "e")]) == 2
    assert "no_such_net" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_extract_writes_a_bank(tmp_path, capsys):
    from xnn_toolkit.features import ActivationBank

    out = tmp_path / "bank"
    args = ["extract", "--model", "bundled:vgg_fmnist", "--dataset", "fashion-mnist",
            "--layer", "fc6", "--n", "40", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    bank = ActivationBank.load(out)
    assert len(bank) == 40 and bank.layers == ["fc6"]
    assert bank.logits.shape == (40, 10)


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "xnn")
    res = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "vgg_fmnist" in res.stdout
