"""``xnn figures --per-image``: one overlay per image and method, colour map, opacity."""

import numpy as np
import pytest
from matplotlib.image import imread

from xnn_toolkit.cli import main
from xnn_toolkit.errors import InputError
from xnn_toolkit.report.export import figure_report


def test_per_image_overlays(tmp_path):
    def run(out, alpha, cmap):
        main(
            [
                "figures",
                "--model",
                "bundled:vgg_synth",
                "--methods",
                "cmwp,gradcam",
                "--n",
                "2",
                "--per-image",
                "--cmap",
                cmap,
                "--alpha",
                str(alpha),
                "--formats",
                "png",
                "--dpi",
                "40",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        return sorted(p.name for p in (out / "figures").iterdir())

    names = run(tmp_path / "a", 0.0, "viridis")
    want = [f"image{i:03d}_{m}.png" for i in range(2) for m in ("cmwp", "gradcam")]
    assert set(want) <= set(names) and "heatmaps.png" in names
    run(tmp_path / "b", 1.0, "viridis")
    run(tmp_path / "c", 0.0, "magma")
    # same panel and title: opacity 0 shows the photo alone, whatever the colour map;
    # opacity 1 shows the map
    a, b, c = (imread(tmp_path / k / "figures" / "image000_cmwp.png") for k in "abc")
    assert np.array_equal(a, c)
    assert not np.array_equal(a, b)


def test_bad_look_is_refused():
    with pytest.raises(InputError, match="viridis"):
        figure_report("bundled:vgg_synth", n=1, per_image=True, cmap="viridsi")
    with pytest.raises(InputError, match="alpha"):
        figure_report("bundled:vgg_synth", n=1, per_image=True, alpha=1.5)


def test_figures_save_maps_equal_a_fresh_explanation(tmp_path):
    import torch

    import xnn_toolkit
    from xnn_toolkit.attribution import explain
    from xnn_toolkit.data import load_dataset

    out = tmp_path / "figs"
    main(
        [
            "figures",
            "--model",
            "bundled:vgg_synth",
            "--methods",
            "gradcam",
            "--n",
            "3",
            "--formats",
            "png",
            "--dpi",
            "40",
            "--save-maps",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    saved = xnn_toolkit.load_maps(out)
    assert saved.maps.shape == (3, 64, 64)
    assert saved.manifest["model"]["spec"] == "bundled:vgg_synth"
    lm = xnn_toolkit.load_model("bundled:vgg_synth")
    ds = load_dataset("synthetic", split="test", n=3)
    x = lm.preprocessing.normalize(torch.stack([ds[i][0] for i in range(3)]))
    labels = [r["class"] for r in saved.records]
    assert labels == [int(ds[i][1]) for i in range(3)]
    want = explain(lm.model, x, labels, method="gradcam", layer=saved.records[0]["layer"])
    torch.testing.assert_close(saved.maps, want.heatmap)
