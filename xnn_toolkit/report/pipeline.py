"""The end-to-end explanation run behind ``xnn demo`` and ``xnn explain``.

model + data → activation bank → heads (XNN/SRAE and baselines, NMF concepts, class
paths, class-specific gates) → heatmaps (Excitation Backprop, Grad-CAM, ...) → metrics →
report. Each stage is a function that adds a section to a :class:`Report`; the data flows one
way through the plain dataclass :class:`_Run`, and what a stage makes for later ones is a
typed field of :class:`_Artifacts`. Sections whose ground truth the data lacks (part
keypoints, object masks) say so in the report instead of showing numbers.

The configuration is checked once, before any work (:meth:`ExplainConfig.validate`): unknown
XNN kinds, attribution methods, stages or figure formats fail at the door with the closest
names.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import AssetError, InputError
from ._explain_stages import STAGES, XNN_KINDS
from .document import Card, Figure, Report, Table, progress_bar

if TYPE_CHECKING:
    from ..bank import ActivationBank

__all__ = ["ExplainConfig", "STAGES", "XNN_KINDS", "build_report", "run_explain"]


@dataclass
class ExplainConfig:
    """What to explain and how much work to spend on it.

    Attributes
    ----------
    model : str, nn.Module or LoadedModel
        Model spec (``bundled:vgg_synth``, ``timm:resnet18``, a weights file...), or a model
        already in memory (left unchanged by the run).
    dataset : str
        Dataset spec (see :func:`xnn_toolkit.data.load_dataset`).
    fc_layer : str or None
        Layer the XNN heads attach to (default: ``fc6`` when the model has it, else the
        output of the last fully connected layer below the classifier).
    conv_layer : str or None
        Conv layer for NMF concepts and heatmaps (default: the model's default read
        layer, VGG pool4 / ResNet stage 3).
    gate_layer : str or None
        Conv layer of the class-specific gates (default: the last stage, as in Liang et al. 2020;
        ``conv_layer`` when the model's stages are unknown).
    class_names : sequence of str, optional
        Overrides the names of the model card or the dataset.
    image_size : int, optional
        Image size passed to the dataset (default: the dataset's own).
    n_train, n_test : int
        Images used to fit heads and to score them.
    n_features : int
        x-features per XNN head.
    hidden : tuple of int
        XNN encoder hidden sizes.
    xnn_epochs : int
        Maximum epochs of the XNN heads.
    kinds : tuple of str
        XNN variants to compare (:data:`XNN_KINDS`).
    nmf_rank : int
    path_epochs, gate_epochs : int
    path_images : int
        Training images the class paths are fitted on (at most ``n_train``).
    heatmap_images : int
        Test images that get x-feature heatmaps (for orthogonality and locality).
    z_units : int
        Dimensions of Z (the most active on the heatmap images) whose heatmaps give the
        locality of the thesis's "Z" column; 0 skips it.
    gallery_classes : int
        Classes that get a gate filter gallery.
    methods : tuple of str
        Attribution methods compared on class logits (localization table).
    figure_formats : tuple of str
        Formats of every figure (PNG always; SVG and PDF on request).
    device : str
    seed : int
    progress : bool
    """

    model: Any = "bundled:vgg_synth"
    dataset: str = "synthetic"
    fc_layer: str | None = None
    conv_layer: str | None = None
    gate_layer: str | None = None
    class_names: Sequence[str] | None = None
    image_size: int | None = None
    n_train: int = 3000
    n_test: int = 600
    n_features: int = 5
    hidden: tuple[int, ...] = (256, 64)
    xnn_epochs: int = 40
    kinds: tuple[str, ...] = XNN_KINDS
    nmf_rank: int = 8
    path_epochs: int = 3
    path_images: int = 3000
    gate_epochs: int = 6
    heatmap_images: int = 200
    z_units: int = 8
    gallery_classes: int = 3
    methods: tuple[str, ...] = ("cmwp", "mwp", "gradcam", "saliency")
    figure_formats: tuple[str, ...] = ("png",)
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **kw: object) -> ExplainConfig:
        """Small sizes for smoke tests (about a minute on 2 cores)."""
        base = dict(
            n_train=600,
            n_test=120,
            hidden=(32, 16),
            xnn_epochs=4,
            kinds=("srae", "nn"),
            nmf_rank=4,
            path_epochs=1,
            path_images=600,
            gate_epochs=2,
            heatmap_images=40,
            z_units=4,
            gallery_classes=2,
            methods=("cmwp", "gradcam"),
        )
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]

    def validate(self) -> None:
        """Check every setting before any work.

        Raises
        ------
        InputError
            A count out of range, an unknown XNN kind or figure format, a filter method
            among ``methods``.
        SpecError
            An unknown attribution method (with the closest names).
        """
        from ..viz.heatmaps import FORMATS
        from .heatmaps import class_method

        for name in (
            "n_train",
            "n_test",
            "n_features",
            "xnn_epochs",
            "nmf_rank",
            "path_epochs",
            "path_images",
            "gate_epochs",
            "heatmap_images",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        for name in ("z_units", "gallery_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        if self.n_train < 2 or self.n_test < 2:
            raise InputError("n_train and n_test must be at least 2")
        kinds = tuple(self.kinds)
        bad = [k for k in kinds if k not in XNN_KINDS]
        if bad or not kinds:
            raise InputError(f"unknown XNN kinds {bad or kinds}; choose from {XNN_KINDS}")
        if not self.methods:
            raise InputError("methods is empty; give at least one attribution method")
        for m in self.methods:
            class_method(m)
        bad = [f for f in self.figure_formats if f not in FORMATS]
        if bad:
            raise InputError(f"unknown figure formats {bad}; choose from {FORMATS}")
        if self.class_names is not None and not all(isinstance(c, str) for c in self.class_names):
            raise InputError("class_names must be strings")

    def describe(self) -> dict[str, Any]:
        """The settings as JSON-friendly values (a model in memory is named by its class)."""
        out = dict(self.__dict__)
        if not isinstance(self.model, str | os.PathLike):
            inner = getattr(self.model, "model", self.model)
            out["model"] = f"module:{type(inner).__name__}"
        else:
            out["model"] = os.fspath(self.model)
        return out


@dataclass
class _Artifacts:
    """What a stage makes for the later ones (each field written by one stage)."""

    train_note: str = ""  # _prepare: where the heads' training images come from
    bank_train: ActivationBank | None = None  # _bank_section
    bank_test: ActivationBank | None = None  # _bank_section
    xnn_heads: dict[str, Any] = field(default_factory=dict)  # _xnn_section: kind -> fitted head
    xnn_rows: list[dict[str, Any]] = field(default_factory=list)  # _xnn_section: F_reg / F_cls


@dataclass
class _Run:
    """What the stages hand each other."""

    cfg: ExplainConfig
    model: nn.Module
    loaded: object
    spec: str
    class_names: list[str]
    x_train: torch.Tensor  # normalised N x C x H x W
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_test: torch.Tensor  # images in [0, 1] for figures
    parts: object | None  # PartBatch of the test images, when the data has annotations
    fc_layer: str
    conv_layer: str
    timings: dict[str, float] = field(default_factory=dict)
    made: _Artifacts = field(default_factory=lambda: _Artifacts())

    def figure(self, name: str, fig: object, caption: str = "") -> Figure:
        return Figure(name, fig, caption=caption, formats=tuple(self.cfg.figure_formats))


def _stage(run: _Run, name: str, fn: Callable[[], None]) -> None:
    t = time.perf_counter()
    fn()
    run.timings[name] = round(time.perf_counter() - t, 2)


def _images(ds: object, n: int) -> tuple[torch.Tensor, torch.Tensor, object | None]:
    """The first ``n`` items of a dataset as images in [0, 1], labels and their parts."""
    from ..data import SyntheticParts, collate_annotations

    inner = getattr(ds, "dataset", ds)
    if isinstance(ds, SyntheticParts) or isinstance(inner, SyntheticParts):
        synth = ds if isinstance(ds, SyntheticParts) else inner
        images, batch = synth.render_batch(range(min(n, len(synth))))
        return images, batch.labels, batch
    items = [ds[i] for i in range(min(n, len(ds)))]
    if not items:
        raise InputError("the dataset is empty")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items])
    anns = [it[2] for it in items if len(it) > 2]
    parts = collate_annotations(anns) if len(anns) == len(items) else None
    return images, labels, parts


def _load(model: object, device: str) -> tuple[object, str]:
    """A LoadedModel from a spec, a module or a LoadedModel, and the spec to print."""
    from ..models import LoadedModel, load_model

    if isinstance(model, LoadedModel):
        return model, model.spec
    lm = load_model(model, device=device)
    return lm, (os.fspath(model) if isinstance(model, str | os.PathLike) else lm.spec)


def _fc_layer(model: nn.Module, fc_layer: str | None) -> str:
    """The XNN layer: the one given, else ``fc6``, else the last linear below the classifier."""
    from ..layers import list_layers, resolve_layer

    fc = fc_layer or ("fc6" if "fc6" in set(list_layers(model)) else None)
    if fc is None:
        linears = list_layers(model, nn.Linear)
        if len(linears) < 2:
            raise InputError(
                "the model has no fully connected layer below its classifier for the XNN "
                "heads; pass fc_layer= (a layer whose output is N x D)"
            )
        fc = linears[-2]
    return resolve_layer(model, fc)[0]


def _prepare(cfg: ExplainConfig) -> _Run:
    from ..data import load_dataset
    from ..layers import default_read_layer, resolve_layer

    torch.manual_seed(cfg.seed)
    lm, spec = _load(cfg.model, cfg.device)
    model = lm.model
    fc = _fc_layer(model, cfg.fc_layer)
    conv = resolve_layer(model, cfg.conv_layer or default_read_layer(model))[0]
    kw = {} if cfg.image_size is None else {"size": cfg.image_size}
    test = load_dataset(cfg.dataset, split="test", n=cfg.n_test, **kw)
    raw_test, y_test, parts = _images(test, cfg.n_test)
    note = ""
    try:
        train = load_dataset(cfg.dataset, split="train", n=cfg.n_train, **kw)
        raw_train, y_train, _ = _images(train, cfg.n_train)
    except AssetError:  # e.g. the bundled Fashion-MNIST holds the test split only
        train = load_dataset(cfg.dataset, split="test", n=cfg.n_test + cfg.n_train, **kw)
        raw_all, y_all, _ = _images(train, cfg.n_test + cfg.n_train)
        raw_train, y_train = raw_all[len(y_test) :], y_all[len(y_test) :]
        if len(y_train) < 2:
            raise
        note = (
            f" The dataset has no train split here: the heads are fitted on test images "
            f"{len(y_test)} to {len(y_test) + len(y_train) - 1}, never scored."
        )
    from ..datafit import data_fit

    # the one door of every entry point: channels, classes and class names must fit
    fit = data_fit(lm, test, arg=f"the dataset {cfg.dataset!r}")
    for y, at in ((y_train, 0), (y_test, 0)):
        fit.labels(y, at)
    names = cfg.class_names or lm.class_names or getattr(train, "classes", None)
    k = int(torch.cat([y_train, y_test]).max()) + 1
    class_names = [str(c) for c in names] if names else [str(i) for i in range(k)]
    if len(class_names) < k:
        raise InputError(f"got {len(class_names)} class names for labels up to {k - 1}")
    return _Run(
        cfg=cfg,
        model=model,
        loaded=lm,
        spec=spec,
        class_names=class_names,
        x_train=fit.images(raw_train),
        y_train=y_train,
        x_test=fit.images(raw_test),
        y_test=y_test,
        raw_test=raw_test,
        parts=parts,
        fc_layer=fc,
        conv_layer=conv,
        made=_Artifacts(train_note=note),
    )


# ------------------------------------------------------------------------------- model


# ------------------------------------------------------------------------- activations


# --------------------------------------------------------------------------------- XNN


# ---------------------------------------------------------------------------- heatmaps


# ------------------------------------------------------------------------ localization


# --------------------------------------------------------------------------------- NMF


# ------------------------------------------------------------------------------- paths


# ------------------------------------------------------------------------------- gates


#: Stages another stage needs (added automatically).
NEEDS = {"xnn": ("activations",), "heatmaps": ("xnn",), "nmf": ("activations",)}


def _resolve_stages(stages: Sequence[str] | None) -> list[str]:
    from ..errors import close_matches

    names = list(STAGES) if stages is None else [str(n).strip() for n in stages]
    for n in names:
        if n not in STAGES:
            raise InputError(
                f"unknown stage {n!r}; {close_matches(n, STAGES)} (stages: {', '.join(STAGES)})"
            )
    want = set(names)
    todo = list(want)
    while todo:
        for dep in NEEDS.get(todo.pop(), ()):
            if dep not in want:
                want.add(dep)
                todo.append(dep)
    return [n for n in STAGES if n in want]


def build_report(cfg: ExplainConfig, stages: Sequence[str] | None = None) -> Report:
    """Run the stages and return the report (not yet written).

    Parameters
    ----------
    cfg : ExplainConfig
    stages : sequence of str, optional
        Subset of :data:`STAGES` (run in their order, with the stages they need); default
        all.

    Returns
    -------
    Report

    Raises
    ------
    InputError, SpecError
        A bad setting or stage name (before any work).
    """
    names = _resolve_stages(stages)
    cfg.validate()
    with user_model(cfg.model):
        return _build(cfg, names)


@contextlib.contextmanager
def user_model(model: object) -> Iterator[None]:
    """Keep a model passed in memory exactly as it was (``load_model`` puts it in eval mode).

    Parameters
    ----------
    model : str, nn.Module or LoadedModel
        Specs are loaded fresh and need no care.
    """
    from .._guard import model_guard

    inner = getattr(model, "model", model)
    if not isinstance(inner, nn.Module):
        yield
        return
    with model_guard(inner, eval_mode=True):
        yield


def _build(cfg: ExplainConfig, names: list[str]) -> Report:
    t0 = time.perf_counter()
    run = _prepare(cfg)
    run.timings["load model and data"] = round(time.perf_counter() - t0, 2)
    report = Report(f"xnn_toolkit report: {run.spec} on {cfg.dataset}")
    bar = progress_bar(names, desc="xnn", disable=not cfg.progress)
    for name in bar:
        bar.set_postfix_str(name)
        _stage(run, name, lambda name=name: STAGES[name](report, run))
    _stage(run, "draw figures", lambda: report.render_figures(cfg.progress))
    run.timings["total"] = round(time.perf_counter() - t0, 2)
    versions = _versions()
    s = report.section("Run")
    s.add(
        Table(
            "timings",
            [{"stage": k, "seconds": v} for k, v in run.timings.items()],
            caption="Wall-clock seconds per stage",
        )
    )
    s.add(
        Card(
            versions
            | {
                "device": cfg.device,
                "torch threads": torch.get_num_threads(),
                "seed": cfg.seed,
                "platform": platform.platform(),
            }
        )
    )
    report.meta.update(config=cfg.describe(), stages=names, timings=run.timings, versions=versions)
    return report


def _versions() -> dict[str, str]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str]:
    """Looked up once per process (reading every package's metadata takes ~20 ms)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (
        "xnn_toolkit",
        "torch",
        "torchvision",
        "timm",
        "captum",
        "scikit-learn",
        "scipy",
        "numpy",
        "matplotlib",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_explain(
    cfg: ExplainConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    stages: Sequence[str] | None = None,
) -> str:
    """Run the pipeline and write the report folder.

    The settings, the stages and ``out`` are checked before any work; the folder is written
    next to its destination and moved into place at the end (nothing half-written).

    Parameters
    ----------
    cfg : ExplainConfig
    out : path
        Report folder; it must not exist or be empty, unless ``overwrite``.
    overwrite : bool
    stages : sequence of str, optional
        See :func:`build_report`.

    Returns
    -------
    str
        Path of ``index.html``.
    """
    out_abs = os.path.abspath(os.fspath(out))
    if os.path.isfile(out_abs):
        raise InputError(f"--out {os.fspath(out)!r} is a file; give a folder")
    if os.path.isdir(out_abs) and os.listdir(out_abs) and not overwrite:
        raise InputError(
            f"--out {os.fspath(out)!r} exists and is not empty; pass --overwrite or choose "
            "another folder"
        )
    _resolve_stages(stages)
    cfg.validate()
    return build_report(cfg, stages).write(out_abs, overwrite=overwrite)
