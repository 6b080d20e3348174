"""Concept gallery figures (xnn_toolkit.viz.concepts): a hand-computed overlay and files."""

from __future__ import annotations

import pytest
import torch

from xnn_toolkit.errors import InputError
from xnn_toolkit.viz import concept_gallery, concept_overlay


def test_overlay_hand_computed():
    # One grey 2 x 2 image, two concepts at image resolution (interpolation is the identity).
    img = torch.full((1, 3, 2, 2), 0.5)
    scores = torch.tensor([[[[4.0, 0.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 0.5]]]])
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    out = concept_overlay(img, scores, colors=[red, blue], alpha=0.5)
    # normalised: concept 0 -> [[1, 0], [.5, 0]], concept 1 -> [[0, 1], [0, .5]]
    # pixel (0,0): red at strength 1 -> 0.5*0.5 + 0.5*red
    expected = torch.empty(1, 3, 2, 2)
    for (i, j), colour, s in [
        ((0, 0), red, 1.0),
        ((1, 0), red, 0.5),
        ((0, 1), blue, 1.0),
        ((1, 1), blue, 0.5),
    ]:
        a = 0.5 * s
        expected[0, :, i, j] = (1 - a) * 0.5 + a * torch.tensor(colour)
    torch.testing.assert_close(out, expected)


def test_overlay_without_concepts_is_the_image():
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = concept_overlay(img, torch.zeros(2, 3, 2, 2))
    torch.testing.assert_close(out, img)


@pytest.mark.parametrize("ext", ["png", "svg", "pdf"])
def test_gallery_writes_files_atomically(tmp_path, ext):
    g = torch.Generator().manual_seed(1)
    img = torch.rand(5, 3, 16, 16, generator=g)
    scores = torch.rand(5, 3, 4, 4, generator=g)
    path = tmp_path / f"gallery.{ext}"
    fig = concept_gallery(img, scores, path, concepts=["a", "b", "c"], ncols=3, title="t")
    assert path.stat().st_size > 100
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert len(fig.axes) == 6
    head = path.read_bytes()[:5]
    assert head == {"png": b"\x89PNG\r", "svg": b"<?xml", "pdf": b"%PDF-"}[ext]


def test_gallery_errors(tmp_path):
    img = torch.rand(2, 3, 8, 8)
    with pytest.raises(InputError, match=".png"):
        concept_gallery(img, torch.rand(2, 2, 2, 2), tmp_path / "g.jpg")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="names"):
        concept_gallery(img, torch.rand(2, 2, 2, 2), concepts=["only one"])
    with pytest.raises(InputError, match="N = 2"):
        concept_overlay(img, torch.rand(3, 2, 2, 2))
    with pytest.raises(InputError, match="images"):
        concept_overlay(torch.rand(2, 8, 8), torch.rand(2, 2, 2, 2))
