"""A dataset view that hands the model normalised images and keeps the rest of each item."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["Normalized"]


class Normalized(Dataset):
    """Wrap a dataset of ``(image in [0, 1], label, ...)`` items; normalise the image.

    Parameters
    ----------
    dataset : Dataset
        Items are tuples whose first element is a ``C x H x W`` image in ``[0, 1]``.
    mean, std : sequence of float
        Per-channel statistics (e.g. a model's ``Preprocessing``).
    """

    #: the images it hands out are normalised (see :mod:`xnn_toolkit.datafit`)
    image_space = "normalized"

    def __init__(self, dataset: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.dataset = dataset
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.dataset)

    def _apply(self, item: tuple) -> tuple:
        return ((item[0] - self.mean) / self.std, *item[1:])

    def __getitem__(self, i: int) -> tuple:
        return self._apply(self.dataset[i])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple]:
        fast = getattr(self.dataset, "__getitems__", None)
        items = fast(indices) if fast is not None else [self.dataset[i] for i in indices]
        return [self._apply(it) for it in items]

    def __getattr__(self, name: str):
        # classes, part_names, ... of the wrapped dataset stay reachable
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
