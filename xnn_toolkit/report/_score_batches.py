"""Batches of the scoring runner, read ahead in ``DataLoader`` workers.

One loader serves every shard a process scores: its batch sampler lists the shards' batches
in the order they are scored, so workers (``num_workers > 0``) load the next batches while
the current one is explained. The images are stacked in the worker; the labels are checked
in the scoring process, where the image indices are known.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.types import PartAnnotation, PartBatch, collate_annotations
from ..errors import InputError

__all__: list[str] = []

Batch = tuple[list[int], torch.Tensor, torch.Tensor, PartBatch | None]


def auto_workers() -> int:
    """Loader processes for decoded image folders: one core per rank stays for the model.

    Returns
    -------
    int
        ``min(4, cores per local rank - 1)``, at least 0.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, (cores or 1) // local - 1))


def _collate(items: Sequence[tuple]) -> tuple[torch.Tensor, list[Any], list[Any]]:
    """Stack the images (in the worker); labels and annotations are checked by the caller."""
    images = torch.stack([it[0] for it in items])
    labels = [it[1] if len(it) > 1 else -1 for it in items]
    anns = [it[2] if len(it) > 2 else None for it in items]
    return images, labels, anns


def _labels(raw: Sequence[Any], indices: Sequence[int]) -> torch.Tensor:
    out = []
    for i, y in zip(indices, raw):
        if isinstance(y, torch.Tensor) and y.numel() == 1:
            y = y.item()
        if isinstance(y, bool) or not isinstance(y, numbers.Integral):
            raise InputError(
                f"dataset: image {i} has label {y!r} ({type(y).__name__}); labels must be "
                "integer class indices (-1 for none)"
            )
        out.append(int(y))
    return torch.tensor(out, dtype=torch.long)


def _batch(indices: list[int], loaded: tuple) -> Batch:
    images, raw, anns = loaded
    labels = _labels(raw, indices)
    parts_of = [a for a in anns if isinstance(a, PartAnnotation)]
    parts = collate_annotations(parts_of) if len(parts_of) == len(anns) else None
    return indices, images, labels, parts


def batches(dataset: Any, order: Sequence[list[int]], num_workers: int) -> Iterator[Batch]:
    """Load the batches ``order`` (lists of image indices), in that order.

    Parameters
    ----------
    dataset : Dataset
        Map-style; ``__getitems__`` is used where the data set has it.
    order : sequence of list of int
        The batches, in the order they are scored.
    num_workers : int
        Loader processes (0: load in this process, between batches).

    Yields
    ------
    (indices, images, labels, parts)
    """
    if not order:
        return
    loader = DataLoader(
        dataset,
        batch_sampler=[list(b) for b in order],
        num_workers=num_workers,
        collate_fn=_collate,
        prefetch_factor=2 if num_workers else None,
    )
    for indices, loaded in zip(order, loader):
        yield _batch(list(indices), loaded)
