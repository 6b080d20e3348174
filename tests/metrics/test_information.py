import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import (
    CovarianceAccumulator,
    gaussian_total_correlation,
    mutual_information_score,
)


def _tc_literal(x):
    """−½ log det(Σ₀⁻¹ Σ) with numpy, straight from the formula."""
    sigma = np.cov(np.asarray(x, dtype=np.float64).T)
    sigma0_inv = np.diag(1.0 / np.diag(sigma))
    return -0.5 * math.log(np.linalg.det(sigma0_inv @ sigma))


def test_total_correlation_equals_literal_and_streams():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 2, generator=g, dtype=torch.float64)
    x = torch.cat(
        [z, z[:, :1] * 0.8 + 0.3 * torch.randn(500, 1, generator=g, dtype=torch.float64)], 1
    )
    tc = gaussian_total_correlation(x)
    assert tc == pytest.approx(_tc_literal(x.numpy()), abs=1e-9)
    assert tc > 0.3
    acc = CovarianceAccumulator()
    for a in range(0, 500, 64):
        acc.update(x[a : a + 64])
    assert gaussian_total_correlation(acc) == pytest.approx(tc, abs=1e-9)


def test_total_correlation_of_a_known_gaussian():
    # bivariate Gaussian with correlation rho: TC = I(X; Y) = −½ log(1 − rho²)
    rho = 0.6
    cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64)
    acc = CovarianceAccumulator()
    acc.count_, acc.mean_, acc.comoment_ = 2, torch.zeros(2, dtype=torch.float64), cov
    assert gaussian_total_correlation(acc) == pytest.approx(-0.5 * math.log(1 - rho**2))


def test_total_correlation_conv_maps_and_log():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) + 0.1
    samples = np.log(a.permute(0, 2, 3, 1).reshape(-1, 3).numpy() + 1e-3)
    assert gaussian_total_correlation(a, log_eps=1e-3) == pytest.approx(
        _tc_literal(samples), abs=1e-9
    )
    with pytest.raises(InputError, match="log"):
        gaussian_total_correlation(a - 1, log_eps=1e-3)


def test_mutual_information_score_equals_sklearn_on_binned_values():
    g = torch.Generator().manual_seed(2)
    n, k, c, bins = 300, 4, 3, 8
    y = torch.randint(0, c, (n,), generator=g)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    a[:, 0] += 3 * (y == 1)  # channel 0 carries class 1
    res = mutual_information_score(a, y, num_classes=c, bins=bins)
    for ch in range(k):
        v = a[:, ch].numpy()
        edges = np.linspace(v.min(), v.max(), bins + 1)
        binned = np.clip(np.digitize(v, edges[1:-1]), 0, bins - 1)
        for cls in range(c):
            ref = mutual_info_score((y.numpy() == cls).astype(int), binned)
            assert res.per_class[ch, cls].item() == pytest.approx(ref, abs=1e-10)
    assert res.best_class[0] == 1
    assert res.per_channel[0] == res.per_class[0].max()
    assert res.mean == pytest.approx(float(res.per_channel.mean()))
    # pooled conv maps: the spatial mean is taken
    maps = a[:, :, None, None].expand(n, k, 2, 2)
    torch.testing.assert_close(
        mutual_information_score(maps, y, c, bins=bins).per_class, res.per_class
    )


def test_mutual_information_bad_estimator_and_bins():
    a, y = torch.rand(20, 3), torch.arange(20) % 2
    with pytest.raises(InputError, match="estimator must be one of"):
        mutual_information_score(a, y, 2, estimator="kde")
    with pytest.raises(InputError, match="bins must be an int >= 2"):
        mutual_information_score(a, y, 2, bins=1)
