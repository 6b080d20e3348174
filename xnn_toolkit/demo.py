"""``xnn demo``: a real ImageNet model on real photos, then a bundled model end to end.

The report opens with ``bundled:efficientnet_lite0`` on scikit-image's photos (predictions,
heatmaps, NMF concepts), then explains a bundled synthetic-part model with every head and
metric against the synthetic data's ground truth.
"""

from __future__ import annotations

import os

from .errors import InputError
from .report.pipeline import ExplainConfig, build_report

__all__ = ["run_demo"]


def run_demo(
    out: str = "xnn-report",
    *,
    overwrite: bool = False,
    model: str = "vgg_synth",
    device: str = "cpu",
    seed: int = 0,
    quick: bool = False,
    progress: bool = True,
    real: bool = True,
) -> str:
    """The demo report in ``out/index.html``, with no network access.

    First the real ImageNet EfficientNet-Lite0 on scikit-image's photos (``real``; needs the
    ``imagenet`` extra), then a bundled model on the synthetic part dataset with every head
    (XNN/SRAE and its baselines, NMF concepts, class paths, class-specific gates), heatmaps
    and metrics. ``quick`` shrinks every sample size of the synthetic part.

    Returns
    -------
    str
        Path of the written ``index.html``.
    """
    spec = model if ":" in model else f"bundled:{model}"
    kw = dict(model=spec, dataset="synthetic", device=device, seed=seed, progress=progress)
    cfg = ExplainConfig.quick(**kw) if quick else ExplainConfig(**kw)
    out_abs = os.path.abspath(os.fspath(out))
    if os.path.isdir(out_abs) and os.listdir(out_abs) and not overwrite:
        raise InputError(
            f"--out {os.fspath(out)!r} exists and is not empty; pass --overwrite or choose "
            "another folder"
        )
    cfg.validate()
    report = build_report(cfg)
    if real:
        from .report.document import Report
        from .report.photos import photo_sections

        opening = photo_sections(Report(report.title), seed=seed)
        report.sections[:0] = opening.sections
    return report.write(out_abs, overwrite=overwrite)
