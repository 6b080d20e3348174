"""Benchmark the metrics against their references, side by side in one run.

1. Voronoi part probabilities (thesis Algorithm 3): ``xnn_toolkit.metrics`` (vectorised) vs the
   literal per-pixel implementation in ``tests/metrics/literal.py``, on the same heatmaps in
   the thesis's CUB setting (15 parts, 5 x-features, 224 x 224 float32 maps); same numbers
   (max abs difference) and the speed-up. The speed-up grows with the image size and the
   number of maps per image (the geometry is computed once per image).
2. Localisation metrics vs Quantus (pointing game without tolerance, attribution
   localisation = energy pointing game, top-k intersection) on the same heatmaps and masks:
   agreement and the time ratio ``Quantus / ours``.
3. Batch scoring (``xnn_toolkit.report.score_dataset``, to a folder on disk) vs computing
   the same heatmaps alone with ``explain``, batch by batch from the same data set; the
   ratio ``scoring / heatmaps`` is the runner's cost on top of the attribution (metrics,
   shards and tables, less what its shared passes save), with images per second and the
   ratio to one plain forward + backward over the same images. Two settings: the synthetic
   VGG (64 px, c-MWP and Grad-CAM, six metrics) and the real ImageNet model
   ``bundled:efficientnet_lite0`` (224 px, c-MWP, Grad-CAM and Grad-CAM++, five metrics,
   generated scenes with masks and parts).

Timings alternate ours / reference, repeat, and report medians. Both sides run on one CPU
thread (``torch.set_num_threads(1)``), as numpy does for these operations.

Usage: ``.venv/bin/python bench/metrics.py [--quick] [--only-scoring] [--skip-real]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from metrics.literal import voronoi_literal  # noqa: E402

from xnn_toolkit.metrics import (  # noqa: E402
    energy_pointing_game,
    pointing_game,
    top_k_intersection,
    voronoi_part_probabilities,
)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _alternate(ours, ref, reps):
    """Median seconds of ``ours`` and ``ref``, run alternately ``reps`` times each."""
    t_ours, t_ref, out_ours, out_ref = [], [], None, None
    for _ in range(reps):
        dt, out_ours = _timed(ours)
        t_ours.append(dt)
        dt, out_ref = _timed(ref)
        t_ref.append(dt)
    return statistics.median(t_ours), statistics.median(t_ref), out_ours, out_ref


def _parts(n, p, size, seed):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    kp = torch.rand(n, p, 2, generator=g, dtype=torch.float64) * torch.tensor([w - 1.0, h - 1.0])
    vis = torch.rand(n, p, generator=g) > 0.2
    x0 = torch.rand(n, generator=g, dtype=torch.float64) * w / 4
    y0 = torch.rand(n, generator=g, dtype=torch.float64) * h / 4
    bbox = torch.stack([x0, y0, x0 + w / 2, y0 + h / 2], 1)
    return kp, vis, bbox


def bench_voronoi(quick: bool) -> None:
    # the thesis's CUB setting: 15 parts, n = 5 x-features, 224 x 224 heatmaps
    n, k, p = (2, 2, 15) if quick else (2, 5, 15)
    size = (32, 32) if quick else (224, 224)
    reps = 1 if quick else 3
    kp, vis, bbox = _parts(n, p, size, seed=0)
    # float32 heatmaps, as attribution methods produce them; the geometry is float64 anyway
    maps = torch.rand(n, k, *size, generator=torch.Generator().manual_seed(1))

    def ours():
        return voronoi_part_probabilities(maps, keypoints=kp, visible=vis, bbox=bbox)

    def literal():
        return torch.tensor(
            [
                voronoi_literal(maps[m].tolist(), kp[m].tolist(), vis[m].tolist(), bbox[m].tolist())
                for m in range(n)
            ],
            dtype=torch.float64,
        )

    # Ours is fast: time it over many calls so the clock resolution does not matter.
    inner = 20

    def ours_many():
        out = None
        for _ in range(inner):
            out = ours()
        return out

    t_ours, t_ref, a, b = _alternate(ours_many, literal, reps)
    t_ours /= inner
    diff = float((a.double() - b).abs().max())
    print(
        f"voronoi  {n} images x {k} maps, {size[0]}x{size[1]}, {p} parts: "
        f"ours {t_ours * 1e3:.2f} ms, literal Algorithm 3 {t_ref * 1e3:.0f} ms, "
        f"max |diff| {diff:.2e}"
    )
    print(f"RESULT voronoi_speedup_vs_literal {t_ref / t_ours:.0f} ratio")
    print(f"RESULT voronoi_max_abs_diff_vs_literal {diff:.2e} abs")


def _quantus_scores(name, maps, masks, **kw):
    import quantus

    n = maps.shape[0]
    a = maps.numpy()[:, None]
    s = masks.numpy().astype(np.float64)[:, None]
    x = np.zeros((n, 1) + tuple(maps.shape[-2:]))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        metric = getattr(quantus, name)(disable_warnings=True, normalise=False, abs=False, **kw)
        out = metric(model=None, x_batch=x, y_batch=np.zeros(n, dtype=int), a_batch=a, s_batch=s)
    return torch.tensor(np.asarray(out, dtype=np.float64))


def bench_localisation(quick: bool) -> None:
    n, size = (16, (32, 32)) if quick else (256, (64, 64))
    reps = 2 if quick else 7
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(n, *size, generator=g, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    cy = torch.randint(0, size[0], (n, 1, 1), generator=g)
    cx = torch.randint(0, size[1], (n, 1, 1), generator=g)
    masks = (ys - cy) ** 2 + (xs - cx) ** 2 <= (size[0] // 4) ** 2
    k = size[0] * size[1] // 10
    cases = [
        (
            "pointing_game",
            lambda: pointing_game(maps, masks, tolerance=0).double(),
            "PointingGame",
            {},
        ),
        (
            "energy_pointing_game",
            lambda: energy_pointing_game(maps, masks),
            "AttributionLocalisation",
            {"positive_attributions": True},
        ),
        (
            "top_k_intersection",
            lambda: top_k_intersection(maps, masks, k).double(),
            "TopKIntersection",
            {"k": k},
        ),
    ]
    _quantus_scores("PointingGame", maps[:2], masks[:2])  # import and warm up
    for name, ours, qname, kw in cases:
        t_ours, t_ref, a, b = _alternate(
            ours, lambda q=qname, kw=kw: _quantus_scores(q, maps, masks, **kw), reps
        )
        diff = float((a - b).abs().max())
        print(
            f"{name:22s} {n} maps {size[0]}x{size[1]}: ours {t_ours * 1e3:.2f} ms, "
            f"quantus {t_ref * 1e3:.2f} ms, max |diff| {diff:.1e}"
        )
        print(f"RESULT {name}_quantus_over_ours {t_ref / t_ours:.1f} ratio")
        print(f"RESULT {name}_max_abs_diff_vs_quantus {diff:.1e} abs")


def _scoring_setting(real: bool, quick: bool, methods: tuple[str, ...] | None = None):
    """(model or LoadedModel, data set, config, name) of one scoring setting."""
    from xnn_toolkit.data import Normalized, SyntheticParts
    from xnn_toolkit.models import load_model
    from xnn_toolkit.report import ScoringConfig

    if real:  # the real ImageNet model at its own resolution, on generated scenes with masks
        n, size, batch = (4, 224, 2) if quick else (32, 224, 8)
        lm = load_model("bundled:efficientnet_lite0")
        raw = SyntheticParts(n, size=size, seed=1, return_annotations=True)
        data = Normalized(raw, lm.preprocessing.mean, lm.preprocessing.std)
        methods = ("cmwp", "gradcam", "gradcampp")
        metrics = (
            "pointing_game",
            "energy_pointing_game",
            "iou",
            "voronoi_locality",
            "mask_locality",
        )
        name, model = "efficientnet_lite0", lm.model
    else:
        n, size, batch = (8, 32, 4) if quick else (96, 64, 16)
        torch.manual_seed(0)  # the weights of the untrained VGG (speed does not need training)
        model = load_model("zoo:vgg_small", num_classes=10, in_chans=3).model
        data = Normalized(
            SyntheticParts(n, size=size, seed=1, return_annotations=True),
            SyntheticParts.mean,
            SyntheticParts.std,
        )
        methods = methods or ("cmwp", "gradcam")
        metrics = (
            "pointing_game",
            "energy_pointing_game",
            "iou",
            "ap50",
            "voronoi_locality",
            "mask_locality",
        )
        name = "synthetic vgg_small"
    cfg = ScoringConfig(
        methods=methods, batch_size=batch, shard_size=4 * batch, metrics=metrics, target="label"
    )
    return model, data, cfg, n, size, name


def bench_scoring(quick: bool, real: bool, methods: tuple[str, ...] | None = None) -> None:
    import tempfile

    from xnn_toolkit.attribution import explain
    from xnn_toolkit.report import score_dataset

    model, data, cfg, n, size, name = _scoring_setting(real, quick, methods)
    batch, methods = cfg.batch_size, cfg.methods
    reps = 1 if quick else (3 if real else 5)
    folder = tempfile.mkdtemp(prefix="xnn-bench-scoring-")

    def scoring():
        return score_dataset(model, data, cfg, out=folder, overwrite=True, progress=False)

    def batches():
        for a in range(0, n, batch):
            items = data.__getitems__(list(range(a, min(a + batch, n))))
            yield torch.stack([it[0] for it in items]), torch.tensor([it[1] for it in items])

    def heatmaps():
        return [explain(model, x, y, method=m).heatmap for x, y in batches() for m in methods]

    def forward_backward():
        # one plain forward + backward (input gradient of the labelled logits) per batch
        for x, y in batches():
            x = x.clone().requires_grad_(True)
            model(x).gather(1, y[:, None]).sum().backward()
        return None

    scoring(), heatmaps()  # warm up
    t_score, t_maps, res, _ = _alternate(scoring, heatmaps, reps)
    _, t_fb, _, _ = _alternate(lambda: None, forward_backward, reps)
    model.zero_grad(set_to_none=True)
    pg = res.value("pointing_game", methods[0])
    key = "real" if real else "synthetic" + ("_" + "_".join(methods) if methods else "")
    print(
        f"scoring  {name}: {n} images {size}x{size}, {len(methods)} methods "
        f"({', '.join(methods)}), {len(cfg.metrics)} metrics: runner {t_score:.2f} s "
        f"({n / t_score:.1f} img/s), heatmaps alone {t_maps:.2f} s, one forward + backward "
        f"{t_fb:.2f} s; {methods[0]} pointing game {pg:.3f}"
    )
    print(f"RESULT batch_scoring_over_heatmaps_{key} {t_score / t_maps:.2f} ratio")
    print(f"RESULT batch_scoring_images_per_second_{key} {n / t_score:.1f} img/s")
    print(f"RESULT batch_scoring_over_forward_backward_{key} {t_score / t_fb:.2f} ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds")
    parser.add_argument("--only-scoring", action="store_true", help="the scoring part alone")
    parser.add_argument("--skip-synthetic", action="store_true", help="no synthetic scoring")
    parser.add_argument("--skip-real", action="store_true", help="no real-model scoring")
    parser.add_argument(
        "--synthetic-methods",
        default=None,
        help="comma-separated methods of the synthetic setting (default cmwp,gradcam); e.g. "
        "mwp,cmwp, which share one forward per batch",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU")
    if not args.only_scoring:
        bench_voronoi(args.quick)
        bench_localisation(args.quick)
    if not args.skip_synthetic:
        chosen = tuple(args.synthetic_methods.split(",")) if args.synthetic_methods else None
        bench_scoring(args.quick, real=False, methods=chosen)
    if not args.skip_real:
        bench_scoring(args.quick, real=True)


if __name__ == "__main__":
    main()
