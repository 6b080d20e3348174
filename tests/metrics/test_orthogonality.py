import math

import numpy as np
import pytest
import torch

from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import (
    CovarianceAccumulator,
    OrthogonalityAccumulator,
    orthogonality,
    orthogonality_scores,
)

from .literal import orthogonality_literal


def test_orthogonality_equals_literal_numpy():
    g = torch.Generator().manual_seed(0)
    base = torch.rand(12, 1, 9, 8, generator=g, dtype=torch.float64)
    maps = torch.rand(12, 4, 9, 8, generator=g, dtype=torch.float64) + 0.7 * base  # correlated
    res = orthogonality(maps)
    o1, o2 = orthogonality_literal(maps.numpy())
    assert res.o1 == pytest.approx(o1, abs=1e-9)
    assert res.o2 == pytest.approx(o2, abs=1e-9)
    assert res.o1 > 0.1 and res.o2 > 0.1


def test_streaming_equals_one_shot():
    g = torch.Generator().manual_seed(1)
    maps = (
        torch.rand(30, 3, 6, 6, generator=g) * torch.tensor([1.0, 5.0, 0.01]).view(1, 3, 1, 1) + 100
    )
    one = orthogonality(maps)
    acc = OrthogonalityAccumulator()
    for a in range(0, 30, 7):
        acc.update(maps[a : a + 7])
    res = acc.result()
    torch.testing.assert_close(res.correlation, one.correlation, atol=1e-10, rtol=0)
    assert res.o1 == pytest.approx(one.o1, abs=1e-9) and res.o2 == pytest.approx(one.o2, abs=1e-9)
    cov = CovarianceAccumulator()
    flat = maps.permute(0, 2, 3, 1).reshape(-1, 3).double()
    for a in range(0, flat.shape[0], 101):
        cov.update(flat[a : a + 101])
    torch.testing.assert_close(
        cov.covariance(), torch.tensor(np.cov(flat.numpy().T)), atol=1e-9, rtol=1e-9
    )


def test_hand_cases_identity_and_duplicates():
    assert orthogonality_scores(torch.eye(5)).o1 == pytest.approx(0.0, abs=1e-12)
    assert orthogonality_scores(torch.eye(5)).o2 == pytest.approx(0.0, abs=1e-12)
    # disjoint supports with equal masses: correlation -1/(n-1) off the diagonal, by hand
    maps = torch.zeros(1, 2, 2, 2)
    maps[0, 0, 0, 0] = 1.0
    maps[0, 1, 1, 1] = 1.0
    res = orthogonality(maps)
    rho = -1 / 3  # cov = -1/16 / (n-1), var = 3/16 / (n-1)
    assert res.correlation[0, 1].item() == pytest.approx(rho)
    assert res.o1 == pytest.approx(math.sqrt(2 + 2 * rho**2) - math.sqrt(2))
    assert res.o2 == pytest.approx(-math.log(1 - rho**2))
    dup = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0)).repeat(1, 2, 1, 1)
    res = orthogonality(dup)
    assert res.o1 == pytest.approx(2 - math.sqrt(2))  # ||[[1,1],[1,1]]||_F = 2
    assert res.o2 > 20  # singular: +inf or the huge value of a rounding-level determinant


def test_all_zero_feature_is_neutral_and_warns():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(6, 3, 5, 5, generator=g, dtype=torch.float64)
    with_dead = torch.cat([maps, torch.zeros(6, 1, 5, 5, dtype=torch.float64)], 1)
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = orthogonality(with_dead)
    ref = orthogonality(maps)
    assert not math.isnan(res.o1) and not math.isnan(res.o2)
    assert res.o2 == pytest.approx(ref.o2)
    assert res.o1 == pytest.approx(math.sqrt((ref.o1 + math.sqrt(3)) ** 2 + 1) - 2)
    assert res.n_constant == 1 and ref.n_constant == 0
    constant = torch.cat([with_dead, torch.full((6, 1, 5, 5), 2.0, dtype=torch.float64)], 1)
    with pytest.warns(RuntimeWarning, match="2 of 5 variables have zero variance"):
        assert orthogonality(constant).n_constant == 2


def test_errors():
    with pytest.raises(InputError, match="N x n x H x W"):
        orthogonality(torch.rand(3, 3))
    with pytest.raises(InputError, match="update"):
        OrthogonalityAccumulator().result()
    acc = OrthogonalityAccumulator().update(torch.rand(2, 3, 4, 4))
    with pytest.raises(InputError, match="same variables"):
        acc.update(torch.rand(2, 2, 4, 4))
    with pytest.raises(InputError, match="square"):
        orthogonality_scores(torch.rand(2, 3))
