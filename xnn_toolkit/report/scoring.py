"""Batch scoring: heatmap methods x targets x metrics over a whole data set, to tables.

:func:`score_dataset` streams the data set in shards of images. For every image it computes
the model's prediction, then for every target (the image's class, its predicted class, or an
output of a fitted head) and every attribution method a heatmap
(:mod:`xnn_toolkit.attribution`), and scores that heatmap with the named metrics of
:doc:`/methods/metrics` (:mod:`xnn_toolkit.report.score_metrics`, computed by
:mod:`xnn_toolkit.metrics`). The
result is a per-image table (one row per image, target and method) and an aggregate table
(mean, standard deviation and count per target, method and metric; the locality entropy for
the part-probability metrics).

Resumable
    With ``out=`` every finished shard is written to the folder (the format of
    :mod:`xnn_toolkit.report._score_store`); a run that is killed continues from its last
    finished shard when it is started again with the same arguments, and its tables are
    byte-identical to an uninterrupted run's: shards are computed independently of each
    other (each under its own seeded RNG, with the same batches whatever came before), and
    the tables are built from the stored values in data-set order.

Sharded over processes
    Launched with ``torchrun --nproc_per_node K``, each rank scores a disjoint set of
    shards (gloo on the CPU, NCCL on the GPU); the values are gathered after each round,
    rank 0 writes them, and every rank returns the same tables as a single process would.
    Results are bit-identical for any number of processes: CPU kernels split their float
    reductions by the intra-op thread count, which differs between one process (all cores)
    and ``torchrun``'s ranks (``OMP_NUM_THREADS=1``), so every shard is scored with
    :attr:`ScoringConfig.threads` threads whoever runs it (on a GPU, also set
    ``torch.use_deterministic_algorithms(True)`` for kernels such as ``scatter_add``).

The user's model (and every head) is left exactly as it was (:func:`~xnn_toolkit._guard.
model_guard` around every use).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._allocator import raise_heap_thresholds
from .._device import model_device
from ..attribution import available_methods, get_method
from ..attribution.targets import ClassHeadTarget, Target
from ..bank.store import _model_fingerprint
from ..data.types import PartAnnotation
from ..datafit import DataFit, data_fit
from ..errors import InputError, SpecError, close_matches
from ..layers import resolve_layer
from . import _score_store as store
from ._distributed import Group
from ._metrics_process import MIN_BATCHES, MetricsProcess
from ._score_batches import batches
from ._score_shard import (
    _Plan,
    _score_shard,
    _shard_batches,
    _Target,
)
from ._score_tables import (
    _AGG_COLUMNS,
    _table_texts,
    _tables,
)
from .document import Table
from .score_metrics import GROUND_TRUTH, available_metrics, get_metric

__all__ = ["ClassHeadTarget", "ScoreResult", "ScoringConfig", "score_dataset"]

_CLASS_TARGETS = ("label", "predicted")


@dataclass(frozen=True)
class ScoringConfig:
    """What to score and how (every field but ``num_workers`` is recorded in the manifest).

    Attributes
    ----------
    methods : tuple of str
        Attribution methods (:func:`xnn_toolkit.attribution.available_methods`).
    metrics : tuple of str or None
        Metric names (:func:`xnn_toolkit.report.score_metrics.available_metrics`); ``None``
        takes every metric the data set's ground truth supports.
    layer : str or None
        Read layer of the methods that read at a layer (Excitation Backprop, CAM family);
        ``None`` keeps each method's default (:doc:`/methods/excitation`: VGG pool4, ResNet stage
        3).
        Captum methods always attribute to the input.
    target : {"label", "predicted"} or None
        The class explained on each image: its label or the model's prediction; ``None``
        scores only the head targets passed to :func:`score_dataset`.
    n : int or None
        Score the first ``n`` images (all when ``None``).
    batch_size : int
        Images per attribution batch.
    shard_size : int or None
        Images per shard, the unit of resumption and of work per process (default
        ``4 * batch_size``).
    seed : int
        Each shard runs under ``torch.manual_seed`` of a value derived from ``seed`` and the
        shard index (the global RNG is restored afterwards).
    tolerance : float
        Pointing-game tolerance in pixels (15, TorchRay convention; :doc:`/methods/metrics`).
    top : float
        Share of pixels in the segmentation scored by ``iou`` / ``apNN`` (top 30 %,
        :doc:`/methods/cam`).
    steps : int
        Steps of the deletion / insertion curves.
    method_options : dict of str to dict
        Constructor arguments per method name (e.g. ``{"ig": {"n_steps": 16}}``; a
        ``"layer"`` entry overrides :attr:`layer` for that method). Plain JSON values only.
    threads : int
        Intra-op CPU threads while a shard is scored (restored afterwards). The values
        depend on it in the last digits, so it is fixed per run rather than taken from the
        process: one process and ``torchrun`` ranks then give identical tables. Scale out
        with ``torchrun``; raise it for one process on many cores (tables then match other
        runs with the same value).
    save_maps : bool
        Also write every heatmap (float32, input resolution) to ``<out>/maps/`` as
        safetensors shards with a JSON manifest; read them with
        :func:`xnn_toolkit.load_maps`. Needs ``out``.
    num_workers : int
        ``DataLoader`` processes that load the next batches while one is explained (0:
        load in this process). Worth it where decoding images costs time (photo folders);
        it does not change any value, so it is not part of the run's identity (a run may be
        resumed with another value). ``xnn score`` picks one for photo folders.
    """

    methods: tuple[str, ...] = ("cmwp", "gradcam")
    metrics: tuple[str, ...] | None = None
    layer: str | None = None
    target: str | None = "label"
    n: int | None = None
    batch_size: int = 16
    shard_size: int | None = None
    seed: int = 0
    tolerance: float = 15.0
    top: float = 0.3
    steps: int = 20
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    threads: int = 1
    save_maps: bool = False
    num_workers: int = 0


@dataclass
class ScoreResult:
    """The tables of a scoring run.

    Attributes
    ----------
    per_image : list of dict
        One row per image, target and method: ``index, label, prediction, target, class,
        method`` and one column per metric value (``None`` where a value is not finite).
    aggregate : list of dict
        One row per target, method and metric column: ``target, method, metric, mean, std,
        n`` (``std``: sample standard deviation, ``None`` for ``n < 2``; for the locality
        metrics the entropy of the mean part histogram in ``mean``, no ``std``).
    manifest : dict
        Configuration, versions, seeds, data set, shards done, and (under ``runs``) how and
        how long each invocation ran.
    out : Path or None
        The folder the tables were written to.
    """

    per_image: list[dict[str, Any]]
    aggregate: list[dict[str, Any]]
    manifest: dict[str, Any]
    out: Path | None = None

    def value(self, metric: str, method: str, target: str | None = None) -> float | None:
        """The aggregate ``mean`` of one metric for one method (and target).

        Parameters
        ----------
        metric, method : str
        target : str, optional
            Needed only when several targets were scored.

        Returns
        -------
        float or None
        """
        rows = [
            r
            for r in self.aggregate
            if r["metric"] == metric
            and r["method"] == method
            and (target is None or r["target"] == target)
        ]
        if len({r["target"] for r in rows}) > 1:
            raise InputError(f"several targets scored {metric!r}; pass target=")
        if not rows:
            have = sorted({r["metric"] for r in self.aggregate})
            raise InputError(
                f"no aggregate for metric {metric!r} and method {method!r}; metrics: "
                f"{', '.join(have)}; methods: {', '.join(self.manifest['config']['methods'])}"
            )
        return rows[0]["mean"]

    def tables(self) -> list[Table]:
        """The two tables as :class:`~xnn_toolkit.report.Table` blocks for a report."""
        cols = self.manifest["per_image_columns"]
        return [
            Table(
                "scores_aggregate",
                self.aggregate,
                list(_AGG_COLUMNS),
                caption="Mean, standard deviation and count per target, method and metric",
            ),
            Table("scores_per_image", self.per_image, cols, caption="Per-image scores"),
        ]


# --------------------------------------------------------------------------- the plan


def _positive_int(name: str, v: object, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(
            f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}"
        )


def _check_config(cfg: ScoringConfig) -> ScoringConfig:
    if not isinstance(cfg, ScoringConfig):
        raise InputError(f"config must be a ScoringConfig, got {type(cfg).__name__}")
    methods = (cfg.methods,) if isinstance(cfg.methods, str) else tuple(cfg.methods)
    metrics = (
        None
        if cfg.metrics is None
        else ((cfg.metrics,) if isinstance(cfg.metrics, str) else tuple(cfg.metrics))
    )
    if not methods:
        raise InputError("methods is empty; name at least one attribution method, e.g. 'cmwp'")
    if metrics is not None and not metrics:
        raise InputError(
            "metrics is empty; name at least one, or pass None for every metric the data supports"
        )
    for what, names in (("method", methods), ("metric", metrics or ())):
        dup = sorted({m for m in names if list(names).count(m) > 1})
        if dup:
            raise InputError(f"{what} {dup[0]!r} is listed twice")
    if cfg.target not in (*_CLASS_TARGETS, None):
        raise InputError(f"target must be 'label', 'predicted' or None, got {cfg.target!r}")
    _positive_int("n", cfg.n, allow_none=True)
    _positive_int("batch_size", cfg.batch_size)
    _positive_int("shard_size", cfg.shard_size, allow_none=True)
    _positive_int("steps", cfg.steps)
    _positive_int("threads", cfg.threads)
    if isinstance(cfg.num_workers, bool) or not isinstance(cfg.num_workers, int):
        raise InputError(f"num_workers must be an int >= 0, got {cfg.num_workers!r}")
    if cfg.num_workers < 0:
        raise InputError(f"num_workers must be an int >= 0, got {cfg.num_workers!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise InputError(f"seed must be an int, got {cfg.seed!r}")
    if not (isinstance(cfg.tolerance, int | float) and cfg.tolerance >= 0):
        raise InputError(f"tolerance must be >= 0 pixels, got {cfg.tolerance!r}")
    if not (isinstance(cfg.top, int | float) and 0 < cfg.top <= 1):
        raise InputError(f"top must be a share of pixels in (0, 1], got {cfg.top!r}")
    if cfg.layer is not None and not isinstance(cfg.layer, str):
        raise InputError(f"layer must be a layer name (str) or None, got {cfg.layer!r}")
    options = {str(k): dict(v) for k, v in dict(cfg.method_options).items()}
    unknown = sorted(set(options) - set(methods))
    if unknown:
        raise InputError(
            f"method_options names {unknown[0]!r}, which is not in methods {list(methods)}"
        )
    try:
        json.dumps(options, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"method_options must hold plain JSON values ({exc})") from exc
    return dataclasses.replace(
        cfg,
        methods=methods,
        metrics=metrics,
        method_options=options,
        tolerance=float(cfg.tolerance),
        top=float(cfg.top),
    )


def _canonical_methods() -> list[str]:
    return sorted({get_method(n).name for n in available_methods()})


def _build_methods(model: nn.Module, cfg: ScoringConfig) -> tuple[list, dict[str, Any]]:
    out, described = [], {}
    for name in cfg.methods:
        try:
            cls = get_method(name)
        except SpecError:
            valid = _canonical_methods()
            raise SpecError(
                f"unknown attribution method {name!r}; {close_matches(str(name), valid)} "
                f"Valid methods: {', '.join(valid)}"
            ) from None
        if cls.explains != "class":
            raise InputError(
                f"method {name!r} maps one filter, not a class logit or head output, so it "
                "cannot be scored against a target; choose a class method such as cmwp, "
                "gradcam or integrated_gradients"
            )
        opts = dict(cfg.method_options.get(name, {}))
        layer = opts.pop("layer", None if cls.reads_own_layer else cfg.layer)
        if layer is not None and layer != "input":
            layer = resolve_layer(model, layer)[0]
        out.append((name, cls(model, layer=layer, **opts)))
        described[name] = {"class": cls.__name__, "layer": layer, "options": opts}
    return out, described


def _first_item(dataset: Any) -> tuple:
    item = dataset[0]
    if not isinstance(item, list | tuple) or not item or not isinstance(item[0], torch.Tensor):
        raise InputError(
            f"dataset items must be (image, label) or (image, label, PartAnnotation) tuples "
            f"with a C x H x W image tensor, got {type(item).__name__}"
        )
    return tuple(item)


def _ground_truth(item: tuple) -> tuple[set[str], PartAnnotation | None]:
    ann = item[2] if len(item) > 2 and isinstance(item[2], PartAnnotation) else None
    have: set[str] = set()
    if ann is not None:
        have.add("bbox")
        if ann.keypoints.shape[0] > 0:
            have.add("keypoints")
        if ann.object_mask is not None:
            have.add("object_mask")
        if ann.part_mask is not None:
            have.add("part_mask")
    return have, ann


def _build_metrics(cfg: ScoringConfig, have: set[str], targets: list[_Target], ds_name: str):
    has_class = {t.name: t.kind != "head" for t in targets}
    if cfg.metrics is None:
        names = [
            m
            for m in available_metrics()
            if all(r in have or r == "class" for r in get_metric(m).needs)
        ]
        if not all(has_class.values()):
            names = [m for m in names if "class" not in get_metric(m).needs]
        return [get_metric(m) for m in names]
    specs = [get_metric(m) for m in cfg.metrics]
    for spec in specs:
        for need in spec.needs:
            if need == "class":
                bad = [t for t, ok in has_class.items() if not ok]
                if bad:
                    raise InputError(
                        f"the metric {spec.name!r} needs {GROUND_TRUTH['class']}, but the "
                        f"target {bad[0]!r} is a plain head output; use a ClassHeadTarget "
                        "or drop the metric"
                    )
            elif need not in have:
                fits = [
                    m
                    for m in available_metrics()
                    if all(r in have or r == "class" for r in get_metric(m).needs)
                ]
                raise InputError(
                    f"the metric {spec.name!r} needs {GROUND_TRUTH[need]}; the data set "
                    f"{ds_name} has {', '.join(sorted(have)) or 'no ground truth'} (its "
                    f"items {'lack it' if have else 'carry no PartAnnotation'}). Choose "
                    f"metrics it supports ({', '.join(fits)}) or a data set with "
                    "annotations (load_dataset(..., annotations=True))"
                )
    return specs


def _build_targets(cfg: ScoringConfig, heads: Mapping[str, Any] | None) -> list[_Target]:
    targets = [_Target(cfg.target, cfg.target)] if cfg.target is not None else []
    for name, spec in dict(heads or {}).items():
        if not isinstance(name, str) or not name or name in _CLASS_TARGETS:
            raise InputError(
                f"head target names must be non-empty strings other than "
                f"'label' and 'predicted', got {name!r}"
            )
        if isinstance(spec, ClassHeadTarget):
            if not callable(getattr(spec.head, "as_target_module", None)):
                raise InputError(
                    f"ClassHeadTarget {name!r}: the head has no "
                    "as_target_module(class_index); fit it first"
                )
            targets.append(_Target(name, "class_head", spec))
        elif isinstance(spec, Target):
            targets.append(_Target(name, "head", spec))
        else:
            raise InputError(
                f"head target {name!r} must be a Target (e.g. HeadOutput(layer, module, "
                f"index)) or a ClassHeadTarget, got {type(spec).__name__}"
            )
    if not targets:
        raise InputError("nothing to explain: target=None and no head targets were given")
    return targets


def _head_fingerprint(t: _Target) -> dict[str, Any]:
    if t.kind == "head":
        head = getattr(t.spec, "head", None)
        fp = _model_fingerprint(head) if isinstance(head, nn.Module) else None
        return {"kind": "head", "target": t.spec.describe(), "weights": fp}
    if t.kind == "class_head":
        spec = t.spec
        classes = getattr(spec.head, "classes_", None)
        fps = {}
        if classes is not None:
            for c in torch.as_tensor(classes).tolist():
                fps[str(c)] = _model_fingerprint(spec.head.as_target_module(int(c)))
        return {
            "kind": "class_head",
            "head": type(spec.head).__name__,
            "layer": spec.layer,
            "index": int(spec.index),
            "weights": fps,
        }
    return {"kind": t.kind}


def _dataset_probe(dataset: Any, n: int, first: tuple) -> int:
    """CRC-32 of the first and last scored images and labels (to refuse resuming on other
    data); ``first`` is item 0, already read."""
    crc = 0
    for i in sorted({0, n - 1}):
        item = first if i == 0 else dataset[i]
        crc = zlib.crc32(item[0].detach().cpu().contiguous().numpy().tobytes(), crc)
        if len(item) > 1:
            crc = zlib.crc32(str(int(item[1])).encode(), crc)
    return crc


def _dataset_name(dataset: Any) -> str:
    """``Normalized(Subset(FashionMNIST))``: the wrappers and what they wrap."""
    names, seen = [], 0
    while dataset is not None and seen < 8:
        names.append(type(dataset).__name__)
        dataset = vars(dataset).get("dataset") if hasattr(dataset, "__dict__") else None
        seen += 1
    return "(".join(names) + ")" * (len(names) - 1)


def _plan(
    model, dataset, cfg: ScoringConfig, heads, model_spec: str | None, fit: DataFit | None = None
) -> _Plan:
    try:
        total = len(dataset)
    except TypeError:
        raise InputError(
            f"the data set must be a map-style Dataset with a length, got {type(dataset).__name__}"
        ) from None
    if total == 0:
        raise InputError("the data set is empty; nothing to score")
    n = min(total, cfg.n) if cfg.n is not None else total
    targets = _build_targets(cfg, heads)
    methods, described = _build_methods(model, cfg)
    item = _first_item(dataset)
    have, ann = _ground_truth(item)
    ds_name = _dataset_name(dataset)
    metrics = _build_metrics(cfg, have, targets, ds_name)
    if not metrics:
        raise InputError(
            f"no metric applies: the data set {ds_name} has "
            f"{', '.join(sorted(have)) or 'no ground truth'} and the targets explain no class"
        )
    p = int(ann.keypoints.shape[0]) if ann is not None else 0
    names = list(getattr(dataset, "part_names", None) or [])
    part_names = names if len(names) == p else [f"part{i}" for i in range(p)]
    value_columns = [c for m in metrics for c in m.columns(part_names)]
    shard_size = cfg.shard_size or 4 * cfg.batch_size
    spec = model_spec or type(model).__name__
    header = {
        "format": store.FORMAT,
        "version": store.VERSION,
        # how the run loads its data is not what it computes: num_workers stays out
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_workers"}
        | {"shard_size": shard_size},
        "methods": described,
        "metrics": [m.name for m in metrics],
        "targets": [t.name for t in targets],
        "heads": {t.name: _head_fingerprint(t) for t in targets},
        "model": {"spec": spec, "weights": _model_fingerprint(model)},
        "dataset": {
            "type": ds_name,
            "size": total,
            "scored": n,
            "ground_truth": sorted(have),
            "part_names": part_names,
            "probe_crc32": _dataset_probe(dataset, n, item),
        },
        "seed": cfg.seed,
        "per_image_columns": [
            "index",
            "label",
            "prediction",
            "target",
            "class",
            "method",
            *value_columns,
        ],
        "num_shards": -(-n // shard_size),
    }
    from .pipeline import _versions  # (the report pipeline's list of versions)

    header["versions"] = _versions()
    # as it reads back from the manifest (tuples become lists), for the resume comparison
    header = json.loads(json.dumps(header, allow_nan=False))
    return _Plan(
        model,
        dataset,
        cfg,
        n,
        shard_size,
        methods,
        metrics,
        targets,
        part_names,
        value_columns,
        header,
        fit,
    )


# --------------------------------------------------------------------------- one shard


# --------------------------------------------------------------------------- tables


# --------------------------------------------------------------------------- the runner


def score_dataset(
    model: nn.Module | Any,
    dataset: Any,
    config: ScoringConfig | None = None,
    *,
    heads: Mapping[str, Target | ClassHeadTarget] | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool = True,
    progress: bool = True,
    grey_to_rgb: bool = False,
) -> ScoreResult:
    """Score attribution methods on a data set with the metrics of :doc:`/methods/metrics`.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The classifier, on the device where the work runs (it is not moved; left exactly as
        it was).
    dataset : Dataset
        Map-style, items ``(image, label)`` or ``(image, label, PartAnnotation)`` with images
        ``C x H x W``: raw in ``[0, 1]`` where the data set's ``image_space`` is ``"raw"``
        (normalised here with the model's preprocessing, so pass the LoadedModel), else
        already normalised for the model (e.g. ``load_dataset(...,
        preprocessing=lm.preprocessing)``); batches that contradict this are refused.
        Ground truth (object masks, keypoints, part maps) comes from the annotations; every
        image must have what the metrics need.
    config : ScoringConfig, optional
        Methods, metrics, layer, sizes, seed (defaults: c-MWP and Grad-CAM, every metric the
        data supports).
    heads : dict of str to Target or ClassHeadTarget, optional
        Outputs of fitted heads to explain as well, by name: a fixed target for every image
        (``HeadOutput("fc6", nmf.as_target_module(), index=2)``) or one per image's class
        (:class:`ClassHeadTarget`).
    out : path, optional
        Folder for the shards and tables (resumable); in memory only when ``None``.
    overwrite : bool
        Delete a previous run in ``out`` and start over.
    resume : bool
        Continue a previous run in ``out`` that was started with the same arguments (and
        return it if finished); with ``False`` such a folder is an error.
    progress : bool
        Show a tqdm progress bar (rank 0).
    grey_to_rgb : bool
        Accept a grey (1-channel) data set for a colour model by repeating the channel.

    Returns
    -------
    ScoreResult
        The same tables on every rank of a ``torchrun`` launch; the full manifest (shards
        done, ``runs``) on rank 0, which writes the folder, and its configuration part on
        the other ranks.

    Raises
    ------
    SpecError
        Unknown method or metric names (the message lists the valid ones).
    InputError
        Empty data set, a metric whose ground truth the data lacks, images without labels
        for the label target, bad configuration values, or an ``out`` folder that holds
        something else.
    AssetError
        The folder cannot be written, or holds damaged shards.
    """
    loaded = model
    loaded_spec = getattr(model, "spec", None) if not isinstance(model, nn.Module) else None
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or LoadedModel, got {type(model).__name__}")
    cfg = _check_config(config if config is not None else ScoringConfig())
    if cfg.save_maps and out is None:
        raise InputError("save_maps=True writes the maps next to the tables: pass out=FOLDER")
    t0 = time.perf_counter()
    # the labels are read as the model's classes unless only predicted classes and heads
    # are explained
    fit = data_fit(
        loaded, dataset, grey_to_rgb=grey_to_rgb, labels_are_classes=cfg.target == "label"
    )
    plan = _plan(model, dataset, cfg, heads, loaded_spec, fit)
    if cfg.save_maps:
        pre = getattr(loaded, "preprocessing", None)
        names = getattr(loaded, "class_names", None) or getattr(dataset, "class_names", None)
        info = {
            "preprocessing": None if pre is None else dataclasses.asdict(pre),
            "class_names": list(names) if names else None,
        }
        plan = dataclasses.replace(
            plan, maps_dir=Path(out).resolve() / "maps", maps_info=json.loads(json.dumps(info))
        )
    group = Group(model_device(model))
    if model_device(model).type == "cpu":
        # the activations' memory stays mapped between batches (see _allocator)
        raise_heap_thresholds()
    folder = store.RunFolder(Path(out).resolve(), plan.header) if out is not None else None
    try:
        return _run(plan, group, folder, overwrite, resume, progress, t0)
    except BaseException:
        if folder is not None and group.rank == 0:
            folder.discard_if_empty()  # nothing half-written: no manifest without a shard
        raise
    finally:
        group.close()


def _run(
    plan: _Plan,
    group: Group,
    folder: store.RunFolder | None,
    overwrite: bool,
    resume: bool,
    progress: bool,
    t0: float,
) -> ScoreResult:
    out = folder.root if folder is not None else None
    rows_of = [plan.rows(k) for k in range(plan.num_shards)]

    def open_folder() -> tuple[torch.Tensor, torch.Tensor]:
        done = (
            {}
            if folder is None
            else folder.open(overwrite=overwrite, resume=resume, ncols=plan.ncols, rows_of=rows_of)
        )
        ids = torch.tensor(sorted(done), dtype=torch.long)
        mats = [done[k] for k in sorted(done)]
        return ids, (torch.cat(mats) if mats else torch.zeros(0, plan.ncols, dtype=torch.float64))

    opened = group.on_rank0(open_folder, "prepare the output folder")
    if plan.maps_dir is not None:
        from ..interop.maps import write_manifest

        maps_dir = plan.maps_dir
        group.on_rank0(
            lambda: write_manifest(maps_dir, {**plan.header, **plan.maps_info}, plan.num_shards),
            "write the maps manifest",
        )
    n_done = group.broadcast(torch.tensor([0 if opened is None else opened[0].numel()]))
    ids = opened[0] if opened is not None else torch.zeros(int(n_done[0]), dtype=torch.long)
    ids = group.broadcast(ids)
    mat = group.broadcast_matrix(None if opened is None else opened[1], plan.ncols)
    results: dict[int, torch.Tensor] = {}
    pos = 0
    for k in ids.tolist():
        results[k] = mat[pos : pos + rows_of[k]]
        pos += rows_of[k]
    pending = [k for k in range(plan.num_shards) if k not in results]
    if folder is not None:
        info = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": group.world,
            "backend": group.backend,
            "threads": torch.get_num_threads(),
            "device": str(model_device(plan.model)),
            "resumed_shards": len(results),
        }
        # a finished run is returned as it is, without a new entry in "runs"
        group.on_rank0(
            lambda: folder.manifest["complete"] or folder.start_run(info), "record the run"
        )
    mine_all = pending[group.rank :: group.world]
    # a helper process for interpreter-bound pure metrics (see _metrics_process), forked
    # before the progress bar's, writer's and metrics' threads start
    helper = MetricsProcess.start(
        any(spec.offloads for spec in plan.metrics)
        and group.world == 1
        and model_device(plan.model).type == "cpu"
        and sum(len(_shard_batches(plan, k)) for k in mine_all) >= MIN_BATCHES
    )
    try:
        bar = None
        if progress and group.rank == 0 and pending:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=plan.n,
                initial=sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in results),
                unit="img",
                desc="score",
                leave=False,
            )
        # this rank's shards, in order, loaded ahead by one DataLoader; shards are written by a
        # background thread on rank 0 while the next ones are scored
        loaded = batches(
            plan.dataset,
            [b for k in mine_all for b in _shard_batches(plan, k)],
            plan.cfg.num_workers,
        )
        writer = store.BackgroundWriter() if folder is not None and group.rank == 0 else None
        # one thread for the pure metrics of the whole run (they overlap the next batch)
        metrics_pool = ThreadPoolExecutor(1, thread_name_prefix="xnn-score-metrics")
    except BaseException:
        helper.close()
        raise

    def gather(
        r: int, finish: Callable[[], torch.Tensor] | None, error: Exception | None, seconds: float
    ) -> None:
        """Finish this rank's shard of round ``r`` and gather every rank's (errors too)."""
        value = None
        if finish is not None:
            ts = time.perf_counter()
            try:
                value = finish()
            except Exception as exc:  # noqa: BLE001 - every rank raises in gather_results
                error = exc
            seconds += time.perf_counter() - ts
        got = group.gather_results(value, error, plan.ncols)
        secs = group.all_gather(torch.tensor([seconds], dtype=torch.float64))
        new = {}
        for rank, m in enumerate(got):
            if r + rank < len(pending):
                k = pending[r + rank]
                results[k] = m if m is not None else torch.zeros(0, plan.ncols, dtype=torch.float64)
                a, b = plan.bounds(k)
                new[k] = (a, b, results[k], float(secs[rank][0]))
        if folder is not None:
            group.on_rank0(
                lambda: writer.submit(folder.write_shards, new),  # type: ignore[union-attr]
                "write a shard",
            )
        if bar is not None:
            bar.update(sum(b - a for a, b, _, _ in new.values()))

    try:
        # each round's shard is explained before the previous round's is finished and
        # gathered: the previous shard's last pure metrics overlap this shard's first batch
        before: tuple[int, Callable[[], torch.Tensor] | None, Exception | None, float] | None
        before = None
        for r in [*range(0, len(pending), group.world), None]:
            now = None
            if r is not None:
                mine = pending[r + group.rank] if r + group.rank < len(pending) else None
                finish, error, seconds = None, None, 0.0
                # after an error on this rank, the loader is not where the next shard starts:
                # explain nothing more; the error reaches every rank at its round's gather
                if mine is not None and (before is None or before[2] is None):
                    ts = time.perf_counter()
                    try:
                        finish = _score_shard(plan, mine, loaded, metrics_pool, helper)
                    except Exception as exc:  # noqa: BLE001 - every rank raises in gather
                        error = exc
                    seconds = time.perf_counter() - ts
                now = (r, finish, error, seconds)
            if before is not None:
                gather(*before)
            before = now
        if folder is not None:
            group.on_rank0(lambda: writer.drain(), "write a shard")  # type: ignore[union-attr]
    finally:
        loaded.close()
        metrics_pool.shutdown(wait=True)
        helper.close()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()
    values = torch.cat([results[k] for k in range(plan.num_shards)])
    per_image, aggregate = _tables(plan, values)
    if folder is not None:
        texts = _table_texts(plan, per_image, aggregate)
        group.on_rank0(
            lambda: folder.manifest["complete"] or folder.finish(texts, time.perf_counter() - t0),
            "write the tables",
        )
    manifest = (
        folder.manifest
        if folder is not None and group.rank == 0
        else {**plan.header, "complete": True, "shards": [], "runs": []}
    )
    return ScoreResult(per_image, aggregate, manifest, None if out is None else Path(out).resolve())
