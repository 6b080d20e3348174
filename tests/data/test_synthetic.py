"""Tests of the synthetic part-annotated birds (xnn_toolkit.data.synthetic)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xnn_toolkit.data import _render
from xnn_toolkit.data._counter_rng import uniforms
from xnn_toolkit.data.synthetic import SyntheticParts
from xnn_toolkit.data.types import PartAnnotation, PartBatch
from xnn_toolkit.errors import InputError

CUB_PARTS = [
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
]
P = {name: p for p, name in enumerate(CUB_PARTS)}
CLEAN = dict(clutter=False, occlusion=False, distractors=False)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Rendering is many small element-wise ops; extra threads only contend on a busy box.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _swap_sides(part_mask: torch.Tensor) -> torch.Tensor:
    """Rename left parts right and vice versa in a part mask (values p + 1)."""
    table = torch.arange(len(CUB_PARTS) + 1)
    for name in CUB_PARTS:
        if name.startswith("left "):
            other = "right " + name[5:]
            table[P[name] + 1], table[P[other] + 1] = P[other] + 1, P[name] + 1
    return table[part_mask]


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


# ----------------------------------------------------------------------------- basics
def test_sample_types_shapes_and_class_structure():
    ds = SyntheticParts(20, size=48, seed=0)
    image, label = ds[3]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert isinstance(label, int) and label == 3
    assert len(ds) == 20 and len(ds.classes) == 10 and ds.part_names == CUB_PARTS

    ds_a = SyntheticParts(20, size=48, seed=0, return_annotations=True)
    image2, label2, ann = ds_a[3]
    assert torch.equal(image, image2) and label2 == label
    assert isinstance(ann, PartAnnotation)
    assert ann.keypoints.shape == (15, 2) and ann.visible.shape == (15,)
    assert ann.visible.dtype == torch.bool and ann.bbox.shape == (4,)
    assert ann.part_mask.shape == (48, 48) and ann.part_mask.dtype == torch.int64
    assert ann.object_mask.shape == (48, 48) and ann.object_mask.dtype == torch.bool
    assert ann.class_parts == ds.class_parts[3] and ann.label == 3
    assert torch.equal(ds.annotation(3).part_mask, ann.part_mask)


def test_class_parts_and_one_part_pairs_match_the_catalogue_by_hand():
    ds = SyntheticParts(10)
    wings, tail = (P["left wing"], P["right wing"]), (P["tail"],)
    expected = {
        0: (P["beak"], P["crown"]),  # neighbours: 1 (crown) and 2 (beak)
        1: (P["crown"],),
        2: (P["beak"],),
        3: tuple(sorted(wings + tail)),  # neighbours: 4 (wings) and 5 (tail)
        4: wings,
        5: tail,
        6: (P["breast"],),
        7: (P["breast"],),
        8: (P["throat"],),
        9: (P["throat"],),
    }
    assert ds.class_parts == expected
    assert ds.pairs_differing_in_one_part() == [
        (0, 1, "crown"),
        (0, 2, "beak"),
        (3, 4, "wings"),
        (3, 5, "tail"),
        (6, 7, "breast"),
        (8, 9, "throat"),
    ]
    full = SyntheticParts(10, num_classes=12)
    assert (8, 10, "nape") in full.pairs_differing_in_one_part()
    assert (6, 11, "belly") in full.pairs_differing_in_one_part()
    assert full.class_parts[6] == (P["belly"], P["breast"])
    small = SyntheticParts(10, num_classes=2)
    assert small.class_parts == {0: (P["crown"],), 1: (P["crown"],)}
    assert len(set(full.classes)) == 12


def test_labels_are_balanced():
    ds = SyntheticParts(100, num_classes=10)
    counts = np.bincount([ds.label(i) for i in range(100)], minlength=10)
    assert (counts == 10).all()
    ds7 = SyntheticParts(70, num_classes=7)
    _, batch = ds7.render_batch(range(70))
    assert (torch.bincount(batch.labels, minlength=7) == 10).all()


# ------------------------------------------------------------------------ determinism
def test_same_seed_same_pixels_in_any_order_and_batching():
    a = SyntheticParts(200, size=40, seed=7)
    b = SyntheticParts(5000, size=40, seed=7)  # n must not matter
    order = [150, 3, 77, 3, 64, 63, 0]
    single = torch.stack([b[i][0] for i in reversed(order)]).flip(0)
    batched, ann = a.render_batch(order)
    assert torch.equal(single, batched)
    # Chunk boundaries (64 images per chunk) must not matter either.
    many, many_ann = a.render_batch(range(130))
    assert torch.equal(many[77], batched[2]) and torch.equal(many[64], batched[4])
    assert torch.equal(many_ann.part_mask[77], ann.part_mask[2])
    assert torch.equal(many_ann.keypoints[63], ann.keypoints[5])
    again, _ = SyntheticParts(200, size=40, seed=7).render_batch(order)
    assert torch.equal(again, batched)
    # Negative indices count from the end.
    assert torch.equal(a[-1][0], a[199][0])


def test_different_seeds_differ():
    x0, _ = SyntheticParts(16, seed=0).render_batch(range(16))
    x1, _ = SyntheticParts(16, seed=1).render_batch(range(16))
    per_image = (x0 - x1).abs().flatten(1).mean(1)
    assert (per_image > 0.02).all()


def test_counter_rng_matches_a_literal_splitmix64():
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def reference(seed: int, index: int, slot: int) -> float:
        per_sample = mix(mix(seed & mask) ^ index)
        return (mix((per_sample + slot * 0x9E3779B97F4A7C15) & mask) >> 11) / 2.0**53

    got = uniforms(12345, np.array([0, 1, 999_999]), 5)
    for r, index in enumerate([0, 1, 999_999]):
        for slot in range(5):
            assert got[r, slot] == reference(12345, index, slot)
    big = uniforms(3, np.arange(4000), 8)
    assert 0.0 <= big.min() and big.max() < 1.0
    assert abs(big.mean() - 0.5) < 0.01 and abs(big.var() - 1 / 12) < 0.005
    assert np.array_equal(uniforms(3, np.arange(10, 20), 8), big[10:20])


# ------------------------------------------------------------- annotations vs pixels
@pytest.mark.parametrize("options", [{}, CLEAN], ids=["cluttered", "clean"])
def test_annotations_agree_with_pixels(options):
    ds = SyntheticParts(96, size=64, seed=2, **options)
    images, batch = ds.render_batch(range(96))
    assert isinstance(batch, PartBatch) and len(batch) == 96
    n_visible = 0
    for k in range(96):
        pm = batch.part_mask[k].numpy()
        obj = batch.object_mask[k].numpy()
        assert np.array_equal(pm > 0, obj)  # part pixels are object pixels and vice versa
        for p in np.nonzero(batch.visible[k].numpy())[0]:
            x, y = batch.keypoints[k, p].tolist()
            xi, yi = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
            assert 0 <= xi < 64 and 0 <= yi < 64
            assert pm[yi, xi] == p + 1, (k, CUB_PARTS[p])
            n_visible += 1
        x0, y0, x1, y1 = (int(v) for v in batch.bbox[k])
        ys, xs = np.nonzero(obj)
        assert xs.min() >= x0 and xs.max() <= x1 and ys.min() >= y0 and ys.max() <= y1
        if not ds.occlusion:
            assert (x0, y0, x1, y1) == _tight_box(obj)
    assert n_visible > 96 * 10  # most keypoints are visible
    if not ds.clutter:
        # Flat background: every non-object pixel has the corner colour of the background
        # layer, and (nearly) every object pixel differs from it.
        for k in range(96):
            obj = batch.object_mask[k]
            bg = images[k][:, ~obj]
            assert torch.allclose(bg, bg[:, :1].expand_as(bg))
            differs = (images[k][:, obj] - bg[:, :1]).abs().amax(0) > 1e-4
            assert differs.float().mean() > 0.98


def test_occluded_box_is_the_silhouette_before_occluders():
    occluded = SyntheticParts(64, seed=4)
    free = SyntheticParts(64, seed=4, occlusion=False)
    _, a = occluded.render_batch(range(64))
    _, b = free.render_batch(range(64))
    assert torch.equal(a.bbox, b.bbox)
    assert torch.equal(a.keypoints, b.keypoints)


def test_keypoint_visibility_follows_the_profile_view():
    # A bird seen in profile shows its near side: facing right (beak to the right of the
    # tail) it shows its right eye, facing left its left eye, as in CUB-200-2011.
    ds = SyntheticParts(300, seed=3, **CLEAN)
    _, b = ds.render_batch(range(300))
    facing_right = b.keypoints[:, P["beak"], 0] > b.keypoints[:, P["tail"], 0]
    assert 0.3 < facing_right.float().mean() < 0.7
    vis = b.visible
    near_eye = torch.where(facing_right, vis[:, P["right eye"]], vis[:, P["left eye"]])
    far_eye = torch.where(facing_right, vis[:, P["left eye"]], vis[:, P["right eye"]])
    near_wing = torch.where(facing_right, vis[:, P["right wing"]], vis[:, P["left wing"]])
    near_leg = torch.where(facing_right, vis[:, P["right leg"]], vis[:, P["left leg"]])
    assert not far_eye.any()
    assert near_eye.float().mean() > 0.97
    assert near_wing.all() and near_leg.float().mean() > 0.95
    for name in ("back", "beak", "belly", "breast", "crown", "forehead", "nape", "tail", "throat"):
        assert vis[:, P[name]].float().mean() > 0.95, name
    # The near wing keypoint lies on the near (right, unmirrored) wing's pixels.
    right_wing_pixels = (b.part_mask == P["right wing"] + 1).flatten(1).sum(1)
    left_wing_pixels = (b.part_mask == P["left wing"] + 1).flatten(1).sum(1)
    bigger_right = right_wing_pixels > left_wing_pixels
    assert torch.equal(bigger_right, facing_right)


def test_mirroring_swaps_left_and_right():
    ds = SyntheticParts(32, size=64, seed=11, clutter=False)
    idx = np.arange(32)
    templates, tile = ds._assets(torch.device("cpu"))
    scene = ds._scene(idx, ds._labels_of(idx), torch.device("cpu"))
    s = ds.size - 1
    mirrored = _render.Scene(**vars(scene))
    mirrored.flip = ~scene.flip
    mirrored.angle = -scene.angle
    mirrored.origin = torch.stack([s - scene.origin[:, 0], scene.origin[:, 1]], 1)
    d = scene.distractors.clone()
    d[..., 0], d[..., 4] = s - d[..., 0], -d[..., 4]
    mirrored.distractors = d
    o = scene.occluders.clone()
    o[..., 0], o[..., 2] = s - o[..., 0], -o[..., 2]
    mirrored.occluders = o
    a = _render.draw(scene, ds.size, templates, tile)
    m = _render.draw(mirrored, ds.size, templates, tile)
    # Nearest-texel sampling may round a rare boundary pixel differently.
    same = (a.images.flip(-1) == m.images).all(1)
    assert same.float().mean() > 0.995
    swapped = _swap_sides(a.part_mask.flip(-1))
    assert (swapped == m.part_mask).float().mean() > 0.995
    assert ((swapped == m.part_mask) | ~same).all()
    perm = [P[_other_side(name)] for name in CUB_PARTS]
    kp = a.keypoints[:, perm].clone()
    kp[..., 0] = s - kp[..., 0]
    assert torch.allclose(kp, m.keypoints, atol=1e-3)
    assert (a.visible[:, perm] == m.visible).float().mean() > 0.99
    # Something sided is visible in both, so the check is not vacuous.
    assert m.visible[:, [P["left eye"], P["right eye"]]].any(1).float().mean() > 0.5


def _other_side(name: str) -> str:
    if name.startswith("left "):
        return "right " + name[5:]
    if name.startswith("right "):
        return "left " + name[6:]
    return name


def test_occluded_keypoints_are_invisible():
    occluded = SyntheticParts(160, seed=5)
    free = SyntheticParts(160, seed=5, occlusion=False)
    xo, a = occluded.render_batch(range(160))
    xf, b = free.render_batch(range(160))
    # Occluders only hide: the part mask is unchanged or zero, pixels change only there.
    hidden = (b.part_mask > 0) & (a.part_mask == 0)
    assert ((a.part_mask == b.part_mask) | (a.part_mask == 0)).all()
    changed = (xo != xf).any(1)
    assert not (changed & (a.part_mask > 0)).any()
    assert hidden.any(dim=(1, 2)).float().mean() > 0.25  # occluders do cover birds
    # Visible with occluders implies visible without; covered keypoints are invisible.
    assert not (a.visible & ~b.visible).any()
    xi = b.keypoints[..., 0].round().long().clamp(0, 63)
    yi = b.keypoints[..., 1].round().long().clamp(0, 63)
    covered = hidden[torch.arange(160)[:, None], yi, xi] & b.visible
    assert covered.sum() >= 10
    assert not a.visible[covered].any()
    assert torch.equal(a.visible, b.visible & ~covered)


def test_one_part_pairs_differ_only_in_that_part():
    ds = SyntheticParts(64, seed=6, num_classes=12)
    idx = np.arange(24)
    for a, b, group in ds.pairs_differing_in_one_part():
        parts = torch.tensor(ds.part_groups[group]) + 1
        xa, ba = ds._render_indices(idx, np.full(24, a), None)
        xb, bb = ds._render_indices(idx, np.full(24, b), None)
        region = torch.isin(ba.part_mask, parts) | torch.isin(bb.part_mask, parts)
        differ = (xa != xb).any(1)
        assert not (differ & ~region).any(), (a, b, group)
        assert torch.equal(ba.part_mask[~region], bb.part_mask[~region])
        shows = region.any(dim=(1, 2))
        assert shows.float().mean() > 0.9
        assert (differ.any(dim=(1, 2)) == shows).all(), (a, b, group)
        if group not in ("beak", "tail"):  # colour or pattern: same geometry
            assert torch.equal(ba.part_mask, bb.part_mask)
            assert torch.equal(ba.keypoints, bb.keypoints)
        if group in ("crown", "breast", "throat", "nape", "belly"):
            # A colour change shows at the part's keypoint.
            p = int(parts[0]) - 1
            vis = ba.visible[:, p]
            xi, yi = ba.keypoints[vis, p].round().long().unbind(1)
            k = torch.nonzero(vis)[:, 0]
            assert differ[k, yi, xi].all()


# ---------------------------------------------------------------- loading, CUB layout
def test_dataloader_uses_the_batched_path():
    ds = SyntheticParts(40, size=32, seed=9)
    images, labels = next(iter(DataLoader(ds, batch_size=16)))
    ref, batch = ds.render_batch(range(16))
    assert torch.equal(images, ref) and torch.equal(labels, batch.labels)
    dsa = SyntheticParts(40, size=32, seed=9, return_annotations=True)
    loader = DataLoader(dsa, batch_size=8, collate_fn=SyntheticParts.collate)
    images, labels, pb = next(iter(loader))
    assert torch.equal(images, ref[:8]) and isinstance(pb, PartBatch)
    assert torch.equal(pb.part_mask, batch.part_mask[:8])
    assert torch.equal(pb.keypoints, batch.keypoints[:8])


def _read_cub(root: Path) -> dict:
    """A small independent reader of the CUB-200-2011 text files."""

    def rows(rel: str) -> list[list[str]]:
        return [
            line.split(" ", 1)
            if rel.endswith(("images.txt", "classes.txt", "parts.txt"))
            else line.split()
            for line in (root / rel).read_text().splitlines()
        ]

    out = {
        "images": {int(i): name for i, name in rows("images.txt")},
        "classes": {int(i): name for i, name in rows("classes.txt")},
        "labels": {int(i): int(c) for i, c in rows("image_class_labels.txt")},
        "split": {int(i): int(t) for i, t in rows("train_test_split.txt")},
        "bbox": {int(r[0]): [float(v) for v in r[1:]] for r in rows("bounding_boxes.txt")},
        "parts": {int(i): name for i, name in rows("parts/parts.txt")},
        "locs": {},
    }
    for r in rows("parts/part_locs.txt"):
        out["locs"][(int(r[0]), int(r[1]))] = (float(r[2]), float(r[3]), int(r[4]))
    return out


def test_write_cub_parses_back_to_the_same_annotations(tmp_path):
    ds = SyntheticParts(23, size=32, seed=5, num_classes=4)
    ds.write_cub(tmp_path)
    cub = _read_cub(tmp_path)
    images, batch = ds.render_batch(range(23))
    assert sorted(cub["images"]) == list(range(1, 24))
    assert cub["parts"] == {p + 1: name for p, name in enumerate(CUB_PARTS)}
    assert cub["classes"] == {c + 1: f"{c + 1:03d}.{name}" for c, name in enumerate(ds.classes)}
    assert len(cub["locs"]) == 23 * 15
    for i in range(23):
        image_id = i + 1
        label = cub["labels"][image_id] - 1
        assert label == int(batch.labels[i])
        rel = cub["images"][image_id]
        assert rel.startswith(cub["classes"][label + 1] + "/")
        pixels = np.asarray(Image.open(tmp_path / "images" / rel))
        expected = (images[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(pixels, expected)
        stem = Path(rel).with_suffix(".png")
        seg = np.asarray(Image.open(tmp_path / "segmentations" / stem))
        assert np.array_equal(seg > 127, batch.object_mask[i].numpy())
        assert set(np.unique(seg)) <= {0, 255}
        parts = np.asarray(Image.open(tmp_path / "part_segmentations" / stem))
        assert np.array_equal(parts.astype(np.int64), batch.part_mask[i].numpy())
        x, y, w, h = cub["bbox"][image_id]
        assert [x, y, x + w - 1, y + h - 1] == batch.bbox[i].tolist()
        for p in range(15):
            lx, ly, vis = cub["locs"][(image_id, p + 1)]
            assert vis == int(batch.visible[i, p])
            if vis:
                assert abs(lx - float(batch.keypoints[i, p, 0])) <= 0.006
                assert abs(ly - float(batch.keypoints[i, p, 1])) <= 0.006
            else:
                assert (lx, ly) == (0.0, 0.0)
    # Class-balanced split: half of each class (rounded) trains.
    for c in range(4):
        ids = [i for i, lab in cub["labels"].items() if lab == c + 1]
        assert sum(cub["split"][i] for i in ids) == int(np.floor(0.5 * len(ids) + 0.5))


def test_write_cub_jpeg(tmp_path):
    ds = SyntheticParts(4, size=32, seed=5)
    ds.write_cub(tmp_path, n=3, image_format="jpg", train_fraction=1.0)
    cub = _read_cub(tmp_path)
    assert len(cub["images"]) == 3 and all(v == 1 for v in cub["split"].values())
    rel = cub["images"][1]
    assert rel.endswith(".jpg")
    pixels = np.asarray(Image.open(tmp_path / "images" / rel)).astype(np.float32) / 255
    assert np.abs(pixels - ds[0][0].permute(1, 2, 0).numpy()).mean() < 0.06


# ------------------------------------------------------------------ misc and errors
def test_mean_and_std_describe_the_default_dataset():
    images, _ = SyntheticParts(600, seed=0).render_batch(range(600))
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(SyntheticParts.mean), atol=0.015)
    assert torch.allclose(std, torch.tensor(SyntheticParts.std), atol=0.015)


def test_layout_scales_with_the_image_size():
    _, small = SyntheticParts(8, size=48, seed=1).render_batch(range(8))
    _, large = SyntheticParts(8, size=96, seed=1).render_batch(range(8))
    # Pose is relative to the image size: pixel centres map as x96 = 2 x48 + 0.5 roughly.
    assert torch.allclose(large.keypoints / 96, small.keypoints / 48, atol=0.015)
    assert torch.allclose(large.bbox / 96, small.bbox / 48, atol=0.04)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -3},
        {"n": 2.5},
        {"size": 16},
        {"size": 4096},
        {"num_classes": 1},
        {"num_classes": 13},
        {"seed": "zero"},
    ],
)
def test_bad_arguments_raise_input_error(kwargs):
    with pytest.raises(InputError):
        SyntheticParts(**kwargs)


def test_bad_indices_and_options(tmp_path):
    ds = SyntheticParts(5, size=32)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(InputError):
        ds.render_batch([0, 5])
    with pytest.raises(InputError):
        ds.render_batch([[0, 1]])
    with pytest.raises(InputError):
        ds.write_cub(tmp_path, train_fraction=1.5)
    with pytest.raises(InputError):
        ds.write_cub(tmp_path, n=6)
    with pytest.raises(InputError):
        ds.write_cub(tmp_path, image_format="gif")
    images, batch = ds.render_batch([])
    assert images.shape == (0, 3, 32, 32) and len(batch) == 0
