"""One shard of a scoring run: its batches, heatmaps, metrics and rows (and the run's plan).

:func:`score_shard` explains every (target, method) pair of each batch under the shard's
seeded RNG, sharing forward passes (:func:`xnn_toolkit.attribution._capture.shared_passes`),
and scores the maps: the pure metrics in a second thread while the next batch is explained,
the others in order in this thread. The rows are image-major (image, target, method).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._device import model_device
from .._guard import model_guard
from ..attribution._capture import shared_passes
from ..attribution.targets import Class, HeadOutput
from ..data.types import PartBatch
from ..datafit import DataFit
from ..errors import InputError
from ._metrics_process import Offload, run_here
from ._score_batches import Batch
from .score_metrics import GROUND_TRUTH, MetricSpec, ScoreInputs

if TYPE_CHECKING:
    from .scoring import ScoringConfig

__all__: list[str] = []


#: Leading columns of every stored row: image index, target, method, label, prediction,
#: explained class (-1 for targets without one).
_KEYS = ("index", "target", "method", "label", "prediction", "class")


@dataclass
class _Target:
    name: str
    kind: str  # "label" | "predicted" | "head" | "class_head"
    spec: Any = None
    modules: dict[int, nn.Module] = field(default_factory=dict)


@dataclass
class _Plan:
    """Everything validated at the door, the same on every rank."""

    model: nn.Module
    dataset: Any
    cfg: ScoringConfig
    n: int
    shard_size: int
    methods: list[tuple[str, Any]]  # (name as given, method instance)
    metrics: list[MetricSpec]
    targets: list[_Target]
    part_names: list[str]
    value_columns: list[str]
    header: dict[str, Any]
    fit: DataFit | None = None
    maps_dir: Path | None = None
    maps_info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_shards(self) -> int:
        return -(-self.n // self.shard_size)

    def bounds(self, k: int) -> tuple[int, int]:
        return k * self.shard_size, min(self.n, (k + 1) * self.shard_size)

    def rows(self, k: int) -> int:
        a, b = self.bounds(k)
        return (b - a) * len(self.targets) * len(self.methods)

    @property
    def ncols(self) -> int:
        return len(_KEYS) + len(self.value_columns)


def _check_batch_gt(plan: _Plan, parts: PartBatch | None, indices: list[int]) -> None:
    span = f"images {indices[0]}..{indices[-1]}"
    for spec in plan.metrics:
        for need in spec.needs:
            if need == "class":
                continue
            ok = parts is not None and (
                need in ("bbox", "keypoints") or getattr(parts, need) is not None
            )
            if not ok:
                raise InputError(
                    f"the metric {spec.name!r} needs {GROUND_TRUTH[need]}, but some of "
                    f"{span} have none; use a data set where every image has it"
                )


def _classes(t: _Target, labels: torch.Tensor, pred: torch.Tensor | None, indices: list[int]):
    if t.kind == "predicted":
        assert pred is not None
        return pred
    if t.kind == "head":
        return torch.full_like(labels, -1)
    bad = (labels < 0).nonzero().flatten()
    if bad.numel():
        raise InputError(
            f"image {indices[int(bad[0])]} has no label (-1), but the target {t.name!r} "
            "explains each image's labelled class; use target='predicted'"
        )
    return labels


def _layer_map(att: Any, size: tuple[int, ...]) -> torch.Tensor | None:
    """The map at the read layer's resolution (channels summed), or None at the input's."""
    raw = att.raw
    if raw.dim() == 4:
        raw = raw.sum(1)
    if raw.dim() != 3 or tuple(raw.shape[-2:]) == tuple(size):
        return None
    return raw


def _heatmaps(
    method: Any,
    x: torch.Tensor,
    t: _Target,
    classes: torch.Tensor | None,
    layer_maps: list | None = None,
) -> torch.Tensor:
    """Heatmaps at input resolution; with ``layer_maps``, also appends the read-layer map
    (``None`` where the method reads at the input or the target composes several calls).
    ``classes=None`` explains each image's predicted class, taken from the method's own
    forward pass (which also gives the batch's prediction)."""
    if t.kind in ("label", "predicted", "head"):
        att = method.attribute(x, Class(classes) if t.kind != "head" else t.spec)
        if layer_maps is not None:
            layer_maps.append(_layer_map(att, tuple(x.shape[-2:])))
        return att.heatmap
    if layer_maps is not None:
        layer_maps.append(None)
    maps = None
    for c in torch.unique(classes).tolist():
        rows = (classes == c).nonzero().flatten()
        if c not in t.modules:
            t.modules[c] = t.spec.head.as_target_module(int(c))
        tgt = HeadOutput(t.spec.layer, t.modules[c], t.spec.index)
        m = method.attribute(x[rows.to(x.device)], tgt).heatmap
        if maps is None:
            maps = m.new_zeros(x.shape[0], *m.shape[1:])
        maps[rows.to(m.device)] = m
    assert maps is not None
    return maps


def _method_options(plan: _Plan, mi: int, method: Any) -> dict[str, Any]:
    """Constructor options (layer included) that rebuild method ``mi`` on another model."""
    name = plan.cfg.methods[mi]
    opts = {k: v for k, v in plan.cfg.method_options.get(name, {}).items() if k != "layer"}
    return {"layer": method.layer, **opts}


def _shard_seed(seed: int, k: int) -> int:
    return (seed * 1_000_003 + k) % (2**63 - 1)


def _score_shard(
    plan: _Plan,
    k: int,
    loaded: Iterator[Batch],
    pool: ThreadPoolExecutor,
    offload: Offload = run_here,
) -> Callable[[], torch.Tensor]:
    """Explain and score shard ``k`` from its batches, the next ones of ``loaded``; returns
    ``finish()``, which waits for the pure metrics still running and gives the shard's
    ``rows x ncols`` float64 values (image-major, then target, method). ``pool`` (one
    thread, the run's) computes the pure metrics, which hand their interpreter-bound work
    to ``offload`` (the run's metrics process, see :mod:`._metrics_process`); the caller
    explains the next shard before it calls ``finish``, so they overlap it too."""
    start, stop = plan.bounds(k)
    dev = model_device(plan.model)
    threads = torch.get_num_threads()
    torch.set_num_threads(plan.cfg.threads)
    try:
        return _score_rows(plan, k, start, stop, dev, loaded, pool, offload)
    finally:
        torch.set_num_threads(threads)


def _shard_batches(plan: _Plan, k: int) -> list[list[int]]:
    start, stop = plan.bounds(k)
    step = plan.cfg.batch_size
    return [list(range(a, min(a + step, stop))) for a in range(start, stop, step)]


def _prediction(model: nn.Module, x: torch.Tensor, passes: Any) -> torch.Tensor:
    """The batch's predicted classes: from the first forward pass a method ran on ``x``, or
    from a forward pass of its own when no method ran one to the model's output."""
    out = passes.output
    if out is None:
        with model_guard(model), torch.no_grad():
            out = model(x)
    return out.argmax(1).cpu()


def _score_rows(
    plan: _Plan,
    k: int,
    start: int,
    stop: int,
    dev: torch.device,
    loaded: Iterator[Batch],
    pool: ThreadPoolExecutor,
    offload: Offload,
) -> Callable[[], torch.Tensor]:
    cfg = plan.cfg
    later: list[_Job] = []
    unsent: list[_Job] = []
    saved: dict[str, Any] = {"order": [], "groups": {}, "maps": {}}
    devices = [dev] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_shard_seed(cfg.seed, k))
        for want in _shard_batches(plan, k):
            idx, x, labels, parts = next(loaded)
            assert idx == want, (idx, want)
            _check_batch_gt(plan, parts, idx)
            if plan.fit is not None:
                x = plan.fit.images(x, idx[0])
                plan.fit.labels(labels, idx[0])
            x = x.to(dev)
            if parts is not None and dev.type != "cpu":
                parts = parts.to(dev)
            # the pure metrics (functions of the maps and the ground truth: no model, no RNG)
            # of the previous batch go to the metrics thread now, once this batch is loaded:
            # they overlap its heatmaps, where the network leaves the interpreter free
            for job in unsent:
                job.pure = pool.submit(_pure_values, job.pair)
            unsent = []
            pairs: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
            # one batch, one set of forward passes: the prediction comes from the first
            # method's forward, and methods reading the same layer share theirs
            with shared_passes(x) as passes:
                pred = None
                for ti, t in enumerate(plan.targets):
                    for mi, (_, method) in enumerate(plan.methods):
                        if t.kind == "predicted" and pred is None:
                            classes = None
                        else:
                            classes = _classes(t, labels, pred, idx)
                        at_layer: list | None = [] if plan.maps_dir is not None else None
                        maps = _heatmaps(method, x, t, classes, at_layer)
                        if pred is None:
                            pred = _prediction(plan.model, x, passes)
                        if classes is None:
                            classes = pred
                        if at_layer is not None:
                            _keep_maps(saved, plan, ti, mi, idx, labels, classes, maps, at_layer[0])
                        pairs.append((ti, mi, classes, maps))
            assert pred is not None
            for ti in range(len(plan.targets)):
                pair = _Pair(plan, idx, x, parts, [p for p in pairs if p[0] == ti], offload)
                job = _Job(pair, labels, pred, ti, _alone_values(pair))
                later.append(job)
                unsent.append(job)
        for job in unsent:
            job.pure = pool.submit(_pure_values, job.pair)
    if plan.maps_dir is not None:
        from ..interop.maps import write_shard

        maps = {key: torch.cat(v) for key, v in saved.pop("maps").items()}
        write_shard(plan.maps_dir, k, maps, saved)

    def finish() -> torch.Tensor:
        blocks: list[list[torch.Tensor]] = []
        for job in later:
            assert job.pure is not None
            pure = job.pure.result()
            rows = _rows(
                plan, job.pair.idx, job.labels, job.pred, job.pair.group, job.ti, pure, job.alone
            )
            if job.ti == 0:
                blocks.append([])
            blocks[-1] += rows
        # image-major: row (i, t, m)
        return torch.cat([torch.stack(rows, 1).reshape(-1, plan.ncols) for rows in blocks])

    return finish


@dataclass(frozen=True)
class _Pair:
    """One batch and one target's (method, classes, maps) pairs, to be scored."""

    plan: _Plan
    idx: list[int]
    x: torch.Tensor
    parts: PartBatch | None
    group: list[tuple[int, int, torch.Tensor, torch.Tensor]]
    offload: Offload = run_here

    def inputs(self, maps: torch.Tensor, classes: torch.Tensor, mi: int | None) -> ScoreInputs:
        cfg = self.plan.cfg
        method = self.plan.methods[mi][1] if mi is not None else None
        return ScoreInputs(
            maps=maps,
            images=self.x,
            classes=classes,
            parts=self.parts,
            model=self.plan.model,
            tolerance=cfg.tolerance,
            top=cfg.top,
            steps=cfg.steps,
            batch_size=max(64, cfg.batch_size),
            method=cfg.methods[mi] if mi is not None else "",
            method_options=_method_options(self.plan, mi, method) if mi is not None else {},
            offload=self.offload,
        )


@dataclass
class _Job:
    """A scored batch and target: its pure metrics' future (sent once the next batch is
    loaded) and the other metrics' values."""

    pair: _Pair
    labels: torch.Tensor
    pred: torch.Tensor
    ti: int
    alone: list[dict[str, list[torch.Tensor]]]
    pure: Future | None = None


def _pure_values(pair: _Pair) -> dict[str, list[torch.Tensor]]:
    """The pure metrics (maps and ground truth only; run in the metrics thread). Stacked
    ones see every method's maps of the target at once (``N x M x H x W``; the ground
    truth's geometry is computed once per image), the others one method at a time: columns
    ``N x M`` either way."""
    specs = [spec for spec in pair.plan.metrics if spec.pure]
    if not specs:
        return {}
    b, m = len(pair.idx), len(pair.group)
    out = {}
    if any(spec.stacked for spec in specs):
        # every method of a target explains the same classes
        maps = torch.stack([maps for *_, maps in pair.group], 1)
        together = pair.inputs(maps, pair.group[0][2], None)
        for spec in specs:
            if spec.stacked:
                out[spec.name] = [
                    v.detach().double().cpu().reshape(b, m) for v in spec.compute(together)
                ]
    for spec in specs:
        if not spec.stacked:
            per_method = [
                spec.compute(pair.inputs(maps, classes, mi)) for _, mi, classes, maps in pair.group
            ]
            out[spec.name] = [
                torch.stack([v[c].detach().double().cpu().reshape(b) for v in per_method], 1)
                for c in range(len(per_method[0]))
            ]
    return out


def _alone_values(pair: _Pair) -> list[dict[str, list[torch.Tensor]]]:
    """The other metrics (they may run the model or a method again, or draw random
    numbers), one method at a time, in this thread and in (method, metric) order: per
    method, columns ``N``."""
    b = len(pair.idx)
    out = []
    for _, mi, classes, maps in pair.group:
        inp = None
        cols = {}
        for spec in pair.plan.metrics:
            if not spec.pure:
                inp = inp if inp is not None else pair.inputs(maps, classes, mi)
                cols[spec.name] = [v.detach().double().cpu().reshape(b) for v in spec.compute(inp)]
        out.append(cols)
    return out


def _rows(
    plan: _Plan,
    idx: list[int],
    labels: torch.Tensor,
    pred: torch.Tensor,
    group: list[tuple[int, int, torch.Tensor, torch.Tensor]],
    ti: int,
    pure: dict[str, list[torch.Tensor]],
    alone: list[dict[str, list[torch.Tensor]]],
) -> list[torch.Tensor]:
    """The ``N x ncols`` rows of one target's pairs, in method order."""
    b = len(idx)
    rows = []
    for j, (_, mi, classes, _) in enumerate(group):
        cols = [
            torch.tensor(idx, dtype=torch.float64),
            torch.full((b,), float(ti), dtype=torch.float64),
            torch.full((b,), float(mi), dtype=torch.float64),
            labels.double(),
            pred.double(),
            classes.double(),
        ]
        for spec in plan.metrics:
            cols += [v[:, j] for v in pure[spec.name]] if spec.pure else alone[j][spec.name]
        rows.append(torch.stack(cols, 1))
    return rows


def _keep_maps(
    saved: dict[str, Any],
    plan: _Plan,
    ti: int,
    mi: int,
    idx: list[int],
    labels: torch.Tensor,
    classes: torch.Tensor,
    maps: torch.Tensor,
    at_layer: torch.Tensor | None,
) -> None:
    """Collect one batch's maps of one (target, method) pair for the shard's maps file."""
    name, method = plan.methods[mi]
    key = f"{plan.targets[ti].name}|{name}"
    if key not in saved["maps"]:
        saved["order"].append(key)
        saved["maps"][key], saved["groups"][key] = [], []
    saved["maps"][key].append(maps.detach().float().cpu())
    if at_layer is not None:
        saved["maps"].setdefault(f"layer:{key}", []).append(at_layer.detach().float().cpu())
    names = plan.maps_info.get("class_names") or []
    layer = getattr(method, "layer", None)
    for i, lab, c in zip(idx, labels.tolist(), classes.tolist()):
        saved["groups"][key].append(
            {
                "index": i,
                "label": lab,
                "class": c,
                "class_name": names[c] if 0 <= c < len(names) else None,
                "method": name,
                "layer": "default" if layer is None else str(layer),
                "target": plan.targets[ti].name,
            }
        )
