"""User image folders with ground truth: the CUB-200-2011 layout and image + mask pairs.

:class:`CUBFolder` reads a folder laid out like CUB-200-2011 (Wah et al., 2011)::

    <root>/images.txt               <image_id> <image_name>          (path under images/)
    <root>/classes.txt              <class_id> <class_name>
    <root>/image_class_labels.txt   <image_id> <class_id>
    <root>/train_test_split.txt     <image_id> <is_training_image>   (1 train, 0 test)
    <root>/bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    <root>/parts/parts.txt          <part_id> <part_name>            (names may hold spaces)
    <root>/parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>
    <root>/images/<image_name>
    <root>/segmentations/<image_name with .png>   (optional, distributed separately)
    <root>/part_segmentations/<image_name with .png>   (optional, not in CUB: 0 = no part,
                                    k = part id k; written by ``SyntheticParts.write_cub``)

Ids are 1-based. CUB's README gives part locations as "the pixel location of the center of
the part" and boxes as ``x y width height`` "in pixels" without naming an origin; like most
loaders (and ``SyntheticParts.write_cub``) we read them as pixel coordinates with the centre
of the top-left pixel at ``(0, 0)``, the toolkit's frame (:mod:`xnn_toolkit.data.types`):
keypoint ``(x, y)``, box ``(x, y, x + width - 1, y + height - 1)`` inclusive. Pass
``one_based=True`` for files in the MATLAB convention (top-left pixel centre ``(1, 1)``): then
1 is subtracted from every coordinate.

:class:`MaskFolder` pairs images with masks of the same file stem; a mask is either an object
mask (non-zero = object) or a part label map (``0`` = no part, ``p + 1`` = part ``p``).

Resizing (``size=``) rescales images bilinearly (with antialiasing), masks by nearest
neighbour at pixel centres, and keypoints and boxes with the same half-pixel-centred map
(``x' = (x + 0.5) * W'/W - 0.5``; a box's pixel extent ``[x0, x1 + 1)`` maps to
``[x0 * s, (x1 + 1) * s)``), so annotations stay on the pixels they marked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import AssetError, InputError
from .types import PartAnnotation, PartBatch, collate_annotations

__all__ = ["CUBFolder", "MaskFolder", "collate_samples", "IMAGE_EXTENSIONS"]

#: File endings treated as images by :class:`MaskFolder`.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

Size = int | tuple[int, int]


# ------------------------------------------------------------------------- shared helpers


def _size_hw(size: Size | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        hw = (size, size)
    elif isinstance(size, Sequence) and len(size) == 2:
        hw = (int(size[0]), int(size[1]))
    else:
        raise InputError(f"size must be an int or (height, width), got {size!r}")
    if min(hw) < 1:
        raise InputError(f"size must be positive, got {size!r}")
    return hw


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
        return img
    except FileNotFoundError:
        raise AssetError(f"image file {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise AssetError(f"{path} is not a readable image ({exc})") from exc


def _load_rgb(path: Path) -> torch.Tensor:
    """``3 x H x W`` float32 in [0, 1]."""
    arr = np.asarray(_open(path).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _load_gray(path: Path) -> np.ndarray:
    """A single-channel mask as an ``H x W`` integer array (palette indices for mode P)."""
    img = _open(path)
    if img.mode in ("RGB", "RGBA"):
        arr = np.asarray(img.convert("RGB"))
        if not (arr == arr[..., :1]).all():
            raise AssetError(
                f"mask {path} is a colour image; expected one channel (mode L, P, 1 or I) "
                "holding labels, or RGB with equal channels"
            )
        return arr[..., 0].astype(np.int64)
    if img.mode == "LA":
        img = img.getchannel("L")
    if img.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        raise AssetError(f"mask {path} has unsupported mode {img.mode}; expected L, P, 1 or I")
    return np.asarray(img).astype(np.int64)


def _resize_image(img: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    if hw is None or tuple(img.shape[-2:]) == hw:
        return img
    out = F.interpolate(img[None], size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp_(0.0, 1.0)


def _resize_nearest(mask: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    """Nearest neighbour at pixel centres for ``H x W`` label maps (any dtype)."""
    if hw is None or tuple(mask.shape) == hw:
        return mask
    out = F.interpolate(mask[None, None].float(), size=hw, mode="nearest-exact")
    return out[0, 0].to(mask.dtype)


def _scale_points(xy: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Pixel-centre coordinates ``(x, y)`` under a resize by ``(sx, sy)``."""
    s = torch.tensor([sx, sy], dtype=xy.dtype)
    return (xy + 0.5) * s - 0.5


def _scale_box(box: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Inclusive box ``(x0, y0, x1, y1)``: the extent ``[x0, x1 + 1)`` scales exactly."""
    s = torch.tensor([sx, sy, sx, sy], dtype=box.dtype)
    one = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=box.dtype)
    return (box + one) * s - one


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    """Tight inclusive box of the true pixels; ``(0, 0, -1, -1)`` (zero area) when empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        return torch.tensor([0.0, 0.0, -1.0, -1.0])
    return torch.tensor([xs.min(), ys.min(), xs.max(), ys.max()], dtype=torch.float32)


def collate_samples(
    batch: Sequence[tuple],
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, PartBatch]:
    """``collate_fn`` for a DataLoader over :class:`CUBFolder` / :class:`MaskFolder`.

    Parameters
    ----------
    batch : sequence of (image, label) or (image, label, PartAnnotation)
        Images of one size (use ``size=`` on the dataset).

    Returns
    -------
    (images, labels) or (images, labels, PartBatch)
        ``N x C x H x W`` float, ``N`` int64 and the stacked annotations.
    """
    images = torch.stack([b[0] for b in batch])
    labels = torch.tensor([int(b[1]) for b in batch], dtype=torch.long)
    if len(batch[0]) == 2:
        return images, labels
    return images, labels, collate_annotations([b[2] for b in batch])


# ------------------------------------------------------------------------------ CUB layout


def _read_table(path: Path, ncols: int, what: str) -> list[list[str]]:
    """Rows of a whitespace-separated file; the last column takes the rest of the line."""
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; a CUB-200-2011 folder needs it ({what}). "
            "Point root= at the folder that holds images.txt and images/"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=ncols - 1)
            if len(parts) != ncols:
                raise AssetError(
                    f"{path}:{lineno}: expected {ncols} fields ({what}), got {line.strip()!r}"
                )
            rows.append(parts)
    return rows


def _int(path: Path, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AssetError(f"{path}: {value!r} is not an integer id") from None


def _float(path: Path, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise AssetError(f"{path}: {value!r} is not a number") from None


def _id_map(path: Path, rows: list[list[str]], ids: Sequence[int]) -> dict[int, list[str]]:
    """Map image id to the rest of its row, checking the ids are exactly ``ids``."""
    out: dict[int, list[str]] = {}
    for r in rows:
        i = _int(path, r[0])
        if i in out:
            raise AssetError(f"{path}: image id {i} appears twice")
        out[i] = r[1:]
    want = set(ids)
    extra, missing = sorted(set(out) - want), sorted(want - set(out))
    if extra or missing:
        raise AssetError(
            f"{path} does not match images.txt: "
            + (f"ids not in images.txt: {extra[:5]}" if extra else "")
            + ("; " if extra and missing else "")
            + (f"ids of images.txt missing here: {missing[:5]}" if missing else "")
            + (" (and more)" if len(extra) > 5 or len(missing) > 5 else "")
        )
    return out


@dataclass
class _CUBRecord:
    image_id: int
    name: str
    label: int
    is_train: bool
    bbox: tuple[float, float, float, float] | None  # file units: x, y, width, height
    parts: np.ndarray | None  # P x 3: x, y, visible (file units)


class CUBFolder(Dataset):
    """Images with labels, part keypoints, boxes and optional masks in the CUB-200-2011 layout.

    Parameters
    ----------
    root : path
        The folder that holds ``images.txt`` (e.g. ``.../CUB_200_2011``).
    split : {"all", "train", "test"}
        Which images, by ``train_test_split.txt`` (needed only for "train" / "test").
    annotations : bool
        Return ``(image, label, PartAnnotation)`` instead of ``(image, label)``; needs
        ``bounding_boxes.txt`` and ``parts/`` (and uses ``segmentations/`` when present).
    size : int or (int, int), optional
        Resize every image to ``size`` x ``size`` (or ``(H, W)``); annotations follow.
    transform : callable, optional
        Applied to the ``3 x H x W`` image tensor after resizing. It must not move pixels
        (no crops, flips or affine maps), or the annotations no longer match.
    segmentations : str or None
        Folder name under ``root`` of the object masks (``<image_name>.png``, grey levels);
        ``None`` ignores them. Used when the folder exists.
    part_segmentations : str or None
        Folder name under ``root`` of part label maps (``<image_name>.png``, ``0`` = no part,
        ``k`` = part id ``k``, i.e. ``part_mask`` value ``p + 1`` for part ``p``); used when
        the folder exists.
    seg_threshold : float
        A pixel is object where its mask value exceeds ``seg_threshold * 255``.
    one_based : bool
        Coordinates in the files are 1-based (MATLAB convention); default 0-based.

    Attributes
    ----------
    classes : list of str
        Class names, index = label (labels are 0-based, in the order of ``classes.txt`` ids).
    part_names : list of str
        Part names, index = part (empty without ``parts/parts.txt``).
    image_ids : list of int
        The CUB id of each sample.
    samples : list of (pathlib.Path, int)
        Image path and label of each sample.

    Raises
    ------
    AssetError
        Missing or malformed files, or ids that do not match across files.
    """

    #: images are float in [0, 1], not normalised (see :mod:`xnn_toolkit.datafit`)
    image_space = "raw"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "all",
        annotations: bool = False,
        size: Size | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        segmentations: str | None = "segmentations",
        part_segmentations: str | None = "part_segmentations",
        seg_threshold: float = 0.5,
        one_based: bool = False,
    ) -> None:
        if split not in ("all", "train", "test"):
            raise InputError(f"split must be 'all', 'train' or 'test', got {split!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise AssetError(f"CUB root {self.root} is not a folder")
        self.split = split
        self.annotations = annotations
        self.size = _size_hw(size)
        self.transform = transform
        self.seg_threshold = float(seg_threshold)
        self.offset = 1.0 if one_based else 0.0
        seg_dir = self.root / segmentations if segmentations else None
        self.seg_dir = seg_dir if seg_dir is not None and seg_dir.is_dir() else None
        part_dir = self.root / part_segmentations if part_segmentations else None
        self.part_dir = part_dir if part_dir is not None and part_dir.is_dir() else None

        r = self.root
        images = _read_table(r / "images.txt", 2, "<image_id> <image_name>")
        ids = [_int(r / "images.txt", row[0]) for row in images]
        if len(set(ids)) != len(ids):
            raise AssetError(f"{r / 'images.txt'} lists an image id twice")
        names = {i: row[1].strip() for i, row in zip(ids, images)}

        cls_rows = _read_table(r / "classes.txt", 2, "<class_id> <class_name>")
        class_ids = [_int(r / "classes.txt", c[0]) for c in cls_rows]
        if len(set(class_ids)) != len(class_ids):
            raise AssetError(f"{r / 'classes.txt'} lists a class id twice")
        order = sorted(range(len(class_ids)), key=lambda k: class_ids[k])
        self.classes = [cls_rows[k][1].strip() for k in order]
        label_of = {class_ids[k]: n for n, k in enumerate(order)}

        p = r / "image_class_labels.txt"
        labels = _id_map(p, _read_table(p, 2, "<image_id> <class_id>"), ids)
        lab: dict[int, int] = {}
        for i, (c,) in labels.items():
            cid = _int(p, c)
            if cid not in label_of:
                raise AssetError(f"{p}: image {i} has class id {cid}, not in classes.txt")
            lab[i] = label_of[cid]

        train: dict[int, bool] = {}
        if split != "all":
            p = r / "train_test_split.txt"
            for i, (v,) in _id_map(
                p, _read_table(p, 2, "<image_id> <is_training_image>"), ids
            ).items():
                if v.strip() not in ("0", "1"):
                    raise AssetError(
                        f"{p}: image {i} has is_training_image {v.strip()!r}, expected 0 or 1"
                    )
                train[i] = v.strip() == "1"

        self.part_names: list[str] = []
        boxes: dict[int, tuple[float, float, float, float]] = {}
        parts: dict[int, np.ndarray] = {}
        if annotations:
            p = r / "bounding_boxes.txt"
            for i, vals in _id_map(
                p, _read_table(p, 5, "<image_id> <x> <y> <width> <height>"), ids
            ).items():
                boxes[i] = tuple(_float(p, v) for v in vals)  # type: ignore[assignment]
            parts = self._read_parts(ids)

        keep = [i for i in ids if split == "all" or train[i] == (split == "train")]
        self.records = [
            _CUBRecord(i, names[i], lab[i], train.get(i, True), boxes.get(i), parts.get(i))
            for i in keep
        ]
        self.image_ids = [rec.image_id for rec in self.records]
        self.samples = [(r / "images" / rec.name, rec.label) for rec in self.records]

    def _read_parts(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        r = self.root
        p = r / "parts" / "parts.txt"
        rows = _read_table(p, 2, "<part_id> <part_name>")
        pids = [_int(p, row[0]) for row in rows]
        if sorted(pids) != list(range(1, len(pids) + 1)):
            raise AssetError(f"{p}: part ids must be 1..{len(pids)}, got {sorted(pids)}")
        self.part_names = [name.strip() for _, name in sorted(zip(pids, (q[1] for q in rows)))]
        n_parts = len(pids)
        p = r / "parts" / "part_locs.txt"
        rows = _read_table(p, 5, "<image_id> <part_id> <x> <y> <visible>")
        known = set(ids)
        locs = {i: np.full((n_parts, 3), np.nan) for i in ids}
        for row in rows:
            i, k = _int(p, row[0]), _int(p, row[1])
            if i not in known:
                raise AssetError(f"{p}: image id {i} is not in images.txt")
            if not 1 <= k <= n_parts:
                raise AssetError(
                    f"{p}: part id {k} of image {i} is not in parts/parts.txt (1..{n_parts})"
                )
            if not np.isnan(locs[i][k - 1, 0]):
                raise AssetError(f"{p}: part {k} of image {i} appears twice")
            locs[i][k - 1] = [_float(p, row[2]), _float(p, row[3]), _float(p, row[4])]
        for i, a in locs.items():
            if np.isnan(a[:, 0]).any():
                missing = [int(k) + 1 for k in np.flatnonzero(np.isnan(a[:, 0]))]
                raise AssetError(
                    f"{p}: image {i} lacks rows for part ids {missing[:5]}; "
                    f"every image needs all {n_parts} parts"
                )
        return locs

    def __len__(self) -> int:
        return len(self.records)

    def _annotation(self, index: int, image_hw: tuple[int, int]) -> PartAnnotation:
        """The ground truth of sample ``index`` for an original image of size ``image_hw``.

        Parameters
        ----------
        index : int
        image_hw : (int, int)
            Height and width of the image file.

        Returns
        -------
        PartAnnotation
            In the pixel frame of the returned (possibly resized) image; keypoints of
            invisible parts are ``(0, 0)``.
        """
        if not self.annotations:
            raise InputError("this CUBFolder was built with annotations=False")
        rec = self.records[index]
        h, w = image_hw
        oh, ow = self.size or (h, w)
        sx, sy = ow / w, oh / h
        x, y, bw, bh = rec.bbox
        o = self.offset
        bbox = torch.tensor([x - o, y - o, x - o + bw - 1, y - o + bh - 1], dtype=torch.float32)
        pts = torch.from_numpy(rec.parts).float()
        visible = pts[:, 2] > 0
        kp = pts[:, :2] - o
        if self.size is not None:
            bbox = _scale_box(bbox, sx, sy)
            kp = _scale_points(kp, sx, sy)
        kp = torch.where(visible[:, None], kp, torch.zeros_like(kp))
        obj = None
        if self.seg_dir is not None:
            path = (self.seg_dir / rec.name).with_suffix(".png")
            seg = torch.from_numpy(_load_gray(path)).float()
            if tuple(seg.shape) != (h, w):
                raise AssetError(
                    f"segmentation {path} is {tuple(seg.shape)}, its image is "
                    f"{(h, w)}; expected the same size"
                )
            if self.size is not None:  # resize the soft mask, then threshold
                seg = F.interpolate(
                    seg[None, None],
                    size=self.size,
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )[0, 0]
            obj = seg > self.seg_threshold * 255.0
        part = None
        if self.part_dir is not None:
            path = (self.part_dir / rec.name).with_suffix(".png")
            part = torch.from_numpy(_load_gray(path))
            if tuple(part.shape) != (h, w):
                raise AssetError(
                    f"part segmentation {path} is {tuple(part.shape)}, its image "
                    f"is {(h, w)}; expected the same size"
                )
            if int(part.max()) > len(self.part_names) or int(part.min()) < 0:
                raise AssetError(
                    f"part segmentation {path} has label {int(part.max())}; "
                    f"parts/parts.txt has ids 1..{len(self.part_names)}"
                )
            part = _resize_nearest(part, self.size)
        return PartAnnotation(
            label=rec.label,
            keypoints=kp,
            visible=visible,
            bbox=bbox,
            part_mask=part,
            object_mask=obj,
        )

    def __getitem__(self, index: int):
        """``(image, label)`` or ``(image, label, PartAnnotation)``; image ``3 x H x W``."""
        path, label = self.samples[index]
        img = _load_rgb(path)
        hw = (int(img.shape[1]), int(img.shape[2]))
        img = _resize_image(img, self.size)
        if self.transform is not None:
            img = self.transform(img)
        if not self.annotations:
            return img, label
        return img, label, self._annotation(index, hw)

    def __repr__(self) -> str:
        return (
            f"CUBFolder(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, parts={len(self.part_names)})"
        )


# ---------------------------------------------------------------------------- image + mask


def _index_by_stem(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise AssetError(f"{what} folder {folder} does not exist")
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            if p.stem in out:
                raise AssetError(
                    f"two {what} files share the stem {p.stem!r}: {out[p.stem]} and {p}; "
                    "images and masks are matched by file stem, which must be unique"
                )
            out[p.stem] = p
    return out


class MaskFolder(Dataset):
    """Images paired with object masks or part label maps of the same file stem.

    Parameters
    ----------
    images_dir : path
        Images (searched recursively). With class sub-folders (``images_dir/<class>/x.jpg``)
        the sub-folder names are the classes, sorted; otherwise labels come from ``labels``.
    masks_dir : path
        Masks, searched recursively, matched to images by file stem (``x.jpg`` <-> ``x.png``).
    kind : {"object", "parts"}
        ``"object"``: a pixel is object where its value exceeds ``threshold``.
        ``"parts"``: values are part labels (``0`` none, ``p + 1`` part ``p``); the object
        mask is their union; each part's keypoint is the centroid of its pixels.
    part_names : sequence of str, optional
        For ``kind="parts"``: the names of parts ``0..P-1``. When omitted, ``P`` is the largest
        label found in all masks (read once here) and names are ``"part1"``, ...
    labels : mapping of str to int, or callable, optional
        Label of each image by stem (``labels[stem]`` or ``labels(stem)``); overrides class
        sub-folders. Without both, every label is ``-1``.
    size : int or (int, int), optional
        Resize images (bilinear) and masks (nearest) to this size.
    transform : callable, optional
        Applied to the ``3 x H x W`` image tensor; it must not move pixels.
    annotations : bool
        Return ``(image, label, PartAnnotation)`` (default) or ``(image, label)``.
    threshold : int
        For ``kind="object"``: raw mask values above it are object (0 suits 0/1 and 0/255
        masks; use 127 for soft 8-bit masks).
    missing : {"error", "skip"}
        What to do with images that have no mask.

    Attributes
    ----------
    classes : list of str
        Class names when labels come from sub-folders, else empty.
    part_names : list of str
    samples : list of (pathlib.Path, pathlib.Path, int)
        Image path, mask path and label.

    Raises
    ------
    AssetError
        Missing folders, images without masks (``missing="error"``), duplicate stems, masks of
        another size than their image, or part labels above ``len(part_names)``.
    """

    #: images are float in [0, 1], not normalised (see :mod:`xnn_toolkit.datafit`)
    image_space = "raw"

    def __init__(
        self,
        images_dir: str | os.PathLike,
        masks_dir: str | os.PathLike,
        kind: str = "object",
        part_names: Sequence[str] | None = None,
        labels: Mapping[str, int] | Callable[[str], int] | None = None,
        size: Size | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        annotations: bool = True,
        threshold: int = 0,
        missing: str = "error",
    ) -> None:
        if kind not in ("object", "parts"):
            raise InputError(f"kind must be 'object' or 'parts', got {kind!r}")
        if missing not in ("error", "skip"):
            raise InputError(f"missing must be 'error' or 'skip', got {missing!r}")
        self.images_dir, self.masks_dir = Path(images_dir), Path(masks_dir)
        self.kind = kind
        self.size = _size_hw(size)
        self.transform = transform
        self.annotations = annotations
        self.threshold = threshold
        images = _index_by_stem(self.images_dir, "image")
        masks = _index_by_stem(self.masks_dir, "mask")
        if not images:
            raise AssetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.images_dir}")
        lonely = [s for s in images if s not in masks]
        if lonely and missing == "error":
            raise AssetError(
                f"{len(lonely)} image(s) have no mask with the same stem in {self.masks_dir}, "
                f"e.g. {images[lonely[0]].name}; add them or pass missing='skip'"
            )
        stems = [s for s in images if s in masks]
        if not stems:
            raise AssetError(f"no image in {self.images_dir} has a mask in {self.masks_dir}")

        subdirs = {s: images[s].parent.relative_to(self.images_dir) for s in stems}
        self.classes: list[str] = []
        if labels is None and all(len(d.parts) >= 1 for d in subdirs.values()):
            self.classes = sorted({d.parts[0] for d in subdirs.values()})
        index = {c: k for k, c in enumerate(self.classes)}

        def label_of(stem: str) -> int:
            if labels is None:
                return index[subdirs[stem].parts[0]] if self.classes else -1
            try:
                return int(labels(stem) if callable(labels) else labels[stem])
            except KeyError:
                raise AssetError(f"labels has no entry for image {stem!r}") from None

        self.samples = [(images[s], masks[s], label_of(s)) for s in stems]
        self.part_names: list[str] = []
        if kind == "parts":
            if part_names is None:
                top = max(int(_load_gray(m).max(initial=0)) for _, m, _ in self.samples)
                part_names = [f"part{k + 1}" for k in range(top)]
            self.part_names = [str(n) for n in part_names]

    def __len__(self) -> int:
        return len(self.samples)

    def _annotation(self, mask_path: Path, label: int, hw: tuple[int, int]) -> PartAnnotation:
        raw = torch.from_numpy(_load_gray(mask_path))
        if tuple(raw.shape) != hw:
            raise AssetError(
                f"mask {mask_path} is {tuple(raw.shape)} (H, W), its image is {hw}; "
                "expected the same size"
            )
        n_parts = len(self.part_names)
        if self.kind == "parts":
            if int(raw.max()) > n_parts or int(raw.min()) < 0:
                raise AssetError(
                    f"mask {mask_path} has label {int(raw.max())}, but there are {n_parts} "
                    "parts (labels 0..P); pass part_names= with all parts"
                )
            part = _resize_nearest(raw.long(), self.size)
            obj = part > 0
            kp = torch.zeros(n_parts, 2)
            visible = torch.zeros(n_parts, dtype=torch.bool)
            for p in range(n_parts):
                ys, xs = torch.nonzero(part == p + 1, as_tuple=True)
                if len(xs):
                    kp[p] = torch.stack([xs.float().mean(), ys.float().mean()])
                    visible[p] = True
        else:
            part = None
            obj = _resize_nearest(raw > self.threshold, self.size)
            kp = torch.zeros(0, 2)
            visible = torch.zeros(0, dtype=torch.bool)
        return PartAnnotation(
            label=label,
            keypoints=kp,
            visible=visible,
            bbox=_mask_box(obj),
            part_mask=part,
            object_mask=obj,
        )

    def __getitem__(self, index: int):
        """``(image, label, PartAnnotation)`` (or ``(image, label)``); image ``3 x H x W``."""
        img_path, mask_path, label = self.samples[index]
        img = _load_rgb(img_path)
        hw = (int(img.shape[1]), int(img.shape[2]))
        img = _resize_image(img, self.size)
        if self.transform is not None:
            img = self.transform(img)
        if not self.annotations:
            return img, label
        return img, label, self._annotation(mask_path, label, hw)

    def __repr__(self) -> str:
        return f"MaskFolder(images_dir={str(self.images_dir)!r}, kind={self.kind!r}, n={len(self)})"
