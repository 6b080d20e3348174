"""GradMap, ActivMap and the dataset thresholds, against literal reference pipelines."""

import numpy as np
import pytest
import torch
import torchvision
from _attr_helpers import PlainNet, assert_unchanged, snapshot
from scipy.ndimage import gaussian_filter

from xnn_toolkit.attribution import ActivMap, Channel, GradMap, activation_thresholds
from xnn_toolkit.attribution.filters import _gaussian_blur, _reservoir
from xnn_toolkit.errors import InputError


@pytest.mark.parametrize("sigma", [0.8, 2.0, 5.0])
def test_gaussian_blur_matches_scipy(sigma):
    maps = torch.rand(2, 24, 30, dtype=torch.float64)
    ours = _gaussian_blur(maps, sigma)
    for n in range(2):
        ref = gaussian_filter(maps[n].numpy(), sigma, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(ours[n].numpy(), ref, rtol=1e-10, atol=1e-12)


def test_gradmap_follows_the_recipe():
    net = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 48, 48)
    res = GradMap(net, layer="layer2", sigma=3.0).attribute(x, [5, 17])
    for n, k in enumerate([5, 17]):
        xi = x[n : n + 1].clone().requires_grad_(True)
        grabbed = {}
        h = net.layer2.register_forward_hook(lambda m, i, o, d=grabbed: d.setdefault("a", o))
        net(xi)
        h.remove()
        (g,) = torch.autograd.grad(grabbed["a"][0, k].mean(), xi)
        torch.testing.assert_close(res.raw[n], g[0], rtol=1e-4, atol=1e-7)
        m = g[0].abs().sum(0).numpy().astype(np.float64)
        m = m / np.sqrt((m**2).mean())
        ref = gaussian_filter(m, 3.0, mode="nearest", truncate=4.0)
        np.testing.assert_allclose(res.heatmap[n].numpy(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.mask, res.heatmap > 1.0)
    assert res.metadata.params == {"sigma": 3.0, "threshold": 1.0}


def test_activmap_is_the_upsampled_filter_map():
    net = PlainNet(size=16).eval()
    x = torch.randn(3, 3, 16, 16)
    thr = torch.tensor([0.1, 0.2, 0.3, 0.4])
    before = snapshot(net)
    res = ActivMap(net, layer="1", thresholds=thr).attribute(x, [0, 3, 2])
    assert_unchanged(net, before)
    with torch.no_grad():
        a = torch.relu(net[0](x))
    ref = a[torch.arange(3), torch.tensor([0, 3, 2])]
    torch.testing.assert_close(res.raw, ref)
    torch.testing.assert_close(res.heatmap, ref)  # same resolution: no interpolation
    torch.testing.assert_close(res.mask, ref > thr[[0, 3, 2]].view(3, 1, 1))
    small = ActivMap(net, layer="2").attribute(x, Channel("2", 1))
    up = torch.nn.functional.interpolate(
        torch.nn.functional.max_pool2d(a, 2)[:, 1:2],
        size=(16, 16),
        mode="bilinear",
        align_corners=False,
    )[:, 0]
    torch.testing.assert_close(small.heatmap, up)
    assert small.mask is None


def test_activation_thresholds_are_exact_quantiles():
    net = PlainNet(size=16).eval()
    data = [(torch.randn(5, 3, 16, 16), torch.zeros(5)) for _ in range(3)]
    thr = activation_thresholds(net, data, layer="1", top=0.3)
    with torch.no_grad():
        a = torch.cat([torch.relu(net[0](x)) for x, _ in data])
    vals = a.transpose(0, 1).reshape(4, -1).numpy()
    ref = np.quantile(vals, 0.7, axis=1, method="inverted_cdf")
    np.testing.assert_allclose(thr.numpy(), ref, rtol=0, atol=0)
    # the thresholds segment the top 30 % of each filter's values
    share = (torch.from_numpy(vals) > thr[:, None]).float().mean(1)
    assert torch.all(share <= 0.3 + 1e-6) and torch.all(share > 0.25)


def test_reservoir_sample_is_uniform_and_exact_when_small():
    gen = torch.Generator().manual_seed(0)
    cols = torch.arange(10.0)[None]
    buf, seen = _reservoir(None, 0, cols, 20, gen)
    assert seen == 10 and torch.equal(buf, cols)
    counts = torch.zeros(1000)
    for rep in range(200):
        gen = torch.Generator().manual_seed(rep)
        buf, seen = None, 0
        for start in range(0, 1000, 100):
            chunk = torch.arange(start, start + 100, dtype=torch.float32)[None]
            buf, seen = _reservoir(buf, seen, chunk, 50, gen)
        assert buf.shape == (1, 50) and len(set(buf[0].tolist())) == 50
        counts[buf[0].long()] += 1
    # every position kept with probability 50/1000: early and late batches alike
    first, last = counts[:100].mean(), counts[900:].mean()
    assert abs(first - 10) < 2 and abs(last - 10) < 2


def test_filter_targets_are_checked():
    net = PlainNet(size=16).eval()
    with pytest.raises(InputError, match="filter index"):
        GradMap(net, layer="1").attribute(torch.randn(1, 3, 16, 16), None)
    with pytest.raises(InputError, match="out of range"):
        ActivMap(net, layer="1").attribute(torch.randn(1, 3, 16, 16), 4)
    with pytest.raises(InputError, match="thresholds"):
        ActivMap(net, layer="1", thresholds=torch.ones(3)).attribute(torch.randn(1, 3, 16, 16), 1)
