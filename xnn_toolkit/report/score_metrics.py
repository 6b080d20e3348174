"""The metrics that the batch scoring runner knows by name (:doc:`/methods/metrics`).

Each entry scores one heatmap per image (``N x H x W``, at the image's resolution) against
what the data set knows about that image, and gives one or more per-image columns; the runner
(:mod:`xnn_toolkit.report.scoring`) turns those into per-image and aggregate tables. The
numbers come from :mod:`xnn_toolkit.metrics`; nothing is re-implemented here.

- ``pointing_game``: hit (0/1) of the heatmap's maximum, 15-pixel tolerance; needs object
  masks. ``pointing_game_box``: the same against the bounding box.
- ``energy_pointing_game``: share of the positive heatmap mass inside the object mask;
  ``energy_pointing_game_box``: inside the bounding box.
- ``iou``: IoU of the top-30 % pixels with the object mask; ``apNN`` (e.g. ``ap50``):
  ``[IoU >= NN %]``, whose mean over images is APn (Liang et al. 2020 App. H).
- ``voronoi_locality``: Voronoi part probabilities (thesis Algorithm 3), one column
  ``voronoi[<part>]`` per part plus ``voronoi[context]``; needs part keypoints and boxes.
- ``mask_locality``: object-mask part probabilities, one column ``mask_parts[<part>]`` per
  part; needs part label maps.
- ``deletion`` / ``insertion``: areas under the curves of the explained class's probability;
  need the model only (and a class: not for plain head-output targets).

Aggregates are the mean, standard deviation and count of each column; the two locality
metrics also give the locality entropy ``H = −Σ_p s_p log s_p`` of the mean part histogram
(:doc:`/methods/metrics`), reported in the ``mean`` field of their own row.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data.types import PartBatch
from ..errors import InputError, SpecError, close_matches
from ..metrics import (
    box_masks,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    iou,
    mask_part_probabilities,
    pointing_game,
    top_pixels,
    voronoi_part_probabilities,
)
from ._metrics_process import Offload, run_here

__all__ = ["GROUND_TRUTH", "MetricSpec", "ScoreInputs", "available_metrics", "get_metric"]

#: Ground truth a metric can need, with the data sets that carry it (for error messages).
GROUND_TRUTH: dict[str, str] = {
    "object_mask": "object masks (PartAnnotation.object_mask): SyntheticParts, MaskFolder, "
    "CUBFolder with a segmentations/ folder",
    "bbox": "bounding boxes (PartAnnotation.bbox): SyntheticParts, CUBFolder, MaskFolder",
    "keypoints": "part keypoints and boxes (PartAnnotation.keypoints): SyntheticParts, "
    "CUBFolder, MaskFolder(kind='parts')",
    "part_mask": "part label maps (PartAnnotation.part_mask): SyntheticParts, "
    "MaskFolder(kind='parts'), CUBFolder with a part_segmentations/ folder",
    "class": "a class per image to score (class targets, or ClassHeadTarget heads); plain "
    "head targets have none",
}


@dataclass(frozen=True)
class ScoreInputs:
    """What a metric sees for one batch, one target and one method.

    Attributes
    ----------
    maps : Tensor
        ``N x H x W`` heatmaps at image resolution, on the model's device; for a
        :attr:`MetricSpec.stacked` metric ``N x M x H x W``, the maps of the ``M`` methods
        of one target (the per-image ground truth is then computed once for all of them).
    images : Tensor
        ``N x C x H x W`` model inputs.
    classes : Tensor
        ``N`` int64 class explained on each image (``-1`` where the target has none).
    parts : PartBatch or None
        Ground truth of the batch.
    model : nn.Module
        The classifier (deletion / insertion run it).
    tolerance : float
        Pointing-game tolerance in pixels.
    top : float
        Share of pixels of the top-``top`` segmentation used by ``iou`` / ``apNN``.
    steps : int
        Steps of the deletion / insertion curves.
    batch_size : int
        Perturbed images per forward pass of the curves.
    cache : dict
        Values shared by several metrics of the same heatmaps (the IoU of ``iou`` and
        ``apNN``).
    method : str
        Registry name of the method that made ``maps`` (metrics that re-explain, such as
        Quantus's robustness and randomisation metrics, call it again).
    method_options : dict
        Its constructor options, ``layer`` included.
    offload : callable
        ``offload(fn, *args) -> fn(*args)``: where a pure metric runs work that holds the
        interpreter (pure Python and NumPy on Python objects; ``fn`` and ``args`` picklable):
        the run's metrics process when it has one, else here.
    """

    maps: torch.Tensor
    images: torch.Tensor
    classes: torch.Tensor
    parts: PartBatch | None
    model: nn.Module
    tolerance: float
    top: float
    steps: int
    batch_size: int
    cache: dict = field(default_factory=dict)
    method: str = ""
    method_options: dict = field(default_factory=dict)
    offload: Offload = run_here


Compute = Callable[[ScoreInputs], list[torch.Tensor]]


@dataclass(frozen=True)
class MetricSpec:
    """A metric the runner can compute.

    Attributes
    ----------
    name : str
    needs : tuple of str
        Keys of :data:`GROUND_TRUTH`.
    per_part : str or None
        Column prefix when the metric gives one column per part (``prefix[part]``) and a
        locality entropy aggregate; ``None`` for one column named after the metric.
    context : bool
        With ``per_part``: a last column for the heatmap mass outside the object box.
    compute : callable
        ``compute(inputs) -> list of N-vectors``, one per column (``N x M`` for a
        stacked metric).
    stacked : bool
        The metric takes the maps of every method at once (``N x M x H x W``): a function
        of each map and the image's ground truth only. Metrics that run the model or a
        method again (deletion, insertion, most Quantus metrics) see one method at a time.
    pure : bool
        A function of the maps and the ground truth only (no model, no random draws): the
        runner computes it in its metrics thread, off the critical path. Stacked metrics
        are pure.
    offloads : bool
        A pure metric that hands interpreter-bound work to :attr:`ScoreInputs.offload`
        (Quantus's complexity metrics): the runner then starts its metrics process where it
        can.
    """

    name: str
    needs: tuple[str, ...]
    compute: Compute
    per_part: str | None = None
    context: bool = False
    stacked: bool = False
    pure: bool = False
    offloads: bool = False

    def __post_init__(self) -> None:
        if self.stacked and not self.pure:
            object.__setattr__(self, "pure", True)

    def columns(self, part_names: Sequence[str]) -> list[str]:
        """Per-image column names (``name`` or ``prefix[part]`` per part)."""
        if not self.per_part:
            return [self.name]
        cols = [f"{self.per_part}[{p}]" for p in part_names]
        return cols + ([f"{self.per_part}[context]"] if self.context else [])


def _mask(inp: ScoreInputs) -> torch.Tensor:
    assert inp.parts is not None and inp.parts.object_mask is not None
    return inp.parts.object_mask


def _box(inp: ScoreInputs) -> torch.Tensor:
    assert inp.parts is not None
    return box_masks(inp.parts.bbox, tuple(inp.maps.shape[-2:]))


def _split(t: torch.Tensor) -> list[torch.Tensor]:
    """One column per entry of the last dimension (parts)."""
    return list(t.unbind(-1))


def _iou(inp: ScoreInputs) -> torch.Tensor:
    if "iou" not in inp.cache:
        inp.cache["iou"] = iou(top_pixels(inp.maps, inp.top), _mask(inp))
    return inp.cache["iou"]


def _check_classes(inp: ScoreInputs, name: str) -> torch.Tensor:
    if bool((inp.classes < 0).any()):
        raise InputError(
            f"the metric {name!r} scores the model's output for a class, but this target "
            "explains no class; use a class target ('label' / 'predicted') or a "
            "ClassHeadTarget, or drop the metric"
        )
    return inp.classes.to(inp.images.device)


def _curve_auc(inp: ScoreInputs, insertion: bool) -> torch.Tensor:
    fn = insertion_curve if insertion else deletion_curve
    tgt = _check_classes(inp, "insertion" if insertion else "deletion")
    return fn(inp.model, inp.images, inp.maps, tgt, steps=inp.steps, batch_size=inp.batch_size).auc


def _ap(threshold: float) -> Compute:
    return lambda inp: [(_iou(inp) >= threshold).double()]


_REGISTRY: dict[str, MetricSpec] = {
    m.name: m
    for m in (
        MetricSpec(
            "pointing_game",
            ("object_mask",),
            lambda inp: [pointing_game(inp.maps, _mask(inp), inp.tolerance).double()],
            stacked=True,
        ),
        MetricSpec(
            "pointing_game_box",
            ("bbox",),
            lambda inp: [pointing_game(inp.maps, _box(inp), inp.tolerance).double()],
            stacked=True,
        ),
        MetricSpec(
            "energy_pointing_game",
            ("object_mask",),
            lambda inp: [energy_pointing_game(inp.maps, _mask(inp))],
            stacked=True,
        ),
        MetricSpec(
            "energy_pointing_game_box",
            ("bbox",),
            lambda inp: [energy_pointing_game(inp.maps, _box(inp))],
            stacked=True,
        ),
        MetricSpec("iou", ("object_mask",), lambda inp: [_iou(inp)], stacked=True),
        MetricSpec(
            "voronoi_locality",
            ("keypoints",),
            lambda inp: _split(voronoi_part_probabilities(inp.maps, inp.parts, context=True)),
            per_part="voronoi",
            context=True,
            stacked=True,
        ),
        MetricSpec(
            "mask_locality",
            ("part_mask",),
            lambda inp: _split(mask_part_probabilities(inp.maps, inp.parts)),
            per_part="mask_parts",
            stacked=True,
        ),
        MetricSpec("deletion", ("class",), lambda inp: [_curve_auc(inp, False)]),
        MetricSpec("insertion", ("class",), lambda inp: [_curve_auc(inp, True)]),
    )
}

_AP = re.compile(r"^ap(\d{1,2}|100)$")


#: Short names users type, and the metric each stands for.
_ALIASES = {"pointing": "pointing_game", "energy_pointing": "energy_pointing_game"}


def available_metrics() -> list[str]:
    """Names accepted by the scoring runner, sorted (``apNN`` for any ``NN`` in 1..100).

    Returns
    -------
    list of str
    """
    return sorted([*_REGISTRY, "ap50"])


def get_metric(name: str) -> MetricSpec:
    """The metric registered under ``name`` (``apNN``: APn with ``IoU >= NN %``).

    Raises
    ------
    SpecError
        Unknown name; the message lists every valid name and the closest ones.
    """
    if isinstance(name, str) and name.strip().lower().startswith("quantus:"):
        from ..interop.quantus import quantus_metric_spec

        return quantus_metric_spec(name.strip())
    if isinstance(name, str):
        key = name.strip().lower().replace("-", "_")
        key = _ALIASES.get(key, key)
        if key in _REGISTRY:
            return _REGISTRY[key]
        ap = _AP.match(key)
        if ap and int(ap.group(1)) >= 1:
            return MetricSpec(key, ("object_mask",), _ap(int(ap.group(1)) / 100), stacked=True)
    names = available_metrics()
    hint = close_matches(str(name), names)
    raise SpecError(
        f"unknown metric {name!r}; {hint} Valid metrics: {', '.join(names)} (apNN for any "
        "NN in 1..100; quantus:NAME for any Quantus metric)"
    )
