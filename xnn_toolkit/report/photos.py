"""The report's opening: a real pretrained ImageNet CNN explained on real photos.

``bundled:efficientnet_lite0`` on scikit-image's bundled photos (no network): the model's
top predictions, heatmaps of its two most likely classes per photo with several methods,
and NMF concepts of its last conv stage over the photos (Deep Feature Factorization, Collins
et al. 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..data import SkimagePhotos
from .document import Figure as ReportFigure
from .document import Paragraph, Report, Table

__all__ = ["photo_sections"]

#: Methods of the opening heatmap grid.
PHOTO_METHODS = ("cmwp", "mwp", "gradcam", "gradcam++", "saliency")


def photo_sections(
    report: Report,
    model: str = "bundled:efficientnet_lite0",
    photos: Sequence[str] | None = None,
    *,
    methods: Sequence[str] = PHOTO_METHODS,
    concept_layer: str = "bn2",
    rank: int = 4,
    top: int = 2,
    seed: int = 0,
) -> Report:
    """Add the real-model sections to ``report`` (predictions, heatmaps, NMF concepts).

    Parameters
    ----------
    report : Report
        Sections are appended.
    model : str
        A model spec of an ImageNet classifier.
    photos : list of str, optional
        Keys of :data:`~xnn_toolkit.data.SKIMAGE_PHOTOS` (default: all).
    methods : sequence of str
        Attribution methods of the heatmap grid.
    concept_layer : str
        A non-negative conv layer for the NMF concepts (EfficientNet-Lite0: ``bn2``, the
        last conv stage after its ReLU6).
    rank : int
        Number of concepts.
    top : int
        Classes explained per photo (the most probable first).
    seed : int

    Returns
    -------
    Report
        ``report``.
    """
    from ..heads import NMFConcepts
    from ..heads.nmf_tools import concept_maps
    from ..hooks import record
    from ..models import load_model
    from ..viz.concepts import concept_overlay
    from ..viz.heatmaps import heatmap_grid
    from .heatmaps import class_heatmaps

    lm = load_model(model)
    net, names = lm.model, lm.class_names or [str(i) for i in range(1000)]
    ds = SkimagePhotos.for_model(lm, photos)
    raw = torch.stack([ds[i][0] for i in range(len(ds))])
    x = lm.preprocessing.normalize(raw)
    with torch.no_grad():
        probs = net(x).softmax(1)
    best = probs.topk(3, dim=1)

    s = report.section(f"A real model on real photos: {lm.spec}")
    s.add(
        Paragraph(
            f"The ImageNet classifier {lm.spec} ({type(net).__name__}, "
            f"{sum(p.numel() for p in net.parameters()):,} parameters) on scikit-image's bundled "
            f"photos ({', '.join(ds.names)}), resized and centre-cropped as its data "
            "configuration says. Its three most probable classes per photo:"
        )
    )
    s.add(
        Table(
            "photo_predictions",
            [
                {
                    "photo": ds.names[i],
                    "ImageNet label": names[ds.labels[i]],
                    **{
                        f"top {k + 1}": f"{names[int(best.indices[i, k])]} "
                        f"({float(best.values[i, k]):.1%})"
                        for k in range(3)
                    },
                }
                for i in range(len(ds))
            ],
        )
    )

    rows, imgs, classes = [], [], []
    for i in range(len(ds)):
        for k in range(top):
            c = int(best.indices[i, k])
            rows.append(f"{names[c][:20]} ({float(best.values[i, k]):.0%})")
            imgs.append(i)
            classes.append(c)
    idx = torch.tensor(imgs)
    cls = torch.tensor(classes)
    grid = torch.stack([class_heatmaps(net, x[idx], cls, m, None) for m in methods], 1)
    fig = heatmap_grid(raw[idx], grid, col_labels=["photo", *methods], row_labels=rows)
    s.add(
        Paragraph(
            f"Heatmaps of the {top} most probable classes of each photo (rows: class and its "
            "probability), one column per method, each map scaled by its own maximum. "
            "Excitation Backprop reads at the model's default layer (the stage output nearest "
            "stride 16), Grad-CAM and Grad-CAM++ at the last conv stage; saliency is Captum's "
            "gradient at the input."
        )
    )
    s.add(ReportFigure("photo_heatmaps", fig, caption="real photos: heatmaps"))

    with record(net, [concept_layer]) as rec, torch.no_grad():
        net(torch.cat([x, x.flip(-1)]))  # the photos and their mirror images
    acts = rec.activations[concept_layer].float()
    nmf = NMFConcepts(rank, random_state=seed, negative="clip").fit(acts, layer=concept_layer)
    scores = nmf.transform(acts[: len(ds)])
    overlay = concept_overlay(raw, scores)
    maps = concept_maps(scores, tuple(raw.shape[-2:]), normalize=True)  # N x r x H x W
    fig = heatmap_grid(
        overlay,
        maps,
        col_labels=["all concepts", *[f"concept {k + 1}" for k in range(rank)]],
        row_labels=list(ds.names),
        shared_scale=True,
    )
    s.add(
        Paragraph(
            f"NMF concepts (rank {rank}) of the layer {concept_layer} "
            f"({acts.shape[1]} channels at {acts.shape[-2]} x {acts.shape[-1]}) over the photos "
            "and their mirror images, as Deep Feature Factorization shows them: first each pixel "
            "in the colour of its strongest concept, then each concept's map (scaled by its "
            "maximum over the photos). Relative reconstruction error "
            f"{nmf.relative_err_:.3f}."
        )
    )
    s.add(ReportFigure("photo_concepts", fig, caption="real photos: NMF concepts"))
    return report
