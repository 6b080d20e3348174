"""Heatmap figures of a model on a dataset, for papers and slides: what ``xnn figures`` writes.

:func:`figure_report` explains a few images with one or several attribution methods and lays
the heatmaps out as a grid of overlays (rows: images, columns: methods); with ``xnn=True`` it
also fits an SRAE head on a fully connected layer and draws the thesis's layout (Khorram 2020,
Fig. 3.1 / 3.8: image, 1-heatmap, x-features sorted by their contribution ``v_i E_i``). The
result is a :class:`~xnn_toolkit.report.document.Report` whose figures are written as PNG,
SVG and / or PDF, with an ``index.html`` to look at them and a table of the images shown.
Every argument is checked before any work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError, close_matches
from .document import Figure as ReportFigure
from .document import Paragraph, Report, Table, progress_bar

__all__ = ["figure_report"]

_TARGETS = ("label", "predicted")


def _check(
    methods: Sequence[str], formats: Sequence[str], n: int, n_train: int, n_features: int, dpi: int
) -> list[str]:
    from ..viz.heatmaps import FORMATS
    from .heatmaps import class_method

    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise InputError("give at least one attribution method")
    names = list(dict.fromkeys(class_method(m) for m in methods))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise InputError(f"unknown figure formats {bad or list(formats)}; choose from {FORMATS}")
    for what, v, lo in (
        ("n", n, 1),
        ("n_train", n_train, 2),
        ("n_features", n_features, 1),
        ("dpi", dpi, 10),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise InputError(f"{what} must be an integer >= {lo}, got {v!r}")
    return names


def _per_image(
    report: Report,
    raw: torch.Tensor,
    grid: torch.Tensor,
    names: list[str],
    rows: list[str],
    look: dict[str, Any],
    fmts: tuple[str, ...],
    dpi: int,
) -> None:
    """One overlay figure per image and method, each map scaled by its own maximum."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from ..viz.heatmaps import DisplayFigure, overlay

    s = report.section("Per image")
    for i in range(grid.shape[0]):
        for j, name in enumerate(names):
            fig = DisplayFigure(figsize=(3.2 if look["colorbar"] else 2.6, 2.6))
            ax = fig.add_subplot(1, 1, 1)
            overlay(
                ax,
                raw[i],
                grid[i, j],
                cmap=look["cmap"],
                alpha=look["alpha"],
                title=f"{rows[i]} · {name}",
            )
            if look["colorbar"]:
                fig.colorbar(
                    ScalarMappable(Normalize(0, 1), cmap=look["cmap"]),
                    ax=ax,
                    fraction=0.046,
                    pad=0.04,
                )
            s.add(
                ReportFigure(
                    f"image{i:03d}_{name}", fig, caption=f"image {i}, {name}", formats=fmts, dpi=dpi
                )
            )


def _plain_preprocessing(pre: Any) -> dict[str, Any] | None:
    import dataclasses
    import json

    return None if pre is None else json.loads(json.dumps(dataclasses.asdict(pre)))


def save_figure_maps(report: Report, folder: str | os.PathLike) -> None:
    """Write the heatmaps behind a :func:`figure_report` to ``folder`` (one maps shard).

    Same layout as the scoring runner's ``save_maps`` (read back with
    :func:`xnn_toolkit.load_maps`): float32 maps at the input resolution, one key per method,
    records with image index, label, explained class and name, method and read layer.

    Parameters
    ----------
    report : Report
        A report returned by :func:`figure_report`.
    folder : str or PathLike
        Destination (created; ``maps/`` next to the figures by convention).

    Raises
    ------
    InputError
        ``report`` did not come from :func:`figure_report`.
    """
    from pathlib import Path

    from .. import __version__
    from ..interop.maps import write_manifest, write_shard

    held = getattr(report, "heatmaps", None)
    if not held:
        raise InputError("save_figure_maps needs a report made by figure_report")
    from ..attribution import get_method

    maps, groups, order = {}, {}, []
    for j, name in enumerate(held["methods"]):
        key = f"figures|{name}"
        order.append(key)
        maps[key] = held["maps"][:, j]
        reads_input = bool(getattr(get_method(name), "captum_name", ""))
        groups[key] = [
            {
                **r,
                "method": name,
                "target": "figures",
                "layer": "input" if reads_input else held["layer"],
            }
            for r in held["records"]
        ]
    folder = Path(folder)
    header = {**held["manifest"], "versions": {"xnn_toolkit": __version__}}
    write_manifest(folder, header, 1)
    write_shard(folder, 0, maps, {"order": order, "groups": groups})


def _targets(
    target: int | str, labels: torch.Tensor, pred: torch.Tensor, class_names: list[str]
) -> tuple[torch.Tensor, str]:
    """One class per image from ``label``, ``predicted``, a class index or a class name."""
    if target == "label":
        return labels.clone(), "the true class"
    if target == "predicted":
        return pred.clone(), "the predicted class"
    if isinstance(target, str):
        if target in class_names:
            target = class_names.index(target)
        elif target.lstrip("-").isdigit():
            target = int(target)
        else:
            raise InputError(
                f"unknown target {target!r}: use label, predicted, a class index or a class "
                f"name; {close_matches(target, class_names)}"
            )
    if not 0 <= int(target) < len(class_names):
        raise InputError(f"target class {target} is out of range [0, {len(class_names)})")
    return torch.full_like(labels, int(target)), f"class {class_names[int(target)]}"


def figure_report(
    model: Any,
    dataset: str = "synthetic",
    methods: Sequence[str] = ("cmwp",),
    *,
    target: int | str = "label",
    n: int = 8,
    split: str = "test",
    layer: str | None = None,
    xnn: bool = False,
    fc_layer: str | None = None,
    n_train: int = 1000,
    n_features: int = 5,
    xnn_epochs: int = 30,
    formats: Sequence[str] = ("png", "svg", "pdf"),
    dpi: int = 200,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    per_image: bool = False,
    cmap: str = "jet",
    alpha: float = 0.5,
    colorbar: bool = False,
) -> Report:
    """Heatmap figures of a model on the first ``n`` images of a dataset.

    Parameters
    ----------
    model : str, nn.Module or LoadedModel
        Model spec (``bundled:vgg_synth``, ``timm:resnet18``, a weights file) or a model in
        memory (left unchanged).
    dataset : str
        Dataset spec (:func:`xnn_toolkit.data.load_dataset`).
    methods : sequence of str
        Attribution methods of class logits (:func:`xnn_toolkit.report.heatmaps.class_method`).
    target : {"label", "predicted"}, int or str
        The class explained on each image: its true class, the network's prediction, or one
        class for all (an index or a class name).
    n : int
        Images shown.
    split : {"train", "test"}
    layer : str, optional
        Read layer of c-MWP / MWP / Grad-CAM (default: the model's default read layer).
    xnn : bool
        Also fit an SRAE head and draw the XNN layout (needs a fully connected layer).
    fc_layer : str, optional
        The XNN layer (default ``fc6``, else the last linear below the classifier).
    n_train : int
        Training images of the XNN head.
    n_features : int
        x-features of the XNN head.
    xnn_epochs : int
    formats : sequence of {"png", "svg", "pdf"}
        Formats of every figure (PNG is always written, for ``index.html``).
    dpi : int
        Resolution of the PNG figures.
    device : str
    seed : int
        Seeds the XNN head.
    progress : bool
    per_image : bool
        Also one overlay figure per image and method (``image003_cmwp``), in a section
        "Per image".
    cmap : str
        Matplotlib colour map of the overlays (and of the grid).
    alpha : float
        Opacity of the heatmap in the per-image overlays, in ``[0, 1]``.
    colorbar : bool
        Add a colour bar to each per-image overlay.

    Returns
    -------
    Report
        Sections "Heatmaps" (figure ``heatmaps``, table ``images``), with ``per_image``
        "Per image", and with ``xnn`` "XNN explanations" (figure ``xnn_layout``); write it
        with :meth:`Report.write`.

    Raises
    ------
    SpecError, InputError
        Unknown methods, formats, targets, layers or specs (before any heavy work).
    """
    from .pipeline import user_model

    names = _check(methods, formats, n, n_train, n_features, dpi)
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(target, str) and not target.strip():
        raise InputError(f"target is empty; use one of {_TARGETS}, a class index or a name")
    if not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
        raise InputError(f"alpha must be a number in [0, 1], got {alpha!r}")
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise InputError(
            f"unknown colour map {cmap!r}; " + close_matches(str(cmap), list(matplotlib.colormaps))
        )
    look = {"per_image": per_image, "cmap": cmap, "alpha": float(alpha), "colorbar": colorbar}
    with user_model(model):
        return _figures(
            model,
            dataset,
            names,
            target,
            n,
            split,
            layer,
            xnn,
            fc_layer,
            n_train,
            n_features,
            xnn_epochs,
            tuple(dict.fromkeys(formats)),
            dpi,
            device,
            seed,
            progress,
            look,
        )


def _figures(
    model,
    dataset,
    names,
    target,
    n,
    split,
    layer,
    xnn,
    fc_layer,
    n_train,
    n_features,
    xnn_epochs,
    fmts,
    dpi,
    device,
    seed,
    progress,
    look,
) -> Report:
    """The work of :func:`figure_report`, its arguments checked."""
    from ..data import load_dataset
    from ..layers import default_read_layer, resolve_layer
    from ..viz.heatmaps import heatmap_grid, xnn_figure
    from ._explain_stages import _fit_xnn, _logits
    from .heatmaps import class_heatmaps, xfeature_heatmaps
    from .pipeline import _fc_layer, _images, _load

    torch.manual_seed(seed)
    lm, spec = _load(model, device)
    net = lm.model
    read = resolve_layer(net, layer or default_read_layer(net))[0]
    fc = _fc_layer(net, fc_layer) if xnn else None
    ds = load_dataset(dataset, split=split, n=n, model=lm) if isinstance(dataset, str) else dataset
    raw, labels, _ = _images(ds, n)
    from ..datafit import data_fit

    # the one door of every entry point: channels, classes and class names must fit
    fit = data_fit(lm, ds, arg=f"the dataset {dataset!r}", labels_are_classes=target == "label")
    fit.labels(labels)
    x = fit.images(raw)
    k = int(labels.max()) + 1
    class_names = list(lm.class_names or getattr(ds, "classes", None) or range(k))
    class_names = [str(c) for c in class_names]
    probs = _logits(net, x).softmax(1)
    pred = probs.argmax(1)
    classes, what = _targets(target, labels, pred, class_names)
    top = probs.topk(min(3, probs.shape[1]), dim=1)

    maps = []
    for name in progress_bar(names, desc="heatmaps", disable=not progress):
        maps.append(class_heatmaps(net, x, classes, name, read))
    grid = torch.stack(maps, 1)
    # each row names the explained class and its probability; the image panel lists the
    # model's top predictions
    rows = [f"{class_names[int(c)]} ({float(probs[i, int(c)]):.0%})" for i, c in enumerate(classes)]
    titles = [
        [
            "\n".join(
                f"{class_names[int(k)][:18]} {float(v):.0%}"
                for v, k in zip(top.values[i], top.indices[i])
            ),
            *names,
        ]
        for i in range(len(x))
    ]
    report = Report(f"xnn figures: {spec} on {dataset}")
    s = report.section("Heatmaps")
    s.add(
        Paragraph(
            f"Heatmaps of {what} on the first {len(x)} {split} images of {dataset}, one column "
            f"per method; layer-based methods read at {read}. Each map is scaled by its own "
            "maximum (colour bar)."
        )
    )
    fig = heatmap_grid(raw, grid, titles=titles, row_labels=rows, cmap=look["cmap"])
    s.add(ReportFigure("heatmaps", fig, caption=", ".join(names), formats=fmts, dpi=dpi))
    s.add(
        Table(
            "images",
            [
                {
                    "image": i,
                    "label": class_names[int(labels[i])] if int(labels[i]) >= 0 else "-",
                    "predicted": class_names[int(pred[i])],
                    "probability": round(float(probs[i, int(pred[i])]), 4),
                    "explained class": class_names[int(classes[i])],
                    "its probability": round(float(probs[i, int(classes[i])]), 4),
                }
                for i in range(len(x))
            ],
        )
    )

    if look["per_image"]:
        _per_image(report, raw, grid, names, rows, look, fmts, dpi)
    # the maps themselves, for save_figure_maps (xnn figures --save-maps)
    report.heatmaps = {
        "maps": grid.detach().float().cpu(),
        "methods": list(names),
        "layer": read,
        "records": [
            {
                "index": i,
                "label": int(labels[i]),
                "class": int(classes[i]),
                "class_name": class_names[int(classes[i])],
            }
            for i in range(len(x))
        ],
        "manifest": {
            "model": {"spec": spec},
            "dataset": dataset,
            "split": split,
            "target": what,
            "class_names": class_names,
            "preprocessing": _plain_preprocessing(lm.preprocessing),
        },
    }

    if xnn:
        from torch.utils.data import TensorDataset

        from ..bank import extract
        from ..errors import AssetError

        fit_on = f"{n_train} training images"
        try:
            raw_tr, y_tr, _ = _images(load_dataset(dataset, split="train", n=n_train), n_train)
        except AssetError:  # e.g. the bundled Fashion-MNIST holds the test split only
            other = "test" if split == "train" else split
            more = load_dataset(dataset, split=other, n=len(x) + n_train)
            raw_all, y_all, _ = _images(more, len(x) + n_train)
            start = len(x) if other == split else 0  # never the images shown
            raw_tr, y_tr = raw_all[start : start + n_train], y_all[start : start + n_train]
            if len(y_tr) < 2:
                raise
            fit_on = f"{len(y_tr)} {other} images not shown here (the train split is not available)"
        x_tr = lm.preprocessing.normalize(raw_tr)
        bank_tr = extract(net, TensorDataset(x_tr, y_tr), [fc], progress=progress, device=device)
        bank = extract(net, TensorDataset(x, classes), [fc], progress=False, device=device)
        head, _, _ = _fit_xnn(
            "srae",
            bank_tr,
            fc,
            n_features=n_features,
            hidden=(256, 64),
            epochs=xnn_epochs,
            seed=seed,
            device=device,
        )
        known = {int(c) for c in head.classes_}
        keep = torch.tensor([int(c) in known for c in classes])
        if not bool(keep.any()):
            raise InputError(
                f"no XNN head for the explained classes: the {fit_on} hold classes "
                f"{sorted(known)}; raise n_train"
            )
        idx = keep.nonzero().flatten()
        cls = classes[idx]
        one = (
            grid[idx, names.index("cmwp")]
            if "cmwp" in names
            else class_heatmaps(net, x[idx], cls, "cmwp", read)
        )
        feats = xfeature_heatmaps(net, x[idx], cls, head, fc, read)
        contrib = head.contributions(bank)[idx]
        pos = torch.stack([(head.classes_ == c).nonzero().flatten()[0] for c in cls])
        contrib = contrib[torch.arange(len(idx)), pos]
        fig = xnn_figure(raw[idx], one, feats, contrib, labels=[class_names[int(c)] for c in cls])
        s = report.section("XNN explanations")
        s.add(
            Paragraph(
                f"An SRAE head with n = {n_features} x-features on {fc}, fitted on {fit_on}; "
                f"per image ({what}): the image, the c-MWP 1-heatmap of the "
                "class logit, then the x-features' c-MWP heatmaps sorted by their contribution "
                "v_i E_i, written above them (Khorram 2020, Fig. 3.1 / 3.8)."
            )
        )
        s.add(ReportFigure("xnn_layout", fig, caption="XNN layout", formats=fmts, dpi=dpi))
    report.meta.update(
        command="figures",
        model=spec,
        dataset=dataset,
        methods=names,
        target=str(target),
        layer=read,
        xnn_layer=fc,
        n=len(x),
        formats=list(fmts),
    )
    return report
