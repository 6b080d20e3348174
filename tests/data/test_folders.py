"""CUB-200-2011 layout and image + mask folders, on small fake folders built here.

Expected values are hand-computed from the CUB conventions (1-based ids and pixel
coordinates; boxes ``x y width height``) and from the half-pixel-centred resize map.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xnn_toolkit.data.folders import CUBFolder, MaskFolder, collate_samples
from xnn_toolkit.data.types import PartBatch
from xnn_toolkit.errors import AssetError, InputError

W, H = 40, 30  # every fake image is 40 wide, 30 high
PARTS = ["back", "beak", "left eye"]  # a part name with a space, as in CUB


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)


def make_cub(root: Path, segmentations: bool = False) -> dict:
    """Six images in three classes; class ids listed out of order in classes.txt."""
    classes = {3: "003.Gamma_bird", 1: "001.Alpha_bird", 2: "002.Beta_bird"}
    images = {}  # image_id -> (name, class_id, is_train)
    for i in range(1, 7):
        cid = (i - 1) % 3 + 1
        images[i] = (f"{classes[cid]}/img_{i:02d}.png", cid, i % 2)
    (root / "parts").mkdir(parents=True)
    lines = {
        "images.txt": [f"{i} {n}" for i, (n, _, _) in images.items()],
        "classes.txt": [f"{c} {n}" for c, n in classes.items()],
        "image_class_labels.txt": [f"{i} {c}" for i, (_, c, _) in images.items()],
        "train_test_split.txt": [f"{i} {t}" for i, (_, _, t) in images.items()],
        # x y width height, 1-based
        "bounding_boxes.txt": [f"{i} {3 + i}.0 5.0 10.0 {8 + i}.0" for i in images],
        "parts/parts.txt": [f"{k + 1} {n}" for k, n in enumerate(PARTS)],
        # part 3 (left eye) invisible in image 2, written as CUB does: 0 0 0
        "parts/part_locs.txt": [
            f"{i} {k} " + ("0.0 0.0 0" if (i, k) == (2, 3) else f"{10 + k + i}.0 {4 + k}.0 1")
            for i in images
            for k in (1, 2, 3)
        ],
    }
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    arrays = {}
    for i, (name, _, _) in images.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        arrays[i] = _image(i)
        Image.fromarray(arrays[i]).save(root / "images" / name)
        if segmentations:
            seg = np.zeros((H, W), np.uint8)
            seg[10:20, 8:24] = 255  # object
            seg[10:20, 24:28] = 102  # 2 of 5 annotators: below the 0.5 threshold
            out = (root / "segmentations" / name).with_suffix(".png")
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg).save(out)
    return {"images": images, "arrays": arrays}


def test_cub_labels_splits_and_pixels(tmp_path):
    info = make_cub(tmp_path)
    ds = CUBFolder(tmp_path)
    assert ds.classes == ["001.Alpha_bird", "002.Beta_bird", "003.Gamma_bird"]
    assert len(ds) == 6 and ds.image_ids == [1, 2, 3, 4, 5, 6]
    # class id c -> label c - 1 (sorted ids), whatever the order of classes.txt
    assert [lab for _, lab in ds.samples] == [0, 1, 2, 0, 1, 2]
    img, label = ds[4]
    assert label == 1 and img.shape == (3, H, W) and img.dtype == torch.float32
    ref = torch.from_numpy(info["arrays"][5]).permute(2, 0, 1).float() / 255
    assert torch.equal(img, ref)
    train = CUBFolder(tmp_path, split="train")
    test = CUBFolder(tmp_path, split="test")
    assert train.image_ids == [1, 3, 5] and test.image_ids == [2, 4, 6]
    assert "images/001.Alpha_bird/img_01.png" in str(train.samples[0][0])


def test_cub_annotations_boxes_inclusive(tmp_path):
    make_cub(tmp_path)
    ds = CUBFolder(tmp_path, annotations=True)
    assert ds.part_names == PARTS
    img, label, ann = ds[1]  # image id 2
    assert label == ann.label == 1
    # file box: x = 3 + 2 = 5, y = 5, w = 10, h = 10 -> columns 5..14, rows 5..14
    assert ann.bbox.tolist() == [5.0, 5.0, 14.0, 14.0]
    # file keypoints (10 + k + 2, 4 + k), k = 1, 2; part 3 hidden
    assert ann.visible.tolist() == [True, True, False]
    assert ann.keypoints.tolist() == [[13.0, 5.0], [14.0, 6.0], [0.0, 0.0]]
    assert ann.part_mask is None and ann.object_mask is None
    # MATLAB-style files: 1 is subtracted from every coordinate
    one = CUBFolder(tmp_path, annotations=True, one_based=True)[1][2]
    assert one.bbox.tolist() == [4.0, 4.0, 13.0, 13.0]
    assert one.keypoints.tolist() == [[12.0, 4.0], [13.0, 5.0], [0.0, 0.0]]


def test_cub_resize_moves_annotations_with_pixels(tmp_path):
    make_cub(tmp_path, segmentations=True)
    ds = CUBFolder(tmp_path, annotations=True, size=(15, 20), one_based=True)  # s = 0.5
    img, _, ann = ds[1]
    assert img.shape == (3, 15, 20)
    # box columns 4..13 -> extent [4, 14) * 0.5 = [2, 7) -> 2..6; rows the same
    assert ann.bbox.tolist() == [2.0, 2.0, 6.0, 6.0]
    # keypoint x' = (x + 0.5) * 0.5 - 0.5: 12 -> 5.75, 4 -> 1.75
    assert ann.keypoints[0].tolist() == [5.75, 1.75]
    assert ann.keypoints[2].tolist() == [0.0, 0.0]  # invisible stays at 0
    # object rows 10..19, cols 8..23 at full size -> rows 5..9, cols 4..11 at half size
    expect = torch.zeros(15, 20, dtype=torch.bool)
    expect[5:10, 4:12] = True
    assert torch.equal(ann.object_mask, expect)
    # the image itself: PIL's antialiased bilinear resize (8-bit) is the oracle
    ref = np.asarray(Image.fromarray(_image(2)).resize((20, 15), Image.Resampling.BILINEAR))
    ref = torch.from_numpy(ref.copy()).permute(2, 0, 1).float() / 255
    assert (img - ref).abs().max() <= 1.01 / 255


def test_cub_segmentation_full_size_threshold(tmp_path):
    make_cub(tmp_path, segmentations=True)
    ann = CUBFolder(tmp_path, annotations=True)[0][2]
    expect = torch.zeros(H, W, dtype=torch.bool)
    expect[10:20, 8:24] = True  # the 102-valued strip is below 0.5 * 255
    assert torch.equal(ann.object_mask, expect)
    low = CUBFolder(tmp_path, annotations=True, seg_threshold=0.3)[0][2]
    assert int(low.object_mask.sum()) == int(expect.sum()) + 40


def test_cub_dataloader_collate(tmp_path):
    make_cub(tmp_path)
    ds = CUBFolder(tmp_path, annotations=True, size=32)
    images, labels, batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_samples)))
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 1, 2, 0]
    assert isinstance(batch, PartBatch) and batch.keypoints.shape == (4, 3, 2)
    plain = next(
        iter(DataLoader(CUBFolder(tmp_path, size=32), batch_size=2, collate_fn=collate_samples))
    )
    assert len(plain) == 2


def test_cub_reads_synthetic_dump_exactly(tmp_path):
    """SyntheticParts.write_cub -> CUBFolder gives back the generator's own annotations."""
    from xnn_toolkit.data import synthetic

    gen = synthetic.SyntheticParts(12, size=64, seed=1)
    gen.write_cub(tmp_path, train_fraction=0.5)
    cub = CUBFolder(tmp_path, annotations=True)
    assert len(cub) == 12 and cub.classes[0].endswith(gen.classes[0])
    assert cub.part_names == gen.part_names
    for i in range(12):
        img, label, ann = cub[i]
        ref_img, ref = gen.render(i)
        assert label == ref.label
        assert (img - ref_img).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit PNG
        assert torch.equal(ann.visible, ref.visible)
        v = ref.visible
        assert torch.allclose(ann.keypoints[v], ref.keypoints[v], atol=0.005 + 1e-5)
        assert torch.allclose(ann.bbox, ref.bbox, atol=0.05 + 1e-5)
        assert torch.equal(ann.part_mask, ref.part_mask)
        assert torch.equal(ann.object_mask, ref.object_mask)
    flags = dict(
        ln.split() for ln in (tmp_path / "train_test_split.txt").read_text().split("\n") if ln
    )
    train, test = CUBFolder(tmp_path, split="train"), CUBFolder(tmp_path, split="test")
    assert train.image_ids == [int(i) for i, f in flags.items() if f == "1"]
    assert test.image_ids == [int(i) for i, f in flags.items() if f == "0"]


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda r: (r / "images.txt").unlink(), r"images\.txt is missing"),
        (lambda r: (r / "parts" / "part_locs.txt").unlink(), r"part_locs\.txt is missing"),
        (
            lambda r: _drop_line(r / "image_class_labels.txt", 3),
            r"image_class_labels\.txt does not match images\.txt: .*missing here: \[4\]",
        ),
        (
            lambda r: _append(r / "bounding_boxes.txt", "9 1 1 2 2"),
            r"bounding_boxes\.txt does not match images\.txt: ids not in images\.txt: \[9\]",
        ),
        (
            lambda r: _append(r / "parts" / "part_locs.txt", "7 1 1 1 1"),
            r"part_locs\.txt: image id 7 is not in images\.txt",
        ),
        (
            lambda r: _append(r / "parts" / "part_locs.txt", "1 4 1 1 1"),
            r"part id 4 of image 1 is not in parts/parts\.txt",
        ),
        (
            lambda r: _drop_line(r / "parts" / "part_locs.txt", 4),
            r"image 2 lacks rows for part ids \[2\]",
        ),
        (lambda r: _append(r / "image_class_labels.txt", "1 2"), r"image id 1 appears twice"),
        (
            lambda r: _append(r / "bounding_boxes.txt", "bad line"),
            r"bounding_boxes\.txt:7: expected 5 fields",
        ),
        (
            lambda r: _replace(r / "image_class_labels.txt", "2 2", "2 8"),
            r"image 2 has class id 8, not in classes\.txt",
        ),
        (
            lambda r: _replace(r / "bounding_boxes.txt", "1 4.0", "1 four"),
            r"'four' is not a number",
        ),
    ],
)
def test_cub_errors(tmp_path, edit, pattern):
    make_cub(tmp_path)
    edit(tmp_path)
    with pytest.raises(AssetError, match=pattern):
        CUBFolder(tmp_path, annotations=True)


def test_cub_optional_files_only_when_needed(tmp_path):
    make_cub(tmp_path)
    (tmp_path / "train_test_split.txt").unlink()
    (tmp_path / "bounding_boxes.txt").unlink()
    assert len(CUBFolder(tmp_path)) == 6  # no split, no annotations: not needed
    with pytest.raises(AssetError, match="train_test_split.txt is missing"):
        CUBFolder(tmp_path, split="train")
    with pytest.raises(AssetError, match="bounding_boxes.txt is missing"):
        CUBFolder(tmp_path, annotations=True)
    with pytest.raises(InputError, match="split"):
        CUBFolder(tmp_path, split="val")
    with pytest.raises(AssetError, match="not a folder"):
        CUBFolder(tmp_path / "nowhere")
    (tmp_path / "images" / "002.Beta_bird" / "img_02.png").unlink()
    with pytest.raises(AssetError, match=re.escape("img_02.png") + " does not exist"):
        CUBFolder(tmp_path)[1]


def _drop_line(path: Path, index: int) -> None:
    lines = path.read_text().splitlines()
    del lines[index]
    path.write_text("\n".join(lines) + "\n")


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + line + "\n")


def _replace(path: Path, old: str, new: str) -> None:
    """Replace the leading ``old`` of the line that starts with it."""
    lines = [
        new + ln[len(old) :] if ln == old or ln.startswith(old + " ") else ln
        for ln in path.read_text().splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- MaskFolder


def _part_map() -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[4:8, 4:8] = 1  # part 0: rows 4..7, cols 4..7, centroid (5.5, 5.5)
    m[10:16, 20:30] = 2  # part 1: rows 10..15, cols 20..29, centroid (24.5, 12.5)
    return m


def make_masks(root: Path, kind: str = "parts") -> None:
    for cls, stems in (("cat", ["a", "b"]), ("dog", ["c"])):
        (root / "img" / cls).mkdir(parents=True, exist_ok=True)
        for s in stems:
            Image.fromarray(_image(ord(s))).save(root / "img" / cls / f"{s}.jpg", quality=95)
    (root / "msk").mkdir()
    for s in "abc":
        m = _part_map()
        if s == "c":
            m[m == 2] = 0  # part 1 absent in c
        if kind == "object":
            m = (m > 0).astype(np.uint8) * 255
        Image.fromarray(m).save(root / "msk" / f"{s}.png")


def test_mask_folder_parts(tmp_path):
    make_masks(tmp_path)
    ds = MaskFolder(tmp_path / "img", tmp_path / "msk", kind="parts")
    assert ds.classes == ["cat", "dog"] and ds.part_names == ["part1", "part2"]
    assert [lab for _, _, lab in ds.samples] == [0, 0, 1]
    img, label, ann = ds[0]
    assert img.shape == (3, H, W) and label == 0
    assert torch.equal(ann.part_mask, torch.from_numpy(_part_map()).long())
    assert torch.equal(ann.object_mask, torch.from_numpy(_part_map() > 0))
    assert ann.keypoints.tolist() == [[5.5, 5.5], [24.5, 12.5]]
    assert ann.visible.tolist() == [True, True]
    assert ann.bbox.tolist() == [4.0, 4.0, 29.0, 15.0]
    c = ds[2][2]
    assert c.visible.tolist() == [True, False] and c.bbox.tolist() == [4.0, 4.0, 7.0, 7.0]


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_mask_folder_resize_agrees_with_point_and_box_maps(tmp_path, scale):
    make_masks(tmp_path)
    full = MaskFolder(tmp_path / "img", tmp_path / "msk", kind="parts")[0][2]
    size = (int(H * scale), int(W * scale))
    small = MaskFolder(tmp_path / "img", tmp_path / "msk", kind="parts", size=size)[0][2]
    assert small.part_mask.shape == size
    # centroid of the resized mask == the keypoint map applied to the full-size centroid
    mapped = (full.keypoints + 0.5) * scale - 0.5
    assert torch.allclose(small.keypoints, mapped)
    # box of the resized mask == extent map [x0, x1 + 1) * s of the full-size box
    x0, y0, x1, y1 = full.bbox.tolist()
    assert small.bbox.tolist() == [
        x0 * scale,
        y0 * scale,
        (x1 + 1) * scale - 1,
        (y1 + 1) * scale - 1,
    ]


def test_mask_folder_object_and_labels(tmp_path):
    make_masks(tmp_path, kind="object")
    ds = MaskFolder(tmp_path / "img", tmp_path / "msk", labels={"a": 5, "b": 6, "c": 7})
    assert ds.classes == [] and [lab for _, _, lab in ds.samples] == [5, 6, 7]
    _, label, ann = ds[0]
    assert label == 5 and ann.part_mask is None and ann.keypoints.shape == (0, 2)
    assert torch.equal(ann.object_mask, torch.from_numpy(_part_map() > 0))
    plain = MaskFolder(
        tmp_path / "img", tmp_path / "msk", annotations=False, labels=lambda s: ord(s)
    )
    assert len(plain[1]) == 2 and plain[1][1] == ord("b")
    with pytest.raises(AssetError, match="no entry for image"):
        MaskFolder(tmp_path / "img", tmp_path / "msk", labels={"a": 1})


def test_mask_folder_errors(tmp_path):
    make_masks(tmp_path)
    (tmp_path / "msk" / "b.png").unlink()
    with pytest.raises(AssetError, match=r"1 image\(s\) have no mask.*b\.jpg.*missing='skip'"):
        MaskFolder(tmp_path / "img", tmp_path / "msk")
    assert len(MaskFolder(tmp_path / "img", tmp_path / "msk", missing="skip")) == 2
    with pytest.raises(AssetError, match="does not exist"):
        MaskFolder(tmp_path / "img", tmp_path / "nope")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "img" / "dog" / "a.png")
    with pytest.raises(AssetError, match="share the stem 'a'"):
        MaskFolder(tmp_path / "img", tmp_path / "msk", missing="skip")
    (tmp_path / "img" / "dog" / "a.png").unlink()
    Image.fromarray(np.full((H, W), 3, np.uint8)).save(tmp_path / "msk" / "a.png")
    ds = MaskFolder(
        tmp_path / "img", tmp_path / "msk", kind="parts", part_names=["x", "y"], missing="skip"
    )
    with pytest.raises(AssetError, match="has label 3, but there are 2 parts"):
        ds[0]
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(tmp_path / "msk" / "a.png")
    with pytest.raises(AssetError, match=r"is \(31, 40\) \(H, W\), its image is \(30, 40\)"):
        ds[0]
    Image.fromarray(_image(1)).save(tmp_path / "msk" / "a.png")
    with pytest.raises(AssetError, match="colour image"):
        ds[0]
    with pytest.raises(InputError, match="kind"):
        MaskFolder(tmp_path / "img", tmp_path / "msk", kind="boxes")
    with pytest.raises(InputError, match="size"):
        MaskFolder(tmp_path / "img", tmp_path / "msk", size=(1, 2, 3), missing="skip")
