import pytest
import torch

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import f_cls, f_reg

from .literal import f_cls_literal, f_reg_literal


def _data(seed=0, m=50, c=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, c, generator=g, dtype=torch.float64) * 2
    y_bar = logits + torch.randn(m, c, generator=g, dtype=torch.float64) * 1.5
    return logits, y_bar


def test_f_reg_equals_literal_single_and_per_head():
    logits, y_bar = _data()
    assert f_reg(y_bar[:, 2], logits[:, 2]).item() == pytest.approx(
        f_reg_literal(y_bar[:, 2], logits[:, 2])
    )
    per_head = f_reg(y_bar, logits)
    assert per_head.shape == (6,)
    for c in range(6):
        assert per_head[c].item() == pytest.approx(f_reg_literal(y_bar[:, c], logits[:, c]))
    torch.testing.assert_close(f_reg(y_bar, logits, reduction="none").mean(0), per_head)
    assert f_reg(logits, logits).abs().sum() == 0


def test_f_cls_equals_literal_for_every_head_and_single_class():
    logits, y_bar = _data(1)
    per_head = f_cls(y_bar, logits)
    for c in range(6):
        assert per_head[c].item() == pytest.approx(f_cls_literal(y_bar[:, c], logits, c))
        assert f_cls(y_bar[:, c], logits, classes=c).item() == pytest.approx(per_head[c].item())
    assert 0.3 < per_head.mean() < 1.0  # the noise changes some predictions
    sub = f_cls(y_bar[:, [4, 1]], logits, classes=[4, 1])
    torch.testing.assert_close(sub, per_head[[4, 1]])
    # a perfect head keeps every prediction
    assert torch.all(f_cls(logits, logits) == 1)


def test_f_cls_per_example_classes_and_ties():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]])
    # row 0 explains class 1: 2.0 ties with class 2 -> first max is class 1 -> unchanged
    # row 1 explains class 0: 5.0 ties with class 2 -> first max becomes class 0 -> changed
    out = f_cls(torch.tensor([2.0, 5.0]), logits, classes=torch.tensor([1, 0]), reduction="none")
    assert out.tolist() == [True, False]


def test_faithfulness_errors():
    logits, y_bar = _data()
    with pytest.raises(InputError, match="same shape"):
        f_reg(y_bar[:, :2], logits)
    with pytest.raises(InputError, match="classes=<the class index>"):
        f_cls(y_bar[:, 0], logits)
    with pytest.raises(InputError, match="pass classes"):
        f_cls(y_bar[:, :3], logits)
    with pytest.raises(InputError, match=r"\[0, 5\]"):
        f_cls(y_bar[:, 0], logits, classes=9)
    with pytest.raises(InputError, match="reduction"):
        f_reg(y_bar, logits, reduction="sum")
