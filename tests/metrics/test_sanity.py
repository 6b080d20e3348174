import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import cascading_randomization, pearson_correlation, spearman_correlation


def test_spearman_and_pearson_equal_scipy_numpy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (6, 7, 8), generator=g).double()
    b = a + torch.randint(0, 4, (6, 7, 8), generator=g).double()
    s = spearman_correlation(a, b)
    p = pearson_correlation(a, b)
    for m in range(6):
        assert s[m].item() == pytest.approx(
            spearmanr(a[m].ravel(), b[m].ravel()).statistic, abs=1e-12
        )
        assert p[m].item() == pytest.approx(
            np.corrcoef(a[m].ravel(), b[m].ravel())[0, 1], abs=1e-12
        )
    const = torch.zeros(1, 7, 8)
    assert spearman_correlation(const, b[:1]).item() == 0.0
    assert spearman_correlation(b[:1], b[:1]).item() == pytest.approx(1.0)
    with pytest.raises(InputError, match="same shape"):
        spearman_correlation(a, b[:, :3])


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        a = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.fc(a.mean((2, 3)))


def _saliency(model, x):
    x = x.clone().requires_grad_(True)
    model(x)[:, 0].sum().backward()
    return x.grad.abs().sum(1)


def test_cascading_randomization_equals_manual_procedure_and_leaves_model():
    torch.manual_seed(0)
    model = _Net().train()
    x = torch.randn(3, 3, 10, 10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    res = cascading_randomization(model, x, _saliency, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert res.layers == ["fc", "conv2", "bn", "conv1"]
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the documented procedure, by hand: reset_parameters under seed + i, cumulatively
    work = copy.deepcopy(model).eval()
    orig = _saliency(work, x)
    torch.testing.assert_close(res.original, orig)
    for i, name in enumerate(res.layers):
        torch.manual_seed(5 + i)
        getattr(work, name).reset_parameters()
        maps = _saliency(work, x)
        for m in range(3):
            ref = spearmanr(orig[m].ravel().numpy(), maps[m].ravel().numpy()).statistic
            assert res.spearman[i, m].item() == pytest.approx(ref, abs=1e-6)
    assert res.spearman[-1].mean() < res.spearman[0].mean()  # the maps drift away
    again = cascading_randomization(model, x, _saliency, seed=5)
    torch.testing.assert_close(again.spearman, res.spearman)


def test_weight_independent_explanation_fails_the_check():
    model = _Net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    res = cascading_randomization(model, x, lambda m, inp: inp.sum(1), keep_maps=True)
    torch.testing.assert_close(res.spearman, torch.ones(4, 2, dtype=torch.float64))
    assert res.maps.shape == (4, 2, 8, 8)


def test_independent_randomization_and_layer_choice():
    model = _Net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    res = cascading_randomization(
        model, x, _saliency, layers=["conv2", model.conv1], cascade=False, absolute=True
    )
    assert res.layers == ["conv2", "conv1"]
    work = copy.deepcopy(model).eval()
    torch.manual_seed(1)
    work.conv1.reset_parameters()
    maps = _saliency(work, x)
    ref = spearmanr(res.original[0].ravel().numpy(), maps[0].ravel().numpy()).statistic
    assert res.spearman[1, 0].item() == pytest.approx(ref, abs=1e-6)
    with pytest.raises(InputError, match="N x H x W"):
        cascading_randomization(model, x, lambda m, inp: inp)
