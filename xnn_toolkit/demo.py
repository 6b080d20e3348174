"""``xnn demo``: the embedded default, a bundled synthetic-part model explained end to end."""

from __future__ import annotations

from .report.pipeline import ExplainConfig, run_explain

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
) -> str:
    """Explain a bundled model on the synthetic part dataset into ``out/index.html``.

    Every head (XNN/SRAE and its baselines, NMF concepts, class paths, class-specific gates),
    heatmaps and metrics, with no network access. ``quick`` shrinks every sample size.

    Returns
    -------
    str
        Path of the written ``index.html``.
    """
    spec = model if ":" in model else f"bundled:{model}"
    kw = dict(model=spec, dataset="synthetic", device=device, seed=seed, progress=progress)
    cfg = ExplainConfig.quick(**kw) if quick else ExplainConfig(**kw)
    return run_explain(cfg, out, overwrite=overwrite)
