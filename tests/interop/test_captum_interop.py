"""Our methods as Captum attributions: Captum's metrics and visualisation accept them."""

import sys

import matplotlib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "attribution"))
from _attr_helpers import assert_unchanged, snapshot  # noqa: E402

from xnn_toolkit.attribution import explain  # noqa: E402
from xnn_toolkit.interop.captum import (  # noqa: E402
    CAMAttribution,
    ExcitationBackpropAttribution,
    XnnAttribution,
)

captum_metrics = pytest.importorskip("captum.metrics")
matplotlib.use("Agg")


def test_is_a_captum_attribution_whose_channel_sum_is_our_heatmap(bundled, batch):
    from captum.attr import Attribution

    x, y, _ = batch
    attr = ExcitationBackpropAttribution(bundled.model)
    assert isinstance(attr, Attribution) and not attr.has_convergence_delta()
    out = attr.attribute(x[:3], target=y[:3])
    assert out.shape == x[:3].shape
    want = explain(bundled.model, x[:3], y[:3], method="cmwp").heatmap
    torch.testing.assert_close(out.sum(1), want)
    assert attr.last.metadata.method == "cmwp"
    mwp = ExcitationBackpropAttribution(bundled.model, contrastive=False)
    assert not torch.allclose(mwp.attribute(x[:1], int(y[0])), out[:1])
    cam = CAMAttribution(bundled.model, "gradcam").attribute(x[:1], y[0].clone())
    torch.testing.assert_close(
        cam.sum(1), explain(bundled.model, x[:1], y[:1], method="gradcam").heatmap
    )


def test_infidelity_and_sensitivity_max_on_cmwp(bundled, batch):
    x, y, _ = batch
    x, y = x[:2], y[:2]
    model = bundled.model
    snap = snapshot(model)
    attr = ExcitationBackpropAttribution(model)
    maps = attr.attribute(x, target=y)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.05
        return noise, inputs - noise

    torch.manual_seed(0)
    infid = captum_metrics.infidelity(model, perturb, x, maps, target=y, n_perturb_samples=4)
    sens = captum_metrics.sensitivity_max(
        attr.attribute, x, target=y, n_perturb_samples=2, perturb_radius=0.02
    )
    assert_unchanged(model, snap)
    assert infid.shape == (2,) and torch.isfinite(infid).all() and (infid >= 0).all()
    assert sens.shape == (2,) and torch.isfinite(sens).all() and (sens >= 0).all()


def test_visualize_image_attr_accepts_it(bundled, batch):
    from captum.attr import visualization as viz

    x, y, _ = batch
    out = XnnAttribution(bundled.model, "gradcam").attribute(x[:1], int(y[0]))
    fig, _ = viz.visualize_image_attr(
        out[0].permute(1, 2, 0).numpy(),
        np.clip(x[0].permute(1, 2, 0).numpy(), 0, 1),
        method="blended_heat_map",
        sign="positive",
        use_pyplot=False,
    )
    assert fig is not None
