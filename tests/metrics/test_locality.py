import math

import pytest
import torch

from xnn_toolkit.data.types import PartBatch
from xnn_toolkit.errors import InputError
from xnn_toolkit.metrics import (
    LocalityAccumulator,
    keypoint_probabilities,
    locality,
    mask_part_probabilities,
    pixel_probabilities,
    voronoi_cells,
    voronoi_part_probabilities,
)

from .literal import (
    keypoint_literal,
    locality_literal,
    mask_parts_literal,
    normalise_literal,
    voronoi_literal,
)


def _random_parts(seed, n=3, p=6, h=12, w=10):
    g = torch.Generator().manual_seed(seed)
    kp = (
        torch.rand(n, p, 2, generator=g, dtype=torch.float64) * torch.tensor([w + 2.0, h + 2.0]) - 1
    )
    kp[:, : p // 2] = kp[:, : p // 2].round()  # integer keypoints: exact Voronoi ties happen
    vis = torch.rand(n, p, generator=g) > 0.25
    kp[0, -1] = float("nan")  # a missing keypoint, flagged visible
    vis[0, -1] = True
    x0 = torch.rand(n, generator=g, dtype=torch.float64) * 3
    y0 = torch.rand(n, generator=g, dtype=torch.float64) * 3
    x1 = x0 + 3 + torch.rand(n, generator=g, dtype=torch.float64) * (w - 4)
    y1 = y0 + 3 + torch.rand(n, generator=g, dtype=torch.float64) * (h - 4)
    bbox = torch.stack([x0, y0, x1, y1], 1)
    bbox[1] = torch.tensor([2.0, 1.0, 7.0, 9.0])  # integer box edges: boundary pixels included
    return kp, vis, bbox


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_voronoi_equals_literal_algorithm_3(seed):
    n, k, h, w = 3, 2, 12, 10
    kp, vis, bbox = _random_parts(seed, n=n, h=h, w=w)
    g = torch.Generator().manual_seed(100 + seed)
    maps = torch.rand(n, k, h, w, generator=g, dtype=torch.float64) - 0.2  # some negatives
    maps[2, 1] = 0.0  # an all-zero map
    ours = voronoi_part_probabilities(maps, keypoints=kp, visible=vis, bbox=bbox)
    assert ours.shape == (n, k, kp.shape[1] + 1)
    for m in range(n):
        ref = voronoi_literal(maps[m].tolist(), kp[m].tolist(), vis[m].tolist(), bbox[m].tolist())
        torch.testing.assert_close(
            ours[m], torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0
        )
    assert torch.all(ours[2, 1] == 0)


def test_voronoi_float32_within_1e6_and_chunking_invariant():
    kp, vis, bbox = _random_parts(5, n=4)
    g = torch.Generator().manual_seed(7)
    maps = torch.rand(4, 12, 10, generator=g)
    ours = voronoi_part_probabilities(maps, keypoints=kp, visible=vis, bbox=bbox)
    assert ours.dtype == torch.float32 and ours.shape == (4, kp.shape[1] + 1)
    chunked = voronoi_part_probabilities(maps, keypoints=kp, visible=vis, bbox=bbox, chunk_size=1)
    torch.testing.assert_close(ours, chunked, atol=1e-7, rtol=0)
    for m in range(4):
        ref = voronoi_literal([maps[m].tolist()], kp[m].tolist(), vis[m].tolist(), bbox[m].tolist())
        torch.testing.assert_close(
            ours[m].double(), torch.tensor(ref[0], dtype=torch.float64), atol=1e-6, rtol=0
        )


def test_voronoi_partbatch_matches_tensors_and_context_flag():
    kp, vis, bbox = _random_parts(3)
    parts = PartBatch(
        labels=torch.zeros(3, dtype=torch.long),
        keypoints=kp.float(),
        visible=vis,
        bbox=bbox.float(),
    )
    maps = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = voronoi_part_probabilities(maps, parts)
    b = voronoi_part_probabilities(maps, keypoints=kp.float(), visible=vis, bbox=bbox.float())
    torch.testing.assert_close(a, b)
    no_ctx = voronoi_part_probabilities(maps, parts, context=False)
    torch.testing.assert_close(no_ctx, a[:, :-1])


def test_voronoi_hand_cases_cells_ties_and_single_pixel():
    # Two keypoints on one row of a 1 x 5 box; the middle pixel (x = 2) is a tie -> part 0.
    kp = torch.tensor([[[0.0, 0.0], [4.0, 0.0]]])
    cells = voronoi_cells(size=(1, 5), keypoints=kp, bbox=torch.tensor([[0.0, 0.0, 4.0, 0.0]]))
    assert cells.owner.tolist() == [[[0, 0, 0, 1, 1]]]
    # part 0's cell: distances 0, 1, 2 -> weights 1, 1/2, 0; part 1's: distances 1, 0 -> 0, 1
    expected = torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(cells.weights[0, :, 0], expected)

    # A one-pixel cell whose pixel is on its keypoint: max distance 0 -> weight 1, no NaN.
    heat = torch.zeros(1, 4, 4)
    heat[0, 1, 1] = 2.0
    heat[0, 3, 3] = 2.0  # outside the box: context
    kp = torch.tensor([[[1.0, 1.0], [3.0, 0.0]]])
    out = voronoi_part_probabilities(heat, keypoints=kp, bbox=torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.0, 0.5]]))
    # The same box with the keypoint off the pixel: d / max d = 1 -> weight 0.
    kp_off = torch.tensor([[[1.5, 1.0], [3.0, 0.0]]])
    out = voronoi_part_probabilities(
        heat, keypoints=kp_off, bbox=torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    )
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5]]))


def test_voronoi_no_visible_keypoints_and_all_zero_maps():
    heat = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0))
    heat[1] = 0
    kp = torch.rand(2, 3, 2) * 5
    vis = torch.zeros(2, 3, dtype=torch.bool)
    bbox = torch.tensor([[1.0, 1.0, 3.0, 3.0]] * 2)
    out = voronoi_part_probabilities(heat, keypoints=kp, visible=vis, bbox=bbox)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, :3] == 0)
    s = pixel_probabilities(heat[:1])[0]
    box = torch.zeros(6, 6, dtype=torch.bool)
    box[1:4, 1:4] = True
    torch.testing.assert_close(out[0, 3], s[~box].sum())
    assert out[1].abs().sum() == 0


def test_voronoi_single_peak_on_a_keypoint_is_perfectly_local():
    # Every image has its heatmap on the keypoint of part 2 -> histogram one-hot -> locality 0.
    n, h, w = 4, 9, 9
    g = torch.Generator().manual_seed(0)
    kp = torch.randint(1, 8, (n, 4, 2), generator=g).double()
    kp[:, :, 0] = torch.tensor([1.0, 3.0, 5.0, 7.0])  # distinct columns: no coinciding keypoints
    heat = torch.zeros(n, h, w)
    for m in range(n):
        heat[m, int(kp[m, 2, 1]), int(kp[m, 2, 0])] = 3.0
    probs = voronoi_part_probabilities(
        heat, keypoints=kp, bbox=torch.tensor([[0.0, 0.0, 8.0, 8.0]] * n)
    )
    expected = torch.zeros(n, 5)
    expected[:, 2] = 1
    torch.testing.assert_close(probs, expected)
    assert locality(probs).mean == pytest.approx(0.0, abs=1e-12)


def test_voronoi_errors():
    heat = torch.rand(1, 5, 5)
    kp = torch.rand(1, 2, 2)
    with pytest.raises(InputError, match="x1 < x0"):
        voronoi_part_probabilities(heat, keypoints=kp, bbox=torch.tensor([[3.0, 0.0, 1.0, 4.0]]))
    with pytest.raises(InputError, match="N x P x 2"):
        voronoi_part_probabilities(
            heat, keypoints=torch.rand(1, 2, 3), bbox=torch.tensor([[0.0, 0, 4, 4]])
        )
    with pytest.raises(InputError, match="bbox is missing"):
        voronoi_part_probabilities(heat, keypoints=kp)
    with pytest.raises(InputError, match="NaN"):
        voronoi_part_probabilities(
            heat * float("nan"), keypoints=kp, bbox=torch.tensor([[0.0, 0, 4, 4]])
        )
    with pytest.raises(InputError, match="N x H x W"):
        voronoi_part_probabilities(
            torch.rand(5, 5), keypoints=kp, bbox=torch.tensor([[0.0, 0, 4, 4]])
        )


def test_pixel_and_keypoint_probabilities_equal_literal():
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(3, 2, 7, 8, generator=g, dtype=torch.float64)
    maps[1, 0] = -1.0  # no positive mass -> zero
    s = pixel_probabilities(maps)
    for m in range(3):
        for k in range(2):
            torch.testing.assert_close(
                s[m, k], torch.tensor(normalise_literal(maps[m, k].tolist()), dtype=torch.float64)
            )
    kp = torch.tensor(
        [[[0.4, 0.6], [7.49, 6.5], [8.6, 1.0], [3.0, -0.7]]], dtype=torch.float64
    ).repeat(3, 1, 1)
    vis = torch.tensor([[True, True, True, True], [True, False, True, True], [True] * 4])
    out = keypoint_probabilities(maps, keypoints=kp, visible=vis)
    assert out.shape == (3, 2, 4)
    for m in range(3):
        for k in range(2):
            ref = keypoint_literal(maps[m, k].tolist(), kp[m].tolist(), vis[m].tolist())
            torch.testing.assert_close(out[m, k], torch.tensor(ref, dtype=torch.float64))


def test_mask_part_probabilities_equal_literal_and_inside_one_part_is_local():
    g = torch.Generator().manual_seed(2)
    maps = torch.rand(3, 2, 6, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 6, 7), generator=g)
    out = mask_part_probabilities(maps, labels, num_parts=3, context=True)
    for m in range(3):
        for k in range(2):
            ref = mask_parts_literal(maps[m, k].tolist(), labels[m].tolist(), 3)
            torch.testing.assert_close(out[m, k], torch.tensor(ref, dtype=torch.float64))
    torch.testing.assert_close(mask_part_probabilities(maps, labels, 3), out[..., :3])
    # a heatmap that lies inside part 1 only -> [0, 1, 0] -> locality 0
    heat = torch.where(labels == 2, 1.0, 0.0)
    probs = mask_part_probabilities(heat, labels, 3)
    torch.testing.assert_close(probs, torch.tensor([[0.0, 1.0, 0.0]] * 3, dtype=torch.float32))
    assert locality(probs).mean == pytest.approx(0.0, abs=1e-12)
    # bool object mask -> one part; PartBatch -> its part_mask
    obj = labels > 0
    torch.testing.assert_close(mask_part_probabilities(maps, obj)[..., 0], out[..., :3].sum(-1))
    parts = PartBatch(
        torch.zeros(3, dtype=torch.long),
        torch.zeros(3, 3, 2),
        torch.ones(3, 3, dtype=torch.bool),
        torch.zeros(3, 4),
        part_mask=labels,
    )
    torch.testing.assert_close(mask_part_probabilities(maps, parts), out[..., :3])


def test_mask_part_probabilities_errors():
    maps = torch.rand(2, 6, 7)
    labels = torch.randint(0, 4, (2, 6, 7))
    with pytest.raises(InputError, match="num_parts is required"):
        mask_part_probabilities(maps, labels)
    with pytest.raises(InputError, match=r"lie in \[0, 2\]"):
        mask_part_probabilities(maps, labels, num_parts=2)
    with pytest.raises(InputError, match="resize"):
        mask_part_probabilities(torch.rand(2, 12, 14), labels, num_parts=3)
    with pytest.raises(InputError, match="holds 2"):
        mask_part_probabilities(torch.rand(3, 6, 7), labels, num_parts=3)
    parts = PartBatch(
        torch.zeros(2, dtype=torch.long),
        torch.zeros(2, 3, 2),
        torch.ones(2, 3, dtype=torch.bool),
        torch.zeros(2, 4),
    )
    with pytest.raises(InputError, match="no part_mask"):
        mask_part_probabilities(maps, parts)


def test_locality_equals_literal_and_streams():
    g = torch.Generator().manual_seed(9)
    pp = torch.rand(20, 3, 6, generator=g, dtype=torch.float64)
    pp[:, 1] *= torch.tensor([5.0, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    res = locality(pp)
    ref = locality_literal(pp.tolist())
    torch.testing.assert_close(res.entropy, torch.tensor(ref, dtype=torch.float64))
    assert res.mean == pytest.approx(sum(ref) / 3, abs=1e-12)
    torch.testing.assert_close(res.histograms.sum(1), torch.ones(3, dtype=torch.float64))
    acc = LocalityAccumulator()
    for a in range(0, 20, 7):
        acc.update(pp[a : a + 7])
    torch.testing.assert_close(acc.result().entropy, res.entropy)
    # one source (the 1-heatmap) as M x B
    torch.testing.assert_close(locality(pp[:, 0]).entropy, res.entropy[:1])


def test_locality_uniform_and_all_zero_sources():
    pp = torch.zeros(5, 2, 4)
    pp[:, 0] = 0.25
    res = locality(pp)
    # uniform -> log 4; a source with no mass is scored as uniform, never as local
    torch.testing.assert_close(res.entropy, torch.full((2,), math.log(4), dtype=torch.float64))
    assert not torch.isnan(res.histograms).any()
    with pytest.raises(InputError, match=">= 0"):
        locality(-pp - 1)
    with pytest.raises(InputError, match="update"):
        LocalityAccumulator().result()
    acc = LocalityAccumulator().update(pp)
    with pytest.raises(InputError, match="earlier batches"):
        acc.update(torch.zeros(5, 2, 3))
