"""The README's section 'With Quantus, Captum and pytorch-grad-cam' runs as written."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_interop_example_runs():
    pytest.importorskip("quantus")
    pytest.importorskip("pytorch_grad_cam")
    text = README.read_text(encoding="utf-8")
    section = text.split("## With Quantus, Captum and pytorch-grad-cam", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    torch.manual_seed(0)
    scope: dict = {"__name__": "readme_interop"}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - our own README
    assert scope["scorecam"].shape == (4, 64, 64) and torch.isfinite(scope["scorecam"]).all()
    assert np.isfinite(np.asarray(scope["sparseness"])).all()
    assert scope["maps"].shape == scope["x"].shape
    assert torch.isfinite(scope["infid"]).all() and torch.isfinite(scope["sens"]).all()
