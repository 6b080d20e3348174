"""The README's Python tour runs as written (with fewer images, to keep the suite lean)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "the README has no Python tour"
    return blocks[0]


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
