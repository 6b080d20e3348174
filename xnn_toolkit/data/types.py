"""Plain annotation records shared by every dataset with ground truth.

Conventions (used by the datasets, the metrics and the figures alike):

- keypoints are ``(x, y)`` in pixels of the image as returned (x = column, y = row, pixel
  centres at integer coordinates);
- bounding boxes are ``(x0, y0, x1, y1)`` in the same pixel frame, inclusive of the pixels
  at ``x0..x1`` and ``y0..y1``;
- ``part_mask`` holds ``0`` for pixels of no part and ``p + 1`` for part ``p``;
- every tensor is on the CPU; batches stack along a leading ``N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PartAnnotation", "PartBatch", "collate_annotations"]


@dataclass
class PartAnnotation:
    """Ground truth of one image.

    Attributes
    ----------
    label : int
        Class index.
    keypoints : Tensor
        ``P x 2`` float, ``(x, y)`` of each part's keypoint (meaningless where invisible).
    visible : Tensor
        ``P`` bool, whether each keypoint is visible.
    bbox : Tensor
        ``4`` float, object box ``(x0, y0, x1, y1)``.
    part_mask : Tensor or None
        ``H x W`` int64 part segmentation (``0`` = no part, ``p + 1`` = part ``p``).
    object_mask : Tensor or None
        ``H x W`` bool object mask.
    class_parts : tuple of int
        Indices of the parts whose attributes define the class.
    """

    label: int
    keypoints: torch.Tensor
    visible: torch.Tensor
    bbox: torch.Tensor
    part_mask: torch.Tensor | None = None
    object_mask: torch.Tensor | None = None
    class_parts: tuple[int, ...] = ()


@dataclass
class PartBatch:
    """Annotations of ``N`` images stacked for vectorised metrics.

    Attributes
    ----------
    labels : Tensor
        ``N`` int64.
    keypoints : Tensor
        ``N x P x 2`` float.
    visible : Tensor
        ``N x P`` bool.
    bbox : Tensor
        ``N x 4`` float.
    part_mask : Tensor or None
        ``N x H x W`` int64, when every image has one.
    object_mask : Tensor or None
        ``N x H x W`` bool, when every image has one.
    """

    labels: torch.Tensor
    keypoints: torch.Tensor
    visible: torch.Tensor
    bbox: torch.Tensor
    part_mask: torch.Tensor | None = None
    object_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> PartBatch:
        """The same annotations on ``device`` (where the heatmaps are, for the metrics).

        Parameters
        ----------
        device : torch.device or str

        Returns
        -------
        PartBatch
        """
        return dataclasses.replace(
            self,
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                for f in dataclasses.fields(self)
            },
        )


def collate_annotations(items: Sequence[PartAnnotation]) -> PartBatch:
    """Stack annotations of equal part count and image size into a :class:`PartBatch`."""
    masks = [a.part_mask for a in items]
    objs = [a.object_mask for a in items]
    return PartBatch(
        labels=torch.tensor([a.label for a in items], dtype=torch.long),
        keypoints=torch.stack([a.keypoints.float() for a in items]),
        visible=torch.stack([a.visible.bool() for a in items]),
        bbox=torch.stack([a.bbox.float() for a in items]),
        part_mask=torch.stack(masks) if all(m is not None for m in masks) else None,
        object_mask=torch.stack(objs) if all(m is not None for m in objs) else None,
    )
