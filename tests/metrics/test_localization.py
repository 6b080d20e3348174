import contextlib
import io
import math
import warnings

import numpy as np
import pytest
import torch

from xnn_toolkit.data.types import PartBatch
from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import (
    LocalizationAccumulator,
    box_masks,
    class_localization,
    energy_pointing_game,
    filter_localization,
    iou,
    pointing_game,
    top_k_intersection,
    top_pixels,
)

from .literal import energy_literal, filter_localization_literal, iou_literal, pointing_literal


def _blobs(n, h, w, seed, max_r=6):
    """Random disc-shaped object masks (some far from the heatmap maximum)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy = torch.randint(0, h, (n,), generator=g)
    cx = torch.randint(0, w, (n,), generator=g)
    r = torch.randint(1, max_r, (n,), generator=g)
    return ((ys[None] - cy[:, None, None]) ** 2 + (xs[None] - cx[:, None, None]) ** 2) <= r[
        :, None, None
    ] ** 2


def _quantus(metric_cls, maps, masks, **kw):
    """Run a Quantus localisation metric on numpy copies, silencing its warnings and prints."""
    quantus = pytest.importorskip("quantus")
    n = maps.shape[0]
    a = maps.double().numpy()[:, None]
    s = masks.numpy().astype(np.float64)[:, None]
    x = np.zeros((n, 1) + maps.shape[-2:])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        metric = getattr(quantus, metric_cls)(
            disable_warnings=True, normalise=False, abs=False, **kw
        )
        out = metric(model=None, x_batch=x, y_batch=np.zeros(n, dtype=int), a_batch=a, s_batch=s)
    return torch.tensor(np.asarray(out, dtype=np.float64))


def test_iou_equals_literal_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(4, 3, 9, 8, generator=g) > 0.6
    gt = torch.rand(4, 9, 8, generator=g) > 0.5
    gt[3] = False
    pred[3, 0] = False  # both empty -> zero_division
    out = iou(pred, gt)
    assert out.shape == (4, 3)
    for m in range(4):
        for k in range(3):
            assert out[m, k].item() == pytest.approx(
                iou_literal(pred[m, k].tolist(), gt[m].tolist())
            )
    assert out[3, 0] == 0
    assert iou(pred, gt, zero_division=1.0)[3, 0] == 1
    assert iou(pred[:, 0].float(), gt)[0] == out[0, 0]
    with pytest.raises(InputError, match="binary"):
        iou(torch.rand(4, 9, 8), gt)
    with pytest.raises(InputError, match="resize"):
        iou(pred[:, :, :4], gt)


def test_pointing_game_equals_torchray_with_tolerance():
    pg = pytest.importorskip("torchray.benchmark.pointing_game")
    n, h, w = 40, 48, 40
    maps = torch.rand(n, h, w, generator=torch.Generator().manual_seed(1))
    masks = _blobs(n, h, w, seed=2)
    ours = pointing_game(maps, masks, tolerance=15)
    game = pg.PointingGame(num_classes=1, tolerance=15)
    ref = []
    for m in range(n):
        idx = int(maps[m].argmax())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchray's meshgrid without indexing
            ref.append(game.evaluate(masks[m], (idx % w, idx // w)) == 1)
    assert ours.tolist() == ref
    assert 0 < sum(ref) < n  # both hits and misses occur


@pytest.mark.parametrize("tol", [0, 1, 3.5, 15])
def test_pointing_game_equals_literal(tol):
    n, h, w = 12, 16, 14
    g = torch.Generator().manual_seed(3)
    maps = torch.randint(0, 5, (n, 2, h, w), generator=g).float()  # many ties
    masks = _blobs(n, h, w, seed=4, max_r=3)
    masks[0] = False  # empty mask -> miss
    maps[1, 0] = 0.0  # constant map -> miss
    out = pointing_game(maps, masks, tolerance=tol)
    assert out.shape == (n, 2)
    for m in range(n):
        for k in range(2):
            assert bool(out[m, k]) == pointing_literal(maps[m, k].tolist(), masks[m].tolist(), tol)
    assert not out[0].any() and not out[1, 0]


def test_pointing_game_without_tolerance_equals_quantus():
    n, h, w = 30, 20, 20
    maps = torch.randn(n, h, w, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    masks = _blobs(n, h, w, seed=6, max_r=8)
    ours = pointing_game(maps, masks, tolerance=0)
    ref = _quantus("PointingGame", maps, masks)
    assert ours.tolist() == ref.bool().tolist()
    assert 0 < int(ours.sum()) < n


def test_pointing_game_ties_take_the_first_maximum():
    heat = torch.zeros(1, 5, 5)
    heat[0, 1, 1] = 1.0
    heat[0, 3, 3] = 1.0
    first = torch.zeros(1, 5, 5, dtype=torch.bool)
    first[0, 1, 1] = True
    second = torch.zeros(1, 5, 5, dtype=torch.bool)
    second[0, 3, 3] = True
    assert pointing_game(heat, first, tolerance=0).tolist() == [True]
    assert pointing_game(heat, second, tolerance=0).tolist() == [False]
    # distance from (1, 1) to (3, 3) is sqrt(8) ~ 2.83: hit with tolerance 3, miss with 2.8
    assert pointing_game(heat, second, tolerance=3).tolist() == [True]
    assert pointing_game(heat, second, tolerance=2.8).tolist() == [False]
    with pytest.raises(InputError, match="tolerance"):
        pointing_game(heat, second, tolerance=-1)


def test_energy_pointing_game_equals_literal_and_quantus():
    n, h, w = 10, 12, 11
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(n, h, w, generator=g, dtype=torch.float64)
    masks = _blobs(n, h, w, seed=8, max_r=6)
    masks[0] = True
    out = energy_pointing_game(maps, masks)
    for m in range(n):
        assert out[m].item() == pytest.approx(
            energy_literal(maps[m].tolist(), masks[m].tolist()), abs=1e-12
        )
    assert out[0] == 1
    ref = _quantus("AttributionLocalisation", maps, masks, positive_attributions=True)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_energy_pointing_game_hand_cases():
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, 1:3, 1:3] = True
    heat = torch.zeros(2, 4, 4)
    heat[0, 1:3, 1:3] = torch.rand(2, 2) + 0.1  # all inside -> 1
    out = energy_pointing_game(heat, mask)
    assert out.tolist() == [1.0, 0.0]  # all-zero map -> 0, no NaN
    heat2 = torch.full((1, 4, 4), -1.0)
    heat2[0, 0, 0] = 1.0
    heat2[0, 1, 1] = 3.0
    assert energy_pointing_game(heat2, mask[:1]).item() == pytest.approx(0.75)


def test_top_k_intersection_equals_quantus_and_fraction():
    n, h, w = 12, 16, 16
    maps = torch.rand(n, h, w, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    masks = _blobs(n, h, w, seed=10, max_r=7)
    ours = top_k_intersection(maps, masks, k=20)
    ref = _quantus("TopKIntersection", maps, masks, k=20)
    torch.testing.assert_close(ours.double(), ref)
    torch.testing.assert_close(
        top_k_intersection(maps, masks, k=0.25), top_k_intersection(maps, masks, k=64)
    )
    assert top_pixels(maps, 0.3).sum((-2, -1)).tolist() == [math.ceil(0.3 * 256)] * n
    with pytest.raises(InputError, match="k must be"):
        top_k_intersection(maps, masks, k=257)


def test_filter_localization_equals_literal():
    g = torch.Generator().manual_seed(11)
    n, k, c = 40, 6, 5
    ious = torch.rand(n, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c - 1, (n,), generator=g)  # class 4 has no examples
    res = filter_localization(ious, labels, num_classes=c, min_iou=0.5)
    ref = filter_localization_literal(ious.tolist(), labels.tolist(), c, 0.5)
    for key in (
        "iou_per_class",
        "ap_per_class",
        "iou_per_filter",
        "ap_per_filter",
        "iou_by_class",
        "ap_by_class",
    ):
        torch.testing.assert_close(
            getattr(res, key), torch.tensor(ref[key], dtype=torch.float64), equal_nan=True
        )
    assert res.best_class.tolist() == ref["best_class"]
    assert res.iou == pytest.approx(ref["iou"]) and res.ap == pytest.approx(ref["ap"])
    assert torch.isnan(res.iou_per_class[:, 4]).all() and res.class_counts[4] == 0
    # streaming in batches gives the same tables
    acc = LocalizationAccumulator(c, 0.5)
    for a in range(0, n, 13):
        acc.update(ious[a : a + 13], labels[a : a + 13])
    torch.testing.assert_close(acc.filter_result().ap_per_class, res.ap_per_class, equal_nan=True)


def test_filter_localization_breaks_apn_ties_by_iou():
    # hand case: 4 images, two per class; no IoU reaches 0.5, so AP50 is 0 for both classes
    # and filter 0 localizes class 1 better (IoU 0.4 vs 0.1); filter 1 ties in APn at 0.5
    # (one hit each) and has the higher IoU on class 0; filter 2 ties in both: the first class
    ious = torch.tensor(
        [
            [0.1, 0.9, 0.2],
            [0.1, 0.1, 0.2],
            [0.4, 0.6, 0.2],
            [0.4, 0.0, 0.2],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 0, 1, 1])
    res = filter_localization(ious, labels, num_classes=2, min_iou=0.5)
    assert res.best_class.tolist() == [1, 0, 0]
    assert res.iou_per_filter.tolist() == pytest.approx([0.4, 0.5, 0.2])
    assert res.ap_per_filter.tolist() == pytest.approx([0.0, 0.5, 0.0])
    ref = filter_localization_literal(ious.tolist(), labels.tolist(), 2, 0.5)
    assert ref["best_class"] == [1, 0, 0]


def test_class_localization_h2():
    ious = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7])
    labels = torch.tensor([0, 0, 1, 1, 1])
    res = class_localization(ious, labels, num_classes=3, min_iou=0.5)
    torch.testing.assert_close(
        res.iou_per_class[:2], torch.tensor([0.55, 1.7 / 3], dtype=torch.float64)
    )
    torch.testing.assert_close(
        res.ap_per_class[:2], torch.tensor([0.5, 2 / 3], dtype=torch.float64)
    )
    assert math.isnan(res.iou_per_class[2])
    assert res.iou == pytest.approx(2.8 / 5) and res.ap == pytest.approx(3 / 5)
    with pytest.raises(InputError, match="num_classes"):
        class_localization(ious, torch.tensor([0, 0, 1, 1, 3]), num_classes=3)


def test_box_masks_and_partbatch_inputs():
    m = box_masks(torch.tensor([[1.0, 0.0, 2.0, 1.5]]), (3, 4))
    assert m[0].int().tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    obj = torch.zeros(2, 3, 4, dtype=torch.bool)
    obj[:, 0, 1] = True
    parts = PartBatch(
        torch.zeros(2, dtype=torch.long),
        torch.zeros(2, 1, 2),
        torch.ones(2, 1, dtype=torch.bool),
        torch.zeros(2, 4),
        object_mask=obj,
    )
    heat = torch.zeros(2, 3, 4)
    heat[:, 0, 1] = 1.0
    assert energy_pointing_game(heat, parts).tolist() == [1.0, 1.0]
    parts.object_mask = None
    with pytest.raises(InputError, match="box_masks"):
        pointing_game(heat, parts)


@pytest.mark.parametrize("seed", range(6))
def test_top_pixels_keeps_the_k_highest_with_ties_in_row_major_order(seed):
    """Reference: a literal ranking, pixel by pixel (value descending, then row-major)."""
    g = torch.Generator().manual_seed(seed)
    h, w = 5, 7
    maps = torch.randint(0, 4, (3, 2, h, w), generator=g).float()  # many ties
    for k in (0, 1, 6, 0.3, 17, h * w):
        got = top_pixels(maps, k)
        count = k if isinstance(k, int) else math.ceil(k * h * w)
        for n in range(3):
            for m in range(2):
                flat = maps[n, m].flatten().tolist()
                order = sorted(range(h * w), key=lambda i: (-flat[i], i))
                want = torch.zeros(h * w, dtype=torch.bool)
                want[order[:count]] = True
                assert torch.equal(got[n, m].flatten(), want), (seed, k, n, m)


def test_gate_localization_uses_the_attribution_filter_maps_on_the_real_model():
    """On EfficientNet-Lite0 and two bundled photos: the ActivMap segments that
    gate_localization scores are those of attribution.ActivMap with the dataset thresholds of
    attribution.activation_thresholds, its GradMap segments those of attribution.GradMap (one
    definition each), and the model is left as it was."""
    from xnn_toolkit.attribution import ActivMap, activation_thresholds
    from xnn_toolkit.data import SkimagePhotos
    from xnn_toolkit.metrics import gate_localization
    from xnn_toolkit.models import load_model

    lm = load_model("bundled:efficientnet_lite0")
    photos = SkimagePhotos.for_model(lm, ["chelsea", "coffee"])
    x = lm.preprocessing.normalize(torch.stack([photos[i][0] for i in range(2)]))
    masks = torch.zeros(2, 224, 224, dtype=torch.bool)
    masks[:, 56:168, 56:168] = True
    k = 8
    before = {n: p.clone() for n, p in lm.model.state_dict().items()}
    gates = torch.zeros(2, k)
    gates[0, :4] = 1.0
    gates[1, 4:] = 1.0
    # gate_localization needs the layer to have K channels: score the first 8 of a copy
    net = torch.nn.Sequential(lm.model.conv_stem, lm.model.bn1, lm.model.blocks)
    pick = torch.nn.Conv2d(320, k, 1, bias=False)
    with torch.no_grad():
        pick.weight.zero_()
        for i in range(k):
            pick.weight[i, i] = 1.0
    net = torch.nn.Sequential(net, pick, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net.eval()
    res = gate_localization(gates, net, x, masks, torch.tensor([0, 1]), layer="1", top=0.3)
    thr = activation_thresholds(net, x, "1", top=0.3)
    for f in range(k):
        seg = ActivMap(net, "1", thresholds=thr).attribute(x, f).mask
        want = iou(seg, masks)
        assert torch.allclose(res.ious[:, f].double(), want.double(), atol=1e-6), f
    # GradMap: every filter from one shared forward pass, the same masks as GradMap alone
    from xnn_toolkit.attribution import GradMap

    res_g = gate_localization(
        gates, net, x, masks, torch.tensor([0, 1]), layer="1", method="gradmap"
    )
    for f in range(k):
        seg = GradMap(net, "1").attribute(x, f).mask
        assert torch.equal(res_g.ious[:, f], iou(seg, masks)), f
    assert all(torch.equal(before[n], p) for n, p in lm.model.state_dict().items())
    assert not lm.model.training
