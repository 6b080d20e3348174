"""Figures of class paths and information-dropout masks (:doc:`/methods/paths`).

- :func:`path_mask_figure`: the masks of every layer as class x channel images;
- :func:`path_similarity_figure`: the class x class path-similarity matrix;
- :func:`hit_rate_figure`: hit rate over layers (mean ± std) with the 25 % chance line;
- :func:`information_heatmap_figure`: images with their information heatmaps per layer.

Every function returns a matplotlib ``Figure`` (shown as PNG in notebooks); save it with
:func:`xnn_toolkit.viz.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..errors import InputError
from .heatmaps import DisplayFigure, heatmap_grid

__all__ = [
    "hit_rate_figure",
    "information_heatmap_figure",
    "path_mask_figure",
    "path_similarity_figure",
]


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _ticks(ax: Axes, names: Sequence[str] | None, n: int, axis: str) -> None:
    if names is None or n > 40:
        return
    if len(names) != n:
        raise InputError(f"got {len(names)} class names for {n} classes")
    if axis == "y":
        ax.set_yticks(range(n))
        ax.set_yticklabels(names, fontsize=6)
    else:
        ax.set_xticks(range(n))
        ax.set_xticklabels(names, fontsize=6, rotation=90)


def path_mask_figure(
    masks: dict[str, torch.Tensor],
    class_names: Sequence[str] | None = None,
    *,
    binary: bool = False,
    threshold: float = 0.5,
    cmap: str = "viridis",
    width: float = 7.0,
) -> Figure:
    """Masks of every layer, one panel per layer: classes down, channels across.

    Parameters
    ----------
    masks : dict of str to Tensor
        ``K x C_i`` mask values in [0, 1] per layer (``ClassPaths.masks_``, or ``alphas_``
        of information dropout rescaled to [0, 1]).
    class_names : sequence of str, optional
        ``K`` row labels (shown for up to 40 classes).
    binary : bool
        Show the paths ``μ > threshold`` instead of the values.
    threshold : float
    cmap : str
    width : float
        Figure width in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not masks:
        raise InputError("masks is empty; pass {layer: K x C masks}")
    mats = {n: torch.as_tensor(m).detach().float().cpu() for n, m in masks.items()}
    for n, m in mats.items():
        if m.dim() != 2:
            raise InputError(f"masks of layer {n!r} must be K x C, got shape {tuple(m.shape)}")
    k = next(iter(mats.values())).shape[0]
    rows = len(mats)
    fig = DisplayFigure(figsize=(width, max(1.2, 0.25 * k + 0.6) * rows))
    axes = fig.subplots(rows, 1, squeeze=False)
    im = None
    for ax, (name, m) in zip(axes[:, 0], mats.items()):
        shown = (m > threshold).float() if binary else m
        im = ax.imshow(
            shown.numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest"
        )
        on = (m > threshold).float().sum(1).mean()
        ax.set_title(
            f"{name}: {m.shape[1]} channels, {float(on):.1f} on the path per class", fontsize=8
        )
        ax.set_ylabel("class", fontsize=7)
        _ticks(ax, class_names, m.shape[0], "y")
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("channel", fontsize=7)
    fig.colorbar(
        im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="path" if binary else "mask μ"
    )
    return fig


def path_similarity_figure(
    similarity: torch.Tensor,
    class_names: Sequence[str] | None = None,
    *,
    annotate: bool | None = None,
    cmap: str = "magma",
    size: float = 4.5,
) -> Figure:
    """The ``K x K`` path-similarity matrix (mean Jaccard index over layers).

    Parameters
    ----------
    similarity : Tensor
        ``K x K`` in [0, 1].
    class_names : sequence of str, optional
    annotate : bool, optional
        Write the values in the cells (default: when ``K <= 12``).
    cmap : str
    size : float
        Figure side in inches.

    Returns
    -------
    matplotlib.figure.Figure
    """
    s = torch.as_tensor(similarity).detach().float().cpu()
    if s.dim() != 2 or s.shape[0] != s.shape[1]:
        raise InputError(f"similarity must be K x K, got shape {tuple(s.shape)}")
    k = s.shape[0]
    fig = DisplayFigure(figsize=(size, size))
    ax = fig.subplots()
    im = ax.imshow(s.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    _ticks(ax, class_names, k, "y")
    _ticks(ax, class_names, k, "x")
    if annotate if annotate is not None else k <= 12:
        for i in range(k):
            for j in range(k):
                v = float(s[i, j])
                ax.text(
                    j,
                    i,
                    f"{v:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="black" if v > 0.6 else "white",
                )
    ax.set_title("path similarity (mean Jaccard over layers)", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def hit_rate_figure(
    hit_rates: object,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    size: tuple[float, float] = (5.0, 3.0),
) -> Figure:
    """Hit rate over layers, mean ± std, with the chance line (:doc:`/methods/paths`).

    Parameters
    ----------
    hit_rates : HitRates or sequence of HitRates
        From :meth:`ClassPaths.hit_rates`; several are drawn as several lines (e.g.
        networks or objectives), each over its own layers' positions.
    labels : sequence of str, optional
        Legend entry per series.
    title : str, optional
    size : (float, float)

    Returns
    -------
    matplotlib.figure.Figure
    """
    series = list(hit_rates) if isinstance(hit_rates, list | tuple) else [hit_rates]
    if labels is not None and len(labels) != len(series):
        raise InputError(f"got {len(labels)} labels for {len(series)} series")
    fig = DisplayFigure(figsize=size)
    ax = fig.subplots()
    chance = 0.25
    for i, hr in enumerate(series):
        mean = torch.as_tensor(hr.mean).float().cpu().numpy()
        std = torch.as_tensor(hr.std).float().cpu().numpy()
        x = np.arange(len(mean))
        ax.errorbar(
            x, mean, yerr=std, marker="o", ms=3, capsize=2, label=labels[i] if labels else None
        )
        chance = hr.chance
        if i == 0:
            ax.set_xticks(x)
            ax.set_xticklabels([_short(n) for n in hr.layers], rotation=45, ha="right", fontsize=6)
    ax.axhline(chance, ls="--", color="gray", lw=1, label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("hit rate", fontsize=8)
    ax.set_xlabel("layer", fontsize=8)
    ax.legend(fontsize=6)
    if title:
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def information_heatmap_figure(
    images: torch.Tensor,
    heatmaps: dict[str, torch.Tensor],
    *,
    row_labels: Sequence[str] | None = None,
    shared_scale: bool = False,
    size: float = 1.6,
) -> Figure:
    """Images followed by their information heatmaps, one column per layer.

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W`` in [0, 1].
    heatmaps : dict of str to Tensor
        ``N x h x w`` per layer (``InformationDropout.information_heatmaps``); upsampled to
        the image size bilinearly.
    row_labels : sequence of str, optional
    shared_scale : bool
        One colour scale per row instead of one per map.
    size : float

    Returns
    -------
    matplotlib.figure.Figure
    """
    if images.dim() != 4 or not heatmaps:
        raise InputError("expected images N x C x H x W and a non-empty dict of N x h x w maps")
    h, w = images.shape[-2:]
    maps = []
    for name, m in heatmaps.items():
        m = torch.as_tensor(m).detach().float().cpu()
        if m.dim() != 3 or len(m) != len(images):
            raise InputError(
                f"heatmaps of {name!r} must be N x h x w with N = {len(images)}, got "
                f"{tuple(m.shape)}"
            )
        if tuple(m.shape[-2:]) != (h, w):
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        maps.append(m)
    stacked = torch.stack(maps, 1)
    cols = ["image", *[_short(n, 14) for n in heatmaps]]
    return heatmap_grid(
        images.detach().float().cpu(),
        stacked,
        col_labels=cols,
        row_labels=row_labels,
        shared_scale=shared_scale,
        size=size,
    )
