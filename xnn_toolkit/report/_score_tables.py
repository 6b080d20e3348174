"""The per-image and aggregate tables of a scoring run, built from the stored values.

Rows in data-set order; aggregates are the mean, standard deviation and count of every column,
and the locality entropy of the part-probability metrics (:doc:`/methods/metrics`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..metrics import locality
from . import _score_store as store
from ._score_shard import (
    _KEYS,
    _Plan,
)

__all__: list[str] = []


_AGG_COLUMNS = ("target", "method", "metric", "mean", "std", "n")


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _tables(plan: _Plan, values: torch.Tensor) -> tuple[list[dict], list[dict]]:
    """Per-image and aggregate rows from the stored values of every shard, in order."""
    t_names = [t.name for t in plan.targets]
    m_names = [m for m, _ in plan.methods]
    vals = values.numpy()
    k = len(_KEYS)
    per_image = []
    for row in vals.tolist():
        r: dict[str, Any] = {
            "index": int(row[0]),
            "label": int(row[3]),
            "prediction": int(row[4]),
            "target": t_names[int(row[1])],
            "class": int(row[5]),
            "method": m_names[int(row[2])],
        }
        for c, v in zip(plan.value_columns, row[k:]):
            r[c] = _num(v)
        per_image.append(r)
    aggregate = []
    for ti, t in enumerate(t_names):
        for mi, m in enumerate(m_names):
            sel = vals[(vals[:, 1] == ti) & (vals[:, 2] == mi)]
            col = k
            for spec in plan.metrics:
                names = spec.columns(plan.part_names)
                block = sel[:, col : col + len(names)]
                if spec.per_part:
                    ok = np.isfinite(block).all(1)
                    ent = locality(torch.from_numpy(block[ok])).mean if ok.any() else math.nan
                    aggregate.append(
                        {
                            "target": t,
                            "method": m,
                            "metric": spec.name,
                            "mean": _num(ent),
                            "std": None,
                            "n": int(ok.sum()),
                        }
                    )
                for j, name in enumerate(names):
                    aggregate.append(
                        {"target": t, "method": m, "metric": name, **_summary(block[:, j])}
                    )
                col += len(names)
    return per_image, aggregate


def _summary(v: np.ndarray) -> dict[str, Any]:
    """Mean, sample std and count of the finite values (exactly rounded sums)."""
    x = [float(a) for a in v if math.isfinite(a)]
    n = len(x)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = math.fsum(x) / n
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in x) / (n - 1)) if n > 1 else None
    return {"mean": _num(mean), "std": None if std is None else _num(std), "n": n}


def _table_texts(plan: _Plan, per_image: list[dict], aggregate: list[dict]) -> dict[str, str]:
    cols = plan.header["per_image_columns"]
    return {
        "per_image.csv": store.csv_text(per_image, cols),
        "per_image.json": store.rows_json_text(per_image),
        "aggregate.csv": store.csv_text(aggregate, _AGG_COLUMNS),
        "aggregate.json": store.rows_json_text(aggregate),
    }
