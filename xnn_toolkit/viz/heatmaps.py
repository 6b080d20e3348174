"""Figures for notebooks, reports and papers: overlays, grids and the XNN layout.

Every function returns a matplotlib ``Figure`` built without pyplot (no global figure
registry: nothing to close, the caller's backend left as it is) that a notebook shows once, as
a cell's value (:class:`DisplayFigure`); use :func:`save_figure` to write PNG / SVG / PDF
atomically. Heatmaps use one colour map (``"jet"`` over the image by default, as in the source
papers), each map scaled to ``[0, 1]`` by its own maximum unless ``shared_scale=True``, and one
colour bar per figure.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .._io import atomic_write
from ..errors import InputError

__all__ = [
    "DisplayFigure",
    "to_image",
    "overlay",
    "heatmap_grid",
    "overlay_grid",
    "xnn_figure",
    "annotated_samples",
    "save_figure",
]

FORMATS = ("png", "svg", "pdf")


class DisplayFigure(Figure):
    """A matplotlib ``Figure`` that shows itself as PNG in Jupyter and IPython.

    Figures built without pyplot have no display hook; this one needs no ``%matplotlib``
    magic and is shown once, as the value of a cell.
    """

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        return buf.getvalue()


def to_image(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """``C x H x W`` (or ``H x W``) tensor in [0, 1] → ``H x W x 3`` float array for imshow."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, float)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, -1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InputError(f"expected an image C x H x W with C in (1, 3), got shape {a.shape}")
    return np.clip(a, 0.0, 1.0)


def _norm(h: np.ndarray, vmax: float | None = None) -> np.ndarray:
    h = np.nan_to_num(np.asarray(h, float))
    top = vmax if vmax is not None else float(h.max())
    return h / top if top > 0 else np.zeros_like(h)


def overlay(
    ax: Axes,
    image: torch.Tensor | np.ndarray,
    heatmap: torch.Tensor | np.ndarray | None,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmax: float | None = None,
    title: str | None = None,
) -> None:
    """Draw an image with a heatmap (``H x W``, normalised to [0, 1]) over it on ``ax``."""
    img = to_image(image)
    ax.imshow(img)
    if heatmap is not None:
        h = heatmap.detach().cpu().numpy() if isinstance(heatmap, torch.Tensor) else heatmap
        if h.shape != img.shape[:2]:
            raise InputError(f"heatmap shape {h.shape} differs from the image's {img.shape[:2]}")
        ax.imshow(_norm(h, vmax), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def heatmap_grid(
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    titles: Sequence[Sequence[str]] | None = None,
    cmap: str = "jet",
    size: float = 1.6,
    shared_scale: bool = False,
    colorbar: bool = True,
) -> Figure:
    """Rows of images, each followed by its heatmaps.

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W`` in [0, 1].
    heatmaps : Tensor
        ``N x M x H x W``: ``M`` heatmaps per image.
    row_labels, col_labels : sequence of str, optional
        ``N`` and ``M + 1`` labels (the first column is the image).
    titles : N x (M + 1) strings, optional
        A title per panel (overrides ``col_labels``).
    shared_scale : bool
        Normalise all heatmaps of a row by the row's maximum instead of each by its own.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if images.dim() != 4 or heatmaps.dim() != 4 or len(images) != len(heatmaps):
        raise InputError(
            f"expected images N x C x H x W and heatmaps N x M x H x W with the same N, got "
            f"{tuple(images.shape)} and {tuple(heatmaps.shape)}"
        )
    n, m = heatmaps.shape[:2]
    for what, given, want in (("row_labels", row_labels, n), ("col_labels", col_labels, m + 1)):
        if given is not None and len(given) != want:
            raise InputError(f"{what} must have {want} entries, got {len(given)}")
    panels = [
        [(images[i], None)] + [(images[i], heatmaps[i, j]) for j in range(m)] for i in range(n)
    ]
    if titles is None and col_labels is not None:
        titles = [list(col_labels)] + [[""] * (m + 1) for _ in range(n - 1)]
    return _draw_grid(panels, row_labels, titles, cmap, size, shared_scale, colorbar)


def overlay_grid(
    images: torch.Tensor,
    heatmaps: torch.Tensor,
    *,
    row_labels: Sequence[str] | None = None,
    titles: Sequence[Sequence[str]] | None = None,
    cmap: str = "jet",
    size: float = 1.6,
    shared_scale: bool = False,
    colorbar: bool = True,
) -> Figure:
    """A grid of overlays where every panel has its own image (e.g. a concept's top images).

    Parameters
    ----------
    images : Tensor
        ``R x K x C x H x W`` in [0, 1]: ``R`` rows of ``K`` panels.
    heatmaps : Tensor
        ``R x K x H x W``, one per panel.
    row_labels : sequence of str, optional
        ``R`` labels.
    titles : R x K strings, optional
    shared_scale : bool
        Normalise the heatmaps of a row by the row's maximum instead of each by its own.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if images.dim() != 5 or heatmaps.dim() != 4 or images.shape[:2] != heatmaps.shape[:2]:
        raise InputError(
            f"expected images R x K x C x H x W and heatmaps R x K x H x W, got "
            f"{tuple(images.shape)} and {tuple(heatmaps.shape)}"
        )
    r, k = heatmaps.shape[:2]
    if row_labels is not None and len(row_labels) != r:
        raise InputError(f"row_labels must have {r} entries, got {len(row_labels)}")
    panels = [[(images[i, j], heatmaps[i, j]) for j in range(k)] for i in range(r)]
    return _draw_grid(panels, row_labels, titles, cmap, size, shared_scale, colorbar)


def _draw_grid(
    panels: list[list[tuple[torch.Tensor, torch.Tensor | None]]],
    row_labels: Sequence[str] | None,
    titles: Sequence[Sequence[str]] | None,
    cmap: str,
    size: float,
    shared_scale: bool,
    colorbar: bool,
) -> Figure:
    """Rows of (image, heatmap or None) panels with one colour bar for the whole figure."""
    n, m = len(panels), len(panels[0])
    if titles is not None and (len(titles) != n or any(len(t) != m for t in titles)):
        raise InputError(f"titles must be {n} rows of {m} strings")
    # room above each row for its longest title (several lines: top-k predictions)
    lines = max((t.count("\n") + 1 for row in titles or [] for t in row if t), default=1)
    fig = DisplayFigure(figsize=(size * m, n * (size + 0.14 * max(0, lines - 1))))
    axes = fig.subplots(n, m, squeeze=False)
    for i, row in enumerate(panels):
        maps = [h for _, h in row if h is not None]
        vmax = (
            float(torch.stack([torch.as_tensor(h) for h in maps]).max())
            if (shared_scale and maps)
            else None
        )
        for j, (image, heat) in enumerate(row):
            overlay(axes[i, j], image, heat, cmap=cmap, vmax=vmax)
            if titles is not None and titles[i][j]:
                axes[i, j].set_title(titles[i][j], fontsize=8)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    if colorbar:
        sm = ScalarMappable(cmap=cmap, norm=Normalize(0, 1))
        label = "heatmap / row maximum" if shared_scale else "heatmap / its maximum"
        fig.colorbar(sm, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label=label)
    return fig


def xnn_figure(
    images: torch.Tensor,
    one_heatmaps: torch.Tensor,
    feature_heatmaps: torch.Tensor,
    contributions: torch.Tensor,
    *,
    labels: Sequence[str] | None = None,
    cmap: str = "jet",
    size: float = 1.6,
) -> Figure:
    """The thesis's layout (Khorram 2020, Fig. 3.1 / 3.8): image, 1-heatmap, sorted x-features.

    Each row shows the image, the heatmap of the explained logit ``ŷ`` ("1-heatmap"), then
    one heatmap per x-feature, sorted by contribution ``v_i E_i`` (largest first), with the
    contribution written above it.

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W`` in [0, 1].
    one_heatmaps : Tensor
        ``N x H x W``.
    feature_heatmaps : Tensor
        ``N x n x H x W``.
    contributions : Tensor
        ``N x n``, ``v_i E_i`` of each x-feature on each image.
    labels : sequence of str, optional
        Row labels (e.g. class names).

    Returns
    -------
    matplotlib.figure.Figure
    """
    n_img, n = feature_heatmaps.shape[:2]
    if contributions.shape != (n_img, n) or one_heatmaps.shape[0] != n_img:
        raise InputError(
            f"contributions must be N x n = {(n_img, n)} and one_heatmaps N x H x W; got "
            f"{tuple(contributions.shape)} and {tuple(one_heatmaps.shape)}"
        )
    order = torch.argsort(contributions, dim=1, descending=True)
    maps = torch.cat(
        [
            one_heatmaps.unsqueeze(1),
            feature_heatmaps.gather(1, order[:, :, None, None].expand_as(feature_heatmaps)),
        ],
        1,
    )
    titles = []
    for i in range(n_img):
        row = ["image", "1-heatmap"]
        row += [f"#{int(k) + 1}: {float(contributions[i, k]) + 0.0:.3g}" for k in order[i]]
        titles.append(row)
    return heatmap_grid(images, maps, titles=titles, row_labels=labels, cmap=cmap, size=size)


def annotated_samples(
    images: torch.Tensor,
    keypoints: torch.Tensor | None = None,
    visible: torch.Tensor | None = None,
    bbox: torch.Tensor | None = None,
    *,
    titles: Sequence[str] | None = None,
    part_names: Sequence[str] | None = None,
    cols: int = 8,
    size: float = 1.5,
) -> Figure:
    """A grid of images with their keypoints (visible ones) and boxes drawn.

    Parameters
    ----------
    images : Tensor
        ``N x C x H x W`` in [0, 1].
    keypoints, visible : Tensor, optional
        ``N x P x 2`` ``(x, y)`` and ``N x P`` bool.
    bbox : Tensor, optional
        ``N x 4`` ``(x0, y0, x1, y1)``.
    titles : sequence of str, optional
    part_names : sequence of str, optional
        Adds a legend of part colours.
    """
    n = len(images)
    rows = max(1, -(-n // cols))
    cols = min(cols, n)
    fig = DisplayFigure(figsize=(size * cols, size * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = matplotlib.colormaps["tab20"](np.linspace(0, 1, 20))
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(to_image(images[i]))
        if bbox is not None:
            x0, y0, x1, y1 = (float(v) for v in bbox[i])
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec="white", lw=0.8
                )
            )
        if keypoints is not None:
            for p in range(keypoints.shape[1]):
                if visible is None or bool(visible[i, p]):
                    x, y = (float(v) for v in keypoints[i, p])
                    ax.plot(x, y, "o", ms=2.5, color=colours[p % 20], mec="black", mew=0.3)
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if part_names is not None and keypoints is not None:
        handles = [
            Line2D([], [], marker="o", ls="", color=colours[p % 20], label=name)
            for p, name in enumerate(part_names)
        ]
        fig.legend(handles=handles, loc="lower center", ncol=min(8, len(handles)), fontsize=6)
    return fig


def save_figure(
    fig: Figure, stem: str | os.PathLike, formats: Sequence[str] = ("png",), dpi: int = 150
) -> list[str]:
    """Save a figure as ``<stem>.<fmt>`` for each format, each file written atomically.

    Parameters
    ----------
    fig : Figure
    stem : path without extension
    formats : str or sequence of {"png", "svg", "pdf"}
    dpi : int
        Resolution of the raster format.

    Returns
    -------
    list of str
        The written paths.
    """
    if isinstance(formats, str):
        formats = (formats,)
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise InputError(f"unknown figure formats {bad}; use some of {FORMATS}")
    paths = []
    for fmt in formats:
        path = f"{os.fspath(stem)}.{fmt}"
        atomic_write(
            path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        )
        paths.append(path)
    return paths
