"""A tiny scoring job shared by the scoring tests and the processes they start.

Run as a script (``python _scoring_job.py OUT [DELAY] [DUMP]``, also under ``torchrun``) it
scores the job into ``OUT``; ``DELAY`` seconds of sleep per image make it slow enough to be
killed midway; ``DUMP`` writes each rank's aggregate table to ``DUMP.rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn
from torch.utils.data import Dataset

from xnn_toolkit.data import Normalized, SyntheticParts
from xnn_toolkit.report import ScoringConfig, score_dataset

METRICS = (
    "pointing_game",
    "energy_pointing_game",
    "iou",
    "ap50",
    "voronoi_locality",
    "mask_locality",
    "deletion",
)
CONFIG = ScoringConfig(
    methods=("cmwp", "gradcam"),
    metrics=METRICS,
    layer="4",
    batch_size=2,
    shard_size=2,
    steps=3,
    seed=3,
)
N_IMAGES = 12


def tiny_model() -> nn.Module:
    """Two conv blocks and a linear classifier; the same weights in every process."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model.eval()


class Slow(Dataset):
    """A data set view that sleeps ``delay`` seconds per image (the same data otherwise)."""

    def __init__(self, dataset: Dataset, delay: float = 0.0) -> None:
        self.dataset = dataset
        self.delay = delay
        self.part_names = dataset.part_names

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple:
        time.sleep(self.delay)
        return self.dataset[i]


def dataset(n: int = N_IMAGES, delay: float = 0.0) -> Dataset:
    raw = SyntheticParts(n, size=32, seed=1, num_classes=4, return_annotations=True)
    return Slow(Normalized(raw, SyntheticParts.mean, SyntheticParts.std), delay)


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    res = score_dataset(tiny_model(), dataset(delay=delay), CONFIG, out=out, progress=False)
    if len(sys.argv) > 3:
        rank = os.environ.get("RANK", "0")
        with open(f"{sys.argv[3]}.rank{rank}.json", "w") as f:
            json.dump({"aggregate": res.aggregate, "per_image": res.per_image}, f)
