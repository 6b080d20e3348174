"""Figures of class-specific gates (:doc:`/methods/gates`, Liang et al. 2020 Fig. 4 / App. E).

- :func:`gate_matrix_figure`: the gate matrix, classes x filters, with the filters ordered by
  :func:`xnn_toolkit.heads.gate_objective.block_order` (by the class of their largest gate, then the
  most exclusive first) so that its class blocks show;
- :func:`class_filter_gallery`: for one class, a few of its images and the ActivMaps of its
  top filters (class-specific ones first), drawn with
  :func:`xnn_toolkit.viz.heatmap_grid`.

Every function returns a matplotlib ``Figure``; save it with
:func:`xnn_toolkit.viz.save_figure`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import InputError
from ..heads.gate_objective import block_order
from .heatmaps import DisplayFigure, heatmap_grid

__all__ = ["gate_matrix_figure", "class_filter_gallery", "top_class_filters"]


def gate_matrix_figure(
    gates: torch.Tensor | np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
    ordered: bool = True,
    cmap: str = "viridis",
    width: float = 8.0,
    title: str | None = None,
) -> Figure:
    """Draw the gate matrix ``G`` (rows: classes, columns: filters).

    Parameters
    ----------
    gates : Tensor or ndarray
        ``C x K`` in [0, 1] (e.g. ``ClassSpecificGates.gates_``).
    class_names : sequence of str, optional
        ``C`` row labels.
    ordered : bool
        Reorder the columns by :func:`~xnn_toolkit.heads.gate_objective.block_order`; the x tick
        labels then give the original filter indices (when ``K <= 64``).
    cmap : str
    width : float
        Figure width in inches (the height follows the number of classes).
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure
        One image axis (its ``AxesImage`` holds the drawn ``C x K`` array) and a colour bar.
    """
    g = torch.as_tensor(np.asarray(gates) if not isinstance(gates, torch.Tensor) else gates)
    if g.dim() != 2 or g.numel() == 0:
        raise InputError(f"gates must be a non-empty C x K matrix, got shape {tuple(g.shape)}")
    c, k = g.shape
    if class_names is not None and len(class_names) != c:
        raise InputError(f"class_names must have C = {c} entries, got {len(class_names)}")
    order = block_order(g) if ordered else torch.arange(k)
    shown = g.detach().double().cpu()[:, order].numpy()
    height = max(1.5, 0.3 * c + 1.0)
    fig = DisplayFigure(figsize=(width, height))
    ax = fig.subplots()
    im = ax.imshow(shown, aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_ylabel("class")
    ax.set_xlabel("filter" + (" (block order)" if ordered else ""))
    ax.set_yticks(range(c))
    ax.set_yticklabels(
        class_names if class_names is not None else [str(i) for i in range(c)], fontsize=7
    )
    if k <= 64:
        ax.set_xticks(range(k))
        ax.set_xticklabels([str(int(i)) for i in order], fontsize=6, rotation=90)
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="gate")
    return fig


def top_class_filters(gates: Any, c: int, top: int) -> list[int]:
    """The ``top`` filters shown for class ``c``: its class-specific filters first.

    Class-specific filters (``gates.class_filters(c)``, by decreasing gate) come first; the
    rest are filled with the other filters by decreasing ``G[c, k]``, then increasing column
    sum (most exclusive first).

    Parameters
    ----------
    gates : ClassSpecificGates
        A fitted estimator.
    c : int
    top : int

    Returns
    -------
    list of int
    """
    specific = [int(i) for i in gates.class_filters(c)]
    g = gates.gates_.detach().double().cpu()
    rest = [i for i in range(g.shape[1]) if i not in set(specific)]
    rest.sort(key=lambda i: (-float(g[c, i]), float(g[:, i].sum()), i))
    return (specific + rest)[:top]


def _display(images: torch.Tensor) -> torch.Tensor:
    """Min-max scale each image to [0, 1] for drawing (model inputs are normalised)."""
    x = images.detach().float().cpu()
    lo = x.flatten(1).amin(1)[:, None, None, None]
    hi = x.flatten(1).amax(1)[:, None, None, None]
    return (x - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))


def class_filter_gallery(
    gates: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    c: int,
    *,
    top: int = 4,
    n_images: int = 4,
    display: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    size: float = 1.6,
) -> Figure:
    """ActivMaps of a class's top filters over a few of its images (Liang et al. 2020 App. G).

    Parameters
    ----------
    gates : ClassSpecificGates
        A fitted estimator with its network (see ``ClassSpecificGates.filter_maps``).
    images : Tensor
        ``N x C x H x W`` model inputs.
    labels : Tensor
        ``N`` classes; the first ``n_images`` images of class ``c`` are drawn.
    c : int
        The class.
    top : int
        Number of filters (:func:`top_class_filters`); class-specific ones are starred.
        Panel titles give the filter, its gate ``g`` for the class and the mean gate ``o``
        of the other classes.
    n_images : int
    display : Tensor, optional
        ``N x 3 x H x W`` (or 1 channel) images in [0, 1] to draw instead of the min-max
        scaled inputs.
    class_names : sequence of str, optional
    size : float
        Panel size in inches.

    Returns
    -------
    matplotlib.figure.Figure
        ``n_images`` rows of ``1 + top`` panels.
    """
    gates._check_fitted(need_network=True)
    c = gates._check_class(c)
    y = torch.as_tensor(labels).reshape(-1)
    if images.dim() != 4 or y.shape[0] != images.shape[0]:
        raise InputError(
            f"expected N x C x H x W images and N labels, got {tuple(images.shape)} and "
            f"{tuple(y.shape)}"
        )
    if top < 1 or n_images < 1:
        raise InputError(f"top and n_images must be >= 1, got {top} and {n_images}")
    idx = torch.nonzero(y == c).reshape(-1)[:n_images]
    if idx.numel() == 0:
        raise InputError(f"no image of class {c} among the {len(y)} given")
    filters = top_class_filters(gates, c, top)
    maps = gates.filter_maps(images[idx], filters)
    shown = _display(images[idx]) if display is None else display[idx].detach().float().cpu()
    specific = {int(i) for i in gates.class_filters(c)}
    g = gates.gates_
    name = class_names[c] if class_names is not None else f"class {c}"
    titles = []
    for j in range(len(idx)):
        row = [f"{name} #{int(idx[j])}"]
        for k in filters:
            star = "*" if k in specific else ""
            rest = (float(g[:, k].sum()) - float(g[c, k])) / max(1, g.shape[0] - 1)
            row.append(f"f{k}{star} g={float(g[c, k]):.2f} o={rest:.2f}")
        titles.append(row)
    return heatmap_grid(shown, maps, titles=titles, size=size)
