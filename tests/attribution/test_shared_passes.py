"""Shared passes inside ``shared_passes``: MWP and c-MWP on one forward, exactly.

Reference: each method called alone (outside the block) on the same batch; the maps, the
metadata and the conservation books must be equal (``torch.equal``), in either order, and
the forward must run once.
"""

from __future__ import annotations

import pytest
import torch

from xnn_toolkit.attribution import get_method
from xnn_toolkit.attribution._capture import shared_passes
from xnn_toolkit.attribution.targets import Class
from xnn_toolkit.models import load_model

BOOKS = ("top", "read_sum", "read_abs", "lost", "lost_zero")


def _same(a, b) -> bool:
    ma, mb = a.metadata, b.metadata
    if not (torch.equal(a.raw, b.raw) and torch.equal(a.heatmap, b.heatmap)):
        return False
    if (ma.rules, ma.fallbacks, ma.params) != (mb.rules, mb.fallbacks, mb.params):
        return False
    ca, cb = ma.conservation, mb.conservation
    return all(torch.equal(getattr(ca, f), getattr(cb, f)) for f in BOOKS) and (
        ca.by_layer == cb.by_layer
    )


@pytest.mark.parametrize(
    ("spec", "size"), [("bundled:resnet_synth", 64), ("bundled:efficientnet_lite0", 96)]
)
@pytest.mark.parametrize("order", [("mwp", "cmwp", "mwp"), ("cmwp", "mwp", "cmwp")])
def test_mwp_and_cmwp_share_one_forward_exactly(spec, size, order):
    model = load_model(spec).model
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    alone = {n: get_method(n)(model).attribute(x, Class(y)) for n in ("mwp", "cmwp")}
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with shared_passes(x):
            got = [get_method(n)(model).attribute(x, Class(y)) for n in order]
    finally:
        handle.remove()
    assert len(calls) == 1
    assert all(_same(g, alone[n]) for g, n in zip(got, order))


def test_other_rules_do_not_share():
    model = load_model("bundled:vgg_synth").model
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        with shared_passes(x):
            a = get_method("mwp")(model).attribute(x, 1)
            b = get_method("mwp")(model, batchnorm="identity", stabilizer=1e-3).attribute(x, 1)
    finally:
        handle.remove()
    assert len(calls) == 2
    assert torch.equal(a.raw, get_method("mwp")(model).attribute(x, 1).raw)
    assert torch.equal(
        b.raw, get_method("mwp")(model, batchnorm="identity", stabilizer=1e-3).attribute(x, 1).raw
    )
