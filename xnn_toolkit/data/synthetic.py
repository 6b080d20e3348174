"""The synthetic part-annotated bird dataset: the toolkit's ground truth.

Procedural images of bird-like objects assembled from CUB-200-2011's fifteen named parts,
on cluttered textured backgrounds, with random pose (position, scale, rotation, mirror),
distractor shapes and occluding branches. Classes are defined by the attributes of given
parts (colour, shape and pattern), and several class pairs differ in one part only, so
the parts that make each class are known by construction (DESIGN.md, "Embedded
default"). Each sample carries its label, part keypoints with visibility, the object's
bounding box, a per-pixel part segmentation, the object mask and the class-defining parts
(:class:`~xnn_toolkit.data.types.PartAnnotation`), which is what the locality, Voronoi,
pointing and localization metrics (:doc:`/methods/metrics`) are checked against.

Sample ``i`` of ``SyntheticParts(seed=s)`` depends only on ``(s, i)`` and on the rendering
options (``size``, ``num_classes``, ``clutter``, ``occlusion``, ``distractors``): not on
``n``, nor on access order, nor on batching. The convention of the toolkit is **train seed
0, test seed 1** (:attr:`SyntheticParts.TRAIN_SEED`, :attr:`SyntheticParts.TEST_SEED`).

Exact definitions of the annotations (see also ``_render``):

- ``part_mask`` shows each part only where it is visible: pixels hidden by a nearer part of
  the bird or by an occluder, or outside the image, show the nearer thing (``0`` for
  occluders and background);
- ``object_mask`` is ``part_mask > 0``: the bird's visible pixels;
- ``bbox`` ``(x0, y0, x1, y1)`` is the tight inclusive box of the bird's silhouette before
  occluders are drawn (as an annotator boxes a partly hidden bird), clipped to the image;
  with ``occlusion=False`` it is the tight box of ``object_mask``;
- keypoint ``p`` is visible iff its nearest pixel ``(round(x), round(y))`` is inside the
  image and shows part ``p``; so a keypoint under an occluder, behind a nearer part or
  outside the image is invisible. Coordinates are still given where invisible. The far eye
  is always hidden by the head;
- the bird faces right unless mirrored and shows its right side (as a bird photographed in
  profile does): mirroring swaps which wing, eye and leg are called left and right.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AssetError, InputError
from . import _render
from ._counter_rng import uniforms
from ._species import (
    BEAK_SHAPES,
    COLOUR_SLOTS,
    PALETTE,
    PART_GROUPS,
    PART_NAMES,
    SPECIES,
    TAIL_SHAPES,
    WING_PATTERNS,
    class_parts,
    one_part_pairs,
)
from .types import PartAnnotation, PartBatch, collate_annotations

__all__ = ["SyntheticParts"]

_MIN_SIZE, _MAX_SIZE = 32, 1024
_CHUNK = 64  # images rendered together: large enough to amortise, small enough for cache

# Uniform slots per sample; a rendering option never moves another option's slots, so
# switching e.g. occlusion off leaves every other pixel of a sample unchanged.
_SLOTS = 128
_S_SCALE, _S_ANGLE, _S_FLIP, _S_X, _S_Y, _S_BRIGHT = 0, 1, 2, 3, 4, 5
_S_ASPECT = 6
_S_COLOUR = 11  # 3 per colour slot
_S_BG = _S_COLOUR + 3 * len(COLOUR_SLOTS)  # 6: two colours
_S_GRATING = _S_BG + 6  # 6: two gratings (frequency, orientation, phase)
_S_NOISE = _S_GRATING + 6  # 3: offset x, offset y, amplitude
_S_DISTRACT = _S_NOISE + 3  # 12 per distractor
_S_OCCLUDE = _S_DISTRACT + 12 * _render.NUM_DISTRACTORS  # 1 count + 7 per occluder
assert _S_OCCLUDE + 1 + 7 * _render.NUM_OCCLUDERS <= _SLOTS

_SCALE_RANGE = (0.36, 0.48)  # pixels per bird unit, as a fraction of the image size
_MAX_ASPECT = 0.08  # u and v scales differ by up to this factor
_MIN_TEMPLATE_RES = 64.0  # texels per bird unit
_MAX_ANGLE_DEG = 25.0
_NOISE_TILE = 128
_NOISE_TILE_SEED = 0x5EED


def _check_int(name: str, value: object, lo: int, hi: int | None, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InputError(f"{name} must be an int, got {type(value).__name__}; {hint}")
    v = int(value)
    if v < lo or (hi is not None and v > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise InputError(f"{name} must be {rng}, got {v}; {hint}")
    return v


class SyntheticParts(Dataset):
    """Synthetic part-annotated birds with ground truth for every pixel and part.

    Parameters
    ----------
    n : int
        Number of samples (``>= 1``). Sample ``i`` does not depend on ``n``.
    size : int
        Image height and width in pixels, in ``[32, 1024]``.
    seed : int
        Stream seed; sample ``i`` depends only on ``(seed, i)`` (and the options below).
        Use :attr:`TRAIN_SEED` (0) for training and :attr:`TEST_SEED` (1) for testing.
    num_classes : int
        Number of species, in ``[2, 12]``; the first ``num_classes`` of the catalogue
        (10 by default). Labels are balanced: ``label(i) = i % num_classes``.
    clutter : bool
        Textured background with pixel noise; otherwise a flat background, no noise.
    occlusion : bool
        Up to two branches drawn in front of the bird (half of the images have none).
    distractors : bool
        Up to three shapes drawn on the background, often in the birds' colours.
    return_annotations : bool
        ``__getitem__`` returns ``(image, label, PartAnnotation)`` instead of
        ``(image, label)``.

    Attributes
    ----------
    classes : list of str
        Species names, ``num_classes`` of them.
    part_names : list of str
        The 15 part names, in CUB-200-2011 order (part ``p`` is CUB part id ``p + 1``).
    part_groups : dict of str to tuple of int
        Part groups that carry attributes; paired parts share theirs (``"wings"`` is the
        left and the right wing).
    class_parts : dict of int to tuple of int
        For each class, the parts whose attributes differ from its nearest neighbour
        classes (fewest differing part groups), i.e. the parts that distinguish it.
    mean, std : tuple of float
        Per-channel statistics of the default dataset (see :attr:`mean`).

    Notes
    -----
    The classes come in four families (warblers, gulls, finches, sparrows) whose members
    differ in one part group: crown colour, beak shape, wing pattern, tail shape, breast,
    throat, nape or belly colour; see :meth:`pairs_differing_in_one_part`. Each family
    differs from the others in many parts. Rendering is vectorised (``render_batch``); a
    :class:`~torch.utils.data.DataLoader` uses the fast path through ``__getitems__``.

    Examples
    --------
    >>> train = SyntheticParts(10000, seed=SyntheticParts.TRAIN_SEED)
    >>> image, label = train[0]
    >>> images, batch = train.render_batch(range(64))   # 64 x 3 x 64 x 64, PartBatch
    """

    TRAIN_SEED = 0
    TEST_SEED = 1
    #: images are float in [0, 1], not normalised (see :mod:`xnn_toolkit.datafit`)
    image_space = "raw"

    #: Per-channel mean and standard deviation of images of ``SyntheticParts(seed=0)``
    #: with default options, measured once over its first 20 000 images (64 x 64) by
    #: ``bench/synthetic.py --stats``; use them to normalise the models' inputs.
    mean: tuple[float, float, float] = (0.5015, 0.4905, 0.4696)
    std: tuple[float, float, float] = (0.2158, 0.2097, 0.2240)

    def __init__(
        self,
        n: int = 1000,
        size: int = 64,
        seed: int = 0,
        *,
        num_classes: int = 10,
        clutter: bool = True,
        occlusion: bool = True,
        distractors: bool = True,
        return_annotations: bool = False,
    ) -> None:
        self.n = _check_int("n", n, 1, None, "ask for at least one sample")
        self.size = _check_int(
            "size", size, _MIN_SIZE, _MAX_SIZE, "parts of birds smaller than 32 px vanish"
        )
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
            raise InputError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.num_classes = _check_int(
            "num_classes",
            num_classes,
            2,
            len(SPECIES),
            f"the catalogue has {len(SPECIES)} species",
        )
        self.clutter = bool(clutter)
        self.occlusion = bool(occlusion)
        self.distractors = bool(distractors)
        self.return_annotations = bool(return_annotations)
        self._species = SPECIES[: self.num_classes]
        self.classes: list[str] = [s.name for s in self._species]
        self.part_names: list[str] = list(PART_NAMES)
        self.part_groups: dict[str, tuple[int, ...]] = dict(PART_GROUPS)
        self.class_parts: dict[int, tuple[int, ...]] = class_parts(self._species)
        # Each distinct species geometry is drawn once into a template; colours are
        # looked up per image.
        shapes = [
            _render.BirdShape(
                BEAK_SHAPES[s.beak_shape],
                TAIL_SHAPES[s.tail_shape],
                WING_PATTERNS.index(s.wing_pattern),
            )
            for s in self._species
        ]
        distinct = list(dict.fromkeys(shapes))
        self._shape_of_class = np.array([distinct.index(s) for s in shapes], dtype=np.int64)
        res = max(_MIN_TEMPLATE_RES, 2.0 * _SCALE_RANGE[1] * self.size)
        shape_res = max(16, math.ceil(0.15 * self.size))
        self._templates = _render.make_templates(distinct, res, shape_res)
        self._colours = np.array(
            [[PALETTE[getattr(s, slot)] for slot in COLOUR_SLOTS] for s in self._species]
        )
        self._device_assets: dict[str, tuple[_render.Templates, torch.Tensor]] = {}

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int | np.integer | torch.Tensor):
            raise InputError(f"index must be an int, got {type(i).__name__}")
        i = int(i)
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for a dataset of {self.n} samples")
        return i % self.n

    def label(self, i: int) -> int:
        """Class of sample ``i``: ``i % num_classes`` (balanced)."""
        return self._index(i) % self.num_classes

    def __getitem__(self, i: int) -> tuple:
        """``(image, label)``, or ``(image, label, PartAnnotation)`` with annotations.

        ``image`` is ``3 x size x size`` float32 in ``[0, 1]``; ``label`` an int.
        """
        image, ann = self.render(i)
        if self.return_annotations:
            return image, ann.label, ann
        return image, ann.label

    def __getitems__(self, indices: Sequence[int]) -> list[tuple]:
        """Samples for a whole batch at once (used by DataLoader's batched fetch)."""
        images, batch = self.render_batch(indices)
        out = []
        for k in range(len(batch)):
            label = int(batch.labels[k])
            if self.return_annotations:
                out.append((images[k], label, self._annotation_of(batch, k)))
            else:
                out.append((images[k], label))
        return out

    @staticmethod
    def collate(samples: Sequence[tuple]) -> tuple:
        """Collate samples with annotations into ``(images, labels, PartBatch)``.

        Use as ``DataLoader(ds, collate_fn=SyntheticParts.collate)`` when
        ``return_annotations=True`` (the default collate suffices otherwise).
        """
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([int(s[1]) for s in samples], dtype=torch.long)
        if len(samples[0]) == 3:
            return images, labels, collate_annotations([s[2] for s in samples])
        return images, labels

    # ------------------------------------------------------------------------ rendering
    def annotation(self, i: int) -> PartAnnotation:
        """Ground truth of sample ``i`` (renders it)."""
        return self.render(i)[1]

    def render(self, i: int) -> tuple[torch.Tensor, PartAnnotation]:
        """Image ``3 x size x size`` (float32, ``[0, 1]``) and annotation of sample ``i``."""
        images, batch = self.render_batch([self._index(i)])
        return images[0], self._annotation_of(batch, 0)

    def render_batch(
        self,
        indices: Sequence[int] | torch.Tensor | np.ndarray,
        device: str | torch.device | None = None,
    ) -> tuple[torch.Tensor, PartBatch]:
        """Render many samples at once (the fast path).

        Parameters
        ----------
        indices : sequence of int
            ``N`` sample indices in ``[-n, n)``.
        device : str or torch.device, optional
            Where to render and return the images (default CPU). Annotations are always
            returned on the CPU.

        Returns
        -------
        images : Tensor
            ``N x 3 x size x size`` float32 in ``[0, 1]``.
        annotations : PartBatch
            Labels ``N``, keypoints ``N x 15 x 2`` ``(x, y)`` pixels, visibility ``N x 15``,
            boxes ``N x 4`` ``(x0, y0, x1, y1)``, part masks ``N x size x size`` int64,
            object masks ``N x size x size`` bool.
        """
        idx = self._indices(indices)
        return self._render_indices(idx, self._labels_of(idx), device)

    def _labels_of(self, indices: np.ndarray) -> np.ndarray:
        """Labels ``N`` (int64) of non-negative sample indices."""
        return np.asarray(indices, dtype=np.int64) % self.num_classes

    def _indices(self, indices: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        arr = np.asarray(list(indices) if isinstance(indices, range) else indices)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise InputError(
                f"indices must be a 1-D sequence of ints, got shape {arr.shape} of {arr.dtype}"
            )
        arr = arr.astype(np.int64)
        if arr.size and (arr.min() < -self.n or arr.max() >= self.n):
            raise InputError(
                f"indices must lie in [-{self.n}, {self.n}) for a dataset of {self.n} samples, "
                f"got min {arr.min()} and max {arr.max()}"
            )
        return arr % self.n

    def _render_indices(
        self, idx: np.ndarray, labels: np.ndarray, device: str | torch.device | None
    ) -> tuple[torch.Tensor, PartBatch]:
        """Render samples ``idx`` drawn as classes ``labels`` (a test swaps the labels)."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        templates, tile = self._assets(dev)
        images, parts, objects, kps, vis, boxes = [], [], [], [], [], []
        for start in range(0, len(idx), _CHUNK):
            sl = slice(start, start + _CHUNK)
            scene = self._scene(idx[sl], labels[sl], dev)
            d = _render.draw(scene, self.size, templates, tile)
            images.append(d.images)
            parts.append(d.part_mask.cpu())
            objects.append(d.object_mask.cpu())
            kps.append(d.keypoints.cpu())
            vis.append(d.visible.cpu())
            boxes.append(d.bbox.cpu())
        if not images:
            s = self.size
            empty = torch.zeros(0, 3, s, s, device=dev)
            return empty, PartBatch(
                labels=torch.zeros(0, dtype=torch.long),
                keypoints=torch.zeros(0, len(PART_NAMES), 2),
                visible=torch.zeros(0, len(PART_NAMES), dtype=torch.bool),
                bbox=torch.zeros(0, 4),
                part_mask=torch.zeros(0, s, s, dtype=torch.long),
                object_mask=torch.zeros(0, s, s, dtype=torch.bool),
            )
        batch = PartBatch(
            labels=torch.as_tensor(labels, dtype=torch.long),
            keypoints=torch.cat(kps),
            visible=torch.cat(vis),
            bbox=torch.cat(boxes),
            part_mask=torch.cat(parts),
            object_mask=torch.cat(objects),
        )
        return torch.cat(images), batch

    def _annotation_of(self, batch: PartBatch, k: int) -> PartAnnotation:
        label = int(batch.labels[k])
        return PartAnnotation(
            label=label,
            keypoints=batch.keypoints[k],
            visible=batch.visible[k],
            bbox=batch.bbox[k],
            part_mask=batch.part_mask[k] if batch.part_mask is not None else None,
            object_mask=batch.object_mask[k] if batch.object_mask is not None else None,
            class_parts=self.class_parts[label],
        )

    def _assets(self, device: torch.device) -> tuple[_render.Templates, torch.Tensor]:
        """Templates and noise tile on ``device`` (built once per device)."""
        key = str(device)
        if key not in self._device_assets:
            t = max(_NOISE_TILE, self.size)
            g = torch.Generator().manual_seed(_NOISE_TILE_SEED)
            tile = torch.randn(t, t, generator=g)
            self._device_assets[key] = (self._templates.to(device), tile.to(device))
        return self._device_assets[key]

    def _scene(self, idx: np.ndarray, labels: np.ndarray, device: torch.device) -> _render.Scene:
        """Map the counter-based uniforms of samples ``idx`` to drawing parameters."""
        u = uniforms(self.seed, idx, _SLOTS)
        n, size = len(idx), self.size
        labels = np.asarray(labels, dtype=np.int64)

        # Pose: scale (with a little anisotropy), rotation, mirror, and a position that
        # keeps the bird (nearly) inside the image.
        lo, hi = _SCALE_RANGE
        scale = size * (lo + (hi - lo) * u[:, _S_SCALE])
        aspect = 1.0 + _MAX_ASPECT * (2.0 * u[:, _S_ASPECT] - 1.0)
        scales = np.stack([scale * aspect, scale / aspect], axis=1)
        angle = np.radians(_MAX_ANGLE_DEG * (2.0 * u[:, _S_ANGLE] - 1.0))
        flip = u[:, _S_FLIP] < 0.5
        ex, ey = _render.OBJECT_HALF_EXTENT
        ca, sa = np.abs(np.cos(angle)), np.abs(np.sin(angle))
        centre = np.empty((n, 2))
        margins = (scale * (ex * ca + ey * sa), scale * (ex * sa + ey * ca))
        for j, (margin, slot) in enumerate(zip(margins, (_S_X, _S_Y))):
            room = np.maximum(size - 1 - 2 * margin, 0.0)
            centre[:, j] = np.where(room > 0, margin, (size - 1) / 2) + room * u[:, slot]
        f = np.where(flip, -1.0, 1.0)
        cu = _render.OBJECT_CENTRE[0] * scales[:, 0] * f
        origin = np.stack([centre[:, 0] - cu * np.cos(angle), centre[:, 1] - cu * np.sin(angle)], 1)

        # Colours: species palette, global brightness, small per-slot jitter.
        colours = np.zeros((n, _render.NUM_LAYERS, 3))
        bright = 0.85 + 0.25 * u[:, _S_BRIGHT]
        jitter = u[:, _S_COLOUR : _S_COLOUR + 3 * len(COLOUR_SLOTS)].reshape(n, -1, 3) - 0.5
        bird = np.clip(self._colours[labels] * bright[:, None, None] + 0.08 * jitter, 0.0, 1.0)
        for layer, slot in _render.BIRD_LAYER_SLOTS.items():
            colours[:, _render.LAYER[layer]] = bird[:, COLOUR_SLOTS.index(slot)]

        # Background: two colours mixed by two gratings, plus noise.
        colours[:, 0] = 0.1 + 0.8 * u[:, _S_BG : _S_BG + 3]
        background = 0.1 + 0.8 * u[:, _S_BG + 3 : _S_BG + 6]
        grating = np.zeros((n, 2, 3))
        noise_amp = np.zeros(n)
        if self.clutter:
            for k in range(2):
                w = u[:, _S_GRATING + 3 * k : _S_GRATING + 3 * (k + 1)]
                period = size / 64.0 * (4.0 + 16.0 * w[:, 0])
                theta = math.pi * w[:, 1]
                grating[:, k, 0] = 2 * math.pi / period * np.cos(theta)
                grating[:, k, 1] = 2 * math.pi / period * np.sin(theta)
                grating[:, k, 2] = 2 * math.pi * w[:, 2]
            noise_amp = 0.02 + 0.04 * u[:, _S_NOISE + 2]
        noise_off = np.floor(u[:, _S_NOISE : _S_NOISE + 2] * max(_NOISE_TILE, size))

        # Distractors: ellipses, boxes and triangles, half of them in bird colours.
        nd = _render.NUM_DISTRACTORS
        dist = np.zeros((n, nd, 6))
        palette = np.array(list(PALETTE.values()))
        none = len(_render.DISTRACTOR_SHAPES)
        for k in range(nd):
            w = u[:, _S_DISTRACT + 12 * k : _S_DISTRACT + 12 * (k + 1)]
            kind = np.minimum(np.floor(w[:, 7] * none), none - 1)
            active = (w[:, 0] < 0.6) & self.distractors
            dist[:, k] = np.stack(
                [
                    w[:, 1] * (size - 1),
                    w[:, 2] * (size - 1),
                    size * (0.05 + 0.10 * w[:, 3]),
                    size * (0.05 + 0.10 * w[:, 4]),
                    math.pi * w[:, 5],
                    np.where(active, kind, none),
                ],
                axis=1,
            )
            pick = np.minimum((w[:, 9] * len(palette)).astype(int), len(palette) - 1)
            colours[:, _render.LAYER[f"distractor{k}"]] = np.where(
                (w[:, 8] < 0.5)[:, None], palette[pick], 0.05 + 0.9 * w[:, 9:12]
            )

        # Occluders: branches through the bird's neighbourhood.
        no = _render.NUM_OCCLUDERS
        count = np.where(u[:, _S_OCCLUDE] < 0.5, 0, np.where(u[:, _S_OCCLUDE] < 0.85, 1, 2))
        occ = np.zeros((n, no, 4))
        brown, green = np.array([0.36, 0.25, 0.14]), np.array([0.22, 0.42, 0.14])
        for k in range(no):
            w = u[:, _S_OCCLUDE + 1 + 7 * k : _S_OCCLUDE + 1 + 7 * (k + 1)]
            active = (count > k) & self.occlusion
            occ[:, k] = np.stack(
                [
                    centre[:, 0] + (w[:, 0] - 0.5) * 1.2 * ex * scale,
                    centre[:, 1] + (w[:, 1] - 0.5) * 1.2 * ex * scale,
                    math.pi * w[:, 2],
                    np.where(active, (0.05 + 0.06 * w[:, 3]) * scale, -1.0),
                ],
                axis=1,
            )
            tone = brown + (green - brown) * w[:, 4:5] + 0.1 * (w[:, 5:6] - 0.5)
            colours[:, _render.LAYER[f"occluder{k}"]] = np.clip(tone, 0.0, 1.0)

        def t(a: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

        return _render.Scene(
            shape=t(self._shape_of_class[labels], torch.long),
            scale=t(scales),
            angle=t(angle),
            flip=t(flip, torch.bool),
            origin=t(origin),
            colours=t(colours),
            background=t(background),
            grating=t(grating),
            noise_offset=t(noise_off, torch.long),
            noise_amplitude=t(noise_amp),
            distractors=t(dist),
            occluders=t(occ),
        )

    # ------------------------------------------------------------------ class structure
    def pairs_differing_in_one_part(self) -> list[tuple[int, int, str]]:
        """Class pairs ``(a, b, group)``, ``a < b``, whose attributes differ in one part group.

        ``group`` is a key of :attr:`part_groups` (``"wings"`` covers both wings).
        """
        return one_part_pairs(self._species)

    # ---------------------------------------------------------------------- CUB layout
    def write_cub(
        self,
        root: str | os.PathLike,
        n: int | None = None,
        *,
        train_fraction: float = 0.5,
        image_format: str = "png",
    ) -> Path:
        """Write the first ``n`` samples in the CUB-200-2011 folder layout.

        Files (ids are 1-based, as in CUB; coordinates are pixels of the written image,
        ``x`` = column, ``y`` = row, 0-based pixel centres as everywhere in the toolkit)::

            images/<NNN.Class>/<Class>_<i>.<png|jpg>
            images.txt                  <image_id> <class dir>/<file>
            classes.txt                 <class_id> <NNN.Class>
            image_class_labels.txt      <image_id> <class_id>
            train_test_split.txt        <image_id> <is_training_image>
            bounding_boxes.txt          <image_id> <x> <y> <width> <height>
            parts/parts.txt             <part_id> <part name>       (CUB's 15, CUB order)
            parts/part_locs.txt         <image_id> <part_id> <x> <y> <visible>
            segmentations/<NNN.Class>/<Class>_<i>.png   object mask, 0 or 255
            part_segmentations/<NNN.Class>/<Class>_<i>.png   part mask, 0 or CUB part id

        ``bounding_boxes.txt`` holds ``x0, y0, x1 - x0 + 1, y1 - y0 + 1`` of the inclusive
        box; ``part_locs.txt`` lists all 15 parts of every image, invisible ones as
        ``0.0 0.0 0`` as CUB does. ``part_segmentations/`` is not part of CUB (it has no
        part masks). The split is class-balanced: in every class, the first
        ``round(train_fraction * count)`` images are training images.

        Parameters
        ----------
        root : path
            Output folder (created; existing files of the same names are overwritten).
        n : int, optional
            Number of samples (default: all ``len(self)``).
        train_fraction : float
            Share of each class marked as training images, in ``[0, 1]``.
        image_format : {"png", "jpg"}
            PNG is lossless; JPEG (quality 95) is what CUB ships.

        Returns
        -------
        Path
            ``root``.
        """
        from PIL import Image

        count = self.n if n is None else _check_int("n", n, 1, self.n, "at most len(dataset)")
        if not 0.0 <= float(train_fraction) <= 1.0:
            raise InputError(f"train_fraction must be in [0, 1], got {train_fraction}")
        if image_format not in ("png", "jpg"):
            raise InputError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        root = Path(root)
        dirs = [f"{c + 1:03d}.{name}" for c, name in enumerate(self.classes)]
        labels = self._labels_of(np.arange(count))
        per_class = np.bincount(labels, minlength=self.num_classes)
        n_train = np.floor(train_fraction * per_class + 0.5).astype(int)
        seen = np.zeros(self.num_classes, dtype=int)
        lines: dict[str, list[str]] = {k: [] for k in ("images", "labels", "split", "bbox", "locs")}
        try:
            for sub in ("images", "segmentations", "part_segmentations"):
                for d in dirs:
                    (root / sub / d).mkdir(parents=True, exist_ok=True)
            (root / "parts").mkdir(parents=True, exist_ok=True)
            for start in range(0, count, 256):
                idx = np.arange(start, min(start + 256, count))
                images, batch = self.render_batch(idx)
                pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
                pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
                for k, i in enumerate(idx):
                    c = int(batch.labels[k])
                    image_id = int(i) + 1
                    stem = f"{self.classes[c]}_{int(i):06d}"
                    rel = f"{dirs[c]}/{stem}.{image_format}"
                    img = Image.fromarray(pixels[k])
                    if image_format == "jpg":
                        img.save(root / "images" / rel, quality=95)
                    else:
                        img.save(root / "images" / rel)
                    obj = batch.object_mask[k].numpy().astype(np.uint8) * 255
                    Image.fromarray(obj).save(root / "segmentations" / dirs[c] / f"{stem}.png")
                    pm = batch.part_mask[k].numpy().astype(np.uint8)
                    Image.fromarray(pm).save(root / "part_segmentations" / dirs[c] / f"{stem}.png")
                    lines["images"].append(f"{image_id} {rel}")
                    lines["labels"].append(f"{image_id} {c + 1}")
                    is_train = int(seen[c] < n_train[c])
                    seen[c] += 1
                    lines["split"].append(f"{image_id} {is_train}")
                    x0, y0, x1, y1 = (float(v) for v in batch.bbox[k])
                    lines["bbox"].append(
                        f"{image_id} {x0:.1f} {y0:.1f} {x1 - x0 + 1:.1f} {y1 - y0 + 1:.1f}"
                    )
                    for p in range(len(PART_NAMES)):
                        if bool(batch.visible[k, p]):
                            x, y = (float(v) for v in batch.keypoints[k, p])
                            lines["locs"].append(f"{image_id} {p + 1} {x:.2f} {y:.2f} 1")
                        else:
                            lines["locs"].append(f"{image_id} {p + 1} 0.0 0.0 0")

            def write(rel: str, rows: list[str]) -> None:
                (root / rel).write_text("\n".join(rows) + "\n")

            write("images.txt", lines["images"])
            write("classes.txt", [f"{c + 1} {d}" for c, d in enumerate(dirs)])
            write("image_class_labels.txt", lines["labels"])
            write("train_test_split.txt", lines["split"])
            write("bounding_boxes.txt", lines["bbox"])
            write("parts/parts.txt", [f"{p + 1} {name}" for p, name in enumerate(PART_NAMES)])
            write("parts/part_locs.txt", lines["locs"])
            write(
                "README",
                [
                    "Synthetic part-annotated birds written by xnn_toolkit "
                    "(xnn_toolkit.data.synthetic.SyntheticParts) in the CUB-200-2011 layout.",
                    f"seed={self.seed} size={self.size} num_classes={self.num_classes} "
                    f"clutter={self.clutter} occlusion={self.occlusion} "
                    f"distractors={self.distractors} n={count}",
                    "Coordinates are 0-based pixel centres (x = column, y = row).",
                    "part_segmentations/ (not in CUB): 0 = no part, k = CUB part id k.",
                ],
            )
        except OSError as exc:
            raise AssetError(
                f"could not write the CUB layout under {root}: {exc}; check that the folder "
                "is writable and the disk has room"
            ) from exc
        return root
