"""Figures: heatmap overlays and grids, the XNN layout, concept galleries, class paths, gates.

Every function returns a matplotlib ``Figure`` built without pyplot (nothing to close, the
caller's backend untouched) that a notebook shows as a cell's value; :func:`save_figure` is the
one way to write it (PNG / SVG / PDF, each file atomically).

- :mod:`~xnn_toolkit.viz.heatmaps`: overlays, heatmap grids, the XNN layout, annotated samples,
  :func:`save_figure`.
- :mod:`~xnn_toolkit.viz.concepts`: NMF concept overlays and galleries.
- :mod:`~xnn_toolkit.viz.paths`: class-path masks, path similarity, hit rates, information maps.
- :mod:`~xnn_toolkit.viz.gates`: class-specific gate matrices and class filter galleries.
"""

from .concepts import concept_gallery, concept_overlay
from .gates import class_filter_gallery, gate_matrix_figure, top_class_filters
from .heatmaps import (
    DisplayFigure,
    annotated_samples,
    heatmap_grid,
    overlay,
    overlay_grid,
    save_figure,
    to_image,
    xnn_figure,
)
from .paths import (
    hit_rate_figure,
    information_heatmap_figure,
    path_mask_figure,
    path_similarity_figure,
)

__all__ = [
    "DisplayFigure",
    "annotated_samples",
    "class_filter_gallery",
    "concept_gallery",
    "concept_overlay",
    "gate_matrix_figure",
    "heatmap_grid",
    "hit_rate_figure",
    "information_heatmap_figure",
    "overlay",
    "overlay_grid",
    "path_mask_figure",
    "path_similarity_figure",
    "save_figure",
    "to_image",
    "top_class_filters",
    "xnn_figure",
]
