"""Figures: the XNN layout's ordering and labels, file formats."""

from __future__ import annotations

import pytest
import torch

from xnn_toolkit.errors import InputError
from xnn_toolkit.viz import annotated_samples, heatmap_grid, save_figure, xnn_figure


def test_xnn_figure_sorts_by_contribution():
    imgs = torch.rand(2, 3, 16, 16)
    feats = torch.rand(2, 3, 16, 16)
    contrib = torch.tensor([[0.5, 2.0, -1.0], [3.0, 1.0, 2.0]])
    fig = xnn_figure(imgs, torch.rand(2, 16, 16), feats, contrib, labels=["a", "b"])
    titles = [[ax.get_title() for ax in row] for row in (fig.axes[:5], fig.axes[5:10])]
    assert titles[0] == ["image", "1-heatmap", "#2: 2", "#1: 0.5", "#3: -1"]
    assert titles[1] == ["image", "1-heatmap", "#1: 3", "#3: 2", "#2: 1"]
    # the panel of x-feature #3 on row 2 shows that x-feature's map
    shown = fig.axes[5 + 3].get_images()[1].get_array()
    ref = feats[1, 2] / feats[1, 2].max()
    torch.testing.assert_close(torch.as_tensor(shown.data, dtype=torch.float32), ref)


def test_save_all_formats(tmp_path):
    fig = heatmap_grid(torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8), col_labels=["x", "a", "b"])
    paths = save_figure(fig, tmp_path / "grid", formats=("png", "svg", "pdf"))
    assert open(paths[0], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in open(paths[1], "rb").read(2000)
    assert open(paths[2], "rb").read(5) == b"%PDF-"
    with pytest.raises(InputError, match="formats"):
        save_figure(fig, tmp_path / "g", formats=("gif",))


def test_annotated_samples_and_errors():
    kp = torch.tensor([[[2.0, 3.0], [5.0, 5.0]]])
    fig = annotated_samples(
        torch.rand(1, 3, 8, 8),
        kp,
        torch.tensor([[True, False]]),
        torch.tensor([[1.0, 1.0, 6.0, 6.0]]),
        part_names=["beak", "tail"],
    )
    lines = fig.axes[0].get_lines()
    assert len(lines) == 1  # only the visible keypoint is drawn
    assert tuple(lines[0].get_xydata()[0]) == (2.0, 3.0)
    with pytest.raises(InputError):
        heatmap_grid(torch.rand(2, 3, 8, 8), torch.rand(1, 2, 8, 8))


def test_figures_leave_pyplot_alone_and_show_in_notebooks():
    import matplotlib.pyplot as plt

    from xnn_toolkit.viz import gate_matrix_figure, overlay_grid, path_similarity_figure

    before = plt.get_fignums()
    figs = [
        heatmap_grid(torch.rand(2, 3, 8, 8), torch.rand(2, 2, 8, 8), col_labels=["i", "a", "b"]),
        overlay_grid(torch.rand(2, 3, 3, 8, 8), torch.rand(2, 3, 8, 8), shared_scale=True),
        gate_matrix_figure(torch.rand(3, 5)),
        path_similarity_figure(torch.rand(3, 3)),
    ]
    assert plt.get_fignums() == before  # nothing registered with pyplot, nothing to close
    for fig in figs:
        assert fig._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"
    # one colour bar for the whole grid, on the shared [0, 1] scale
    bars = [ax for ax in figs[1].axes if ax.get_ylabel() == "heatmap / row maximum"]
    assert len(bars) == 1
    with pytest.raises(InputError, match="row_labels"):
        overlay_grid(torch.rand(2, 3, 3, 8, 8), torch.rand(2, 3, 8, 8), row_labels=["a"])
    with pytest.raises(InputError, match="col_labels"):
        heatmap_grid(torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8), col_labels=["a"])


def test_overlay_grid_shares_a_row_scale():
    from xnn_toolkit.viz import overlay_grid

    maps = torch.zeros(1, 2, 4, 4)
    maps[0, 0, 0, 0] = 1.0
    maps[0, 1, 0, 0] = 4.0
    fig = overlay_grid(torch.rand(1, 2, 3, 4, 4), maps, shared_scale=True, colorbar=False)
    shown = [ax.get_images()[1].get_array().max() for ax in fig.axes]
    assert shown == pytest.approx([0.25, 1.0])
