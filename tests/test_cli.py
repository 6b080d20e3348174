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
    for cmd in ("demo", "explain", "models", "data", "extract", "figures"):
        assert cmd in out


def test_models_lists_bundled_cards(capsys):
    assert main(["models", "--json"]) == 0
    cards = json.loads(capsys.readouterr().out)
    names = {c["name"] for c in cards}
    assert {"vgg_fmnist", "vgg_synth", "efficientnet_lite0"} <= names
    for c in cards:
        if c.get("weights_package"):  # pretrained elsewhere: no test accuracy of ours
            assert c["test_accuracy"] is None and c["dataset"] == "ImageNet-1k"
        else:
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
    from xnn_toolkit.bank import ActivationBank

    out = tmp_path / "bank"
    args = [
        "extract",
        "--model",
        "bundled:vgg_fmnist",
        "--dataset",
        "fashion-mnist",
        "--layer",
        "fc6",
        "--n",
        "40",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    bank = ActivationBank.load(out)
    assert len(bank) == 40 and bank.layers == ["fc6"]
    assert bank.logits.shape == (40, 10)


def test_console_script_runs():
    exe = os.path.join(os.path.dirname(sys.executable), "xnn")
    res = subprocess.run([exe, "models"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "vgg_fmnist" in res.stdout


def _unwritable(tmp_path):
    """A folder nothing can be created in, also for root (who ignores permission bits)."""
    if os.geteuid() == 0:
        return "/proc/xnn-no-such-folder"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return str(ro)


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    bad = os.path.join(_unwritable(tmp_path), "out")
    for cmd in (
        ["demo", "--no-progress"],
        ["explain", "--model", "bundled:vgg_fmnist"],
        ["figures", "--model", "bundled:vgg_fmnist"],
        ["data"],
    ):
        assert main([*cmd, "--out", bad]) == 2, cmd
        assert "not writable" in capsys.readouterr().err, cmd
    assert not os.path.exists(bad)
    inside_file = tmp_path / "file"
    inside_file.write_text("x")
    assert (
        main(["figures", "--model", "bundled:vgg_fmnist", "--out", str(inside_file / "out")]) == 2
    )
    assert "not a folder" in capsys.readouterr().err


def test_figures_refusals_leave_nothing(tmp_path, capsys):
    base = [
        "figures",
        "--model",
        "bundled:vgg_fmnist",
        "--dataset",
        "fashion-mnist",
        "--no-progress",
    ]
    out = tmp_path / "f"
    cases = [
        (["--methods", "cmwp,gradcm"], "unknown attribution method 'gradcm'; did you mean"),
        (["--methods", "activmap"], "maps one filter"),
        (["--formats", "png,gif"], "unknown figure formats ['gif']"),
        (["--target", "Trousr"], "did you mean: Trouser"),
        (["--target", "12"], "out of range"),
        (["--layer", "features.99"], "features.99"),
        (["--n", "0"], "n must be an integer >= 1"),
    ]
    for extra, message in cases:
        assert main([*base, *extra, "--out", str(out)]) == 2, extra
        assert message in capsys.readouterr().err, extra
        assert not out.exists(), extra
    out.mkdir()
    (out / "keep").write_text("x")
    assert main([*base, "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert os.listdir(out) == ["keep"]


def test_explain_refuses_unknown_names_before_any_work(tmp_path, capsys):
    out = tmp_path / "e"
    base = ["explain", "--model", "bundled:vgg_fmnist", "--out", str(out), "--no-progress"]
    for extra, message in (
        (["--methods", "cmwp,gradcm"], "unknown attribution method 'gradcm'"),
        (["--kinds", "srae,vae"], "unknown XNN kinds ['vae']"),
        (["--stages", "xnn,heatmap"], "did you mean: heatmaps"),
    ):
        assert main([*base, *extra]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not out.exists()


def test_figures_writes_grid_and_xnn_layout(tmp_path, capsys):
    out = tmp_path / "figs"
    args = [
        "figures",
        "--model",
        "bundled:vgg_fmnist",
        "--dataset",
        "fashion-mnist",
        "--methods",
        "cmwp,gradcam",
        "--target",
        "predicted",
        "--n",
        "3",
        "--xnn",
        "--n-train",
        "150",
        "--n-features",
        "3",
        "--dpi",
        "60",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    for stem in ("heatmaps", "xnn_layout"):
        assert (out / "figures" / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (out / "figures" / f"{stem}.svg").read_bytes()[:2000]
        assert (out / "figures" / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert str(out / "figures" / f"{stem}.pdf") in printed
    page = (out / "index.html").read_text()
    assert "figures/heatmaps.svg" in page and "figures/xnn_layout.pdf" in page
    rows = json.loads((out / "tables" / "images.json").read_text())
    assert len(rows) == 3 and all(r["explained class"] == r["predicted"] for r in rows)
    # a second run needs --overwrite, and then replaces the folder whole
    (out / "stray.txt").write_text("x")
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "stray.txt").exists() and (out / "figures" / "heatmaps.pdf").exists()


def test_explain_takes_weights_and_names_a_file_that_does_not_fit(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    save_file({"fc6.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    argv = [
        "explain",
        "--model",
        "bundled:vgg_synth",
        "--weights",
        str(tmp_path / "w.safetensors"),
        "--quick",
        "--out",
        str(tmp_path / "r"),
        "--no-progress",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "w.safetensors" in err and "missing" in err and "unexpected: fc6.weight" in err
    assert not (tmp_path / "r").exists()


def _thp_mode() -> str | None:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


_THP_SCRIPT = """
import resource
import xnn_toolkit.cli as cli

cli._cpu_allocator_defaults()  # what the xnn command does first
import torch

r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = torch.ones(16 * 2**20)  # 64 MiB, as large activations are
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(_thp_mode() in (None, "never"), reason="no transparent huge pages here")
def test_the_xnn_command_backs_large_cpu_buffers_with_huge_pages():
    def faults(**env):
        full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        res = subprocess.run(
            [sys.executable, "-c", _THP_SCRIPT],
            capture_output=True,
            text=True,
            env={**full, **env},
            timeout=120,
            check=True,
        )
        return int(res.stdout.split()[-1])

    pages = 5 * 64 * 2**20 // 4096  # one fault per 4 KiB page without huge pages
    on = faults()
    assert on < pages / 3, on  # one fault per 2 MiB (and some 4 KiB ones)
    if _thp_mode() == "madvise":  # with "always" the kernel uses huge pages anyway
        assert faults(THP_MEM_ALLOC_ENABLE="0") > pages / 2  # the user's choice is kept


def test_console_main_sets_the_allocator_before_main_and_keeps_a_users_value(monkeypatch):
    import xnn_toolkit.cli as cli

    seen = []
    monkeypatch.setattr(
        cli, "main", lambda: seen.append(os.environ.get("THP_MEM_ALLOC_ENABLE")) or 0
    )
    for preset, want in ((None, "1"), ("0", "0")):
        if preset is None:
            monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
        else:
            monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", preset)
        with pytest.raises(SystemExit) as done:
            cli.console_main()
        assert done.value.code == 0 and seen[-1] == want
