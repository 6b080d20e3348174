"""Concept galleries in the manner of Deep Feature Factorization (Collins et al. 2018).

Each concept gets a colour; at every pixel the concept with the largest normalised score
wins, and its colour is blended over the image with an opacity proportional to that score
(Collins et al. 2018, Fig. 1 style). Scores come from
:meth:`xnn_toolkit.heads.NMFConcepts.transform` (``N x r x h x w``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..errors import InputError
from ..heads.nmf_tools import concept_maps
from .heatmaps import FORMATS, save_figure

__all__ = ["concept_overlay", "concept_gallery"]


def _palette(r: int, colors: Sequence[Sequence[float]] | None) -> torch.Tensor:
    if colors is not None:
        pal = torch.as_tensor(colors, dtype=torch.float32)
        if pal.ndim != 2 or pal.shape[1] < 3 or pal.shape[0] < r:
            raise InputError(f"colors must give at least {r} RGB triples in [0, 1]")
        return pal[:r, :3]
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if r <= 10 else "tab20"]
    return torch.tensor([cmap(i % cmap.N)[:3] for i in range(r)], dtype=torch.float32)


def _images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InputError(
            "images must be N x 3 x H x W (or N x 1 x H x W) in [0, 1], got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    img = images.detach().float().cpu()
    if img.shape[1] == 1:
        img = img.expand(-1, 3, -1, -1)
    return img.clamp(0, 1)


def concept_overlay(
    images: torch.Tensor,
    scores: torch.Tensor,
    *,
    colors: Sequence[Sequence[float]] | None = None,
    alpha: float = 0.7,
) -> torch.Tensor:
    """Blend each pixel's winning concept colour over the images.

    With ``s̃_k`` the concept maps upsampled to image size (bilinear) and divided by each
    concept's maximum over the batch, the winner is ``k* = argmax_k s̃_k`` and the output is
    ``(1 − α s̃_{k*}) · image + α s̃_{k*} · colour_{k*}``.

    Parameters
    ----------
    images : Tensor, ``N x 3 x H x W`` (or ``N x 1 x H x W``), values in ``[0, 1]``
    scores : Tensor, ``N x r x h x w``
    colors : sequence of RGB triples, optional
        One per concept; default: matplotlib's ``tab10`` / ``tab20``.
    alpha : float
        Opacity of a concept at its maximum strength.

    Returns
    -------
    Tensor, ``N x 3 x H x W`` in ``[0, 1]`` (CPU)
    """
    img = _images(images)
    if not isinstance(scores, torch.Tensor) or scores.ndim != 4 or scores.shape[0] != img.shape[0]:
        raise InputError(
            f"scores must be N x r x h x w with N = {img.shape[0]} images, got "
            f"{getattr(scores, 'shape', type(scores).__name__)}"
        )
    maps = concept_maps(scores.detach().cpu(), img.shape[-2:], normalize=True)
    strength, winner = maps.max(dim=1)  # N x H x W
    colour = _palette(maps.shape[1], colors)[winner].permute(0, 3, 1, 2)  # N x 3 x H x W
    a = (alpha * strength).unsqueeze(1)
    return ((1 - a) * img + a * colour).clamp(0, 1)


def concept_gallery(
    images: torch.Tensor,
    scores: torch.Tensor,
    path: str | os.PathLike | None = None,
    *,
    concepts: Sequence[str] | None = None,
    colors: Sequence[Sequence[float]] | None = None,
    alpha: float = 0.7,
    ncols: int = 4,
    title: str | None = None,
    dpi: int = 100,
):
    """A grid of images with their concepts coloured over them, and a legend.

    Parameters
    ----------
    images : Tensor, ``N x 3 x H x W`` in ``[0, 1]``
    scores : Tensor, ``N x r x h x w``
        Concept maps of the same images.
    path : str or PathLike, optional
        Save to this ``.png``, ``.svg`` or ``.pdf`` (atomically: temp file + rename).
    concepts : sequence of str, optional
        Legend names (default ``"concept k"``).
    colors, alpha
        As :func:`concept_overlay`.
    ncols : int
        Images per row.
    title : str, optional
    dpi : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    over = concept_overlay(images, scores, colors=colors, alpha=alpha)
    n, r = over.shape[0], scores.shape[1]
    names = list(concepts) if concepts is not None else [f"concept {k}" for k in range(r)]
    if len(names) != r:
        raise InputError(f"concepts gives {len(names)} names for {r} concepts")
    ncols = max(1, min(int(ncols), n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(2.0 * ncols, 2.0 * nrows + 0.6))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(over[i].permute(1, 2, 0).numpy())
    pal = _palette(r, colors)
    handles = [Patch(color=tuple(pal[k].tolist()), label=names[k]) for k in range(r)]
    fig.legend(handles=handles, loc="lower center", ncol=min(r, 6), fontsize="small", frameon=False)
    if title:
        fig.suptitle(title)
    fig.subplots_adjust(bottom=0.6 / (2.0 * nrows + 0.6) + 0.05)
    if path is not None:
        _save_one(fig, path, dpi)
    return fig


def _save_one(fig: object, path: str | os.PathLike, dpi: int) -> None:
    """Save to one path whose extension names the format, through :func:`save_figure`."""
    stem, ext = os.path.splitext(os.fspath(path))
    fmt = ext.lower().lstrip(".")
    if fmt not in FORMATS:
        raise InputError(f"figure path must end in .png, .svg or .pdf, got {os.fspath(path)!r}")
    save_figure(fig, stem, (fmt,), dpi=dpi)  # type: ignore[arg-type]
