"""Benchmark a Quantus metric in the scoring runner vs Quantus's own loop, side by side.

Same images, same method (c-MWP on ``bundled:vgg_synth``), same metric (Quantus
``Sparseness``): (a) ``score_dataset`` with ``metrics=("quantus:Sparseness",)``, which hands
Quantus the heatmaps it already holds as ``a_batch``; (b) Quantus's own call with
``explain_func=quantus_explain_func("cmwp")``, which computes the heatmaps itself. Both give
the same numbers (checked) and load the images from the same data set; the ratio
``runner / quantus`` is the runner's cost on top (per-batch checks, per-image tables; its
prediction comes from the attribution's own forward pass).
Timings alternate the two sides after one untimed run of each and report medians; one CPU
thread for the network on both sides (the runner may use a second core for Quantus's
interpreter-bound checks, in its metrics process).

The time spent inside the c-MWP calls is reported for each side as well (the same calls on
the same images), which separates the runner's own cost from the attribution's.

The minor page faults of each side are reported too: ``--default-malloc`` leaves glibc's
heap thresholds alone (the runner raises them otherwise) and ``--no-helper`` keeps the
interpreter-bound Quantus work in the metrics thread, to measure what each of these does.

Usage: ``.venv/bin/python bench/interop.py [--quick] [--images N] [--shard-size N]
[--batch-size N] [--repetitions N] [--default-malloc] [--no-helper]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xnn_toolkit.data.normalized import Normalized  # noqa: E402
from xnn_toolkit.data.synthetic import SyntheticParts  # noqa: E402
from xnn_toolkit.interop import quantus_explain_func  # noqa: E402
from xnn_toolkit.models import load_model  # noqa: E402
from xnn_toolkit.report.scoring import ScoringConfig, score_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=256, help="images scored (default 256)")
    ap.add_argument("--shard-size", type=int, default=None, help="runner shard size")
    ap.add_argument("--batch-size", type=int, default=16, help="both sides (default 16)")
    ap.add_argument("--repetitions", type=int, default=5, help="timed runs per side")
    ap.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's heap thresholds as they are (the runner raises them otherwise)",
    )
    ap.add_argument(
        "--no-helper", action="store_true", help="no metrics process (the metrics thread only)"
    )
    args = ap.parse_args()
    import quantus

    import xnn_toolkit.report.scoring as scoring
    from xnn_toolkit.attribution.base import AttributionMethod
    from xnn_toolkit.report._metrics_process import MetricsProcess

    if args.default_malloc:
        scoring.raise_heap_thresholds = lambda: False
    if args.no_helper:
        start = MetricsProcess.start.__func__
        MetricsProcess.start = classmethod(lambda cls, wanted: start(cls, False))
    torch.set_num_threads(1)
    n, reps = (8, 1) if args.quick else (args.images, args.repetitions)
    # seconds spent inside the attribution calls, per side (the same c-MWP on both)
    in_attribute = {"now": 0.0}
    real_attribute = AttributionMethod.attribute

    def timed_attribute(self, *a, **kw):
        t = time.perf_counter()
        try:
            return real_attribute(self, *a, **kw)
        finally:
            in_attribute["now"] += time.perf_counter() - t

    AttributionMethod.attribute = timed_attribute
    loaded = load_model("bundled:vgg_synth")
    pre = loaded.preprocessing
    raw = SyntheticParts(n, size=64, seed=0, num_classes=10, return_annotations=True)
    ds = Normalized(raw, pre.mean, pre.std)
    cfg = ScoringConfig(
        methods=("cmwp",),
        metrics=("quantus:Sparseness",),
        batch_size=args.batch_size,
        shard_size=args.shard_size,
    )

    def runner() -> np.ndarray:
        res = score_dataset(loaded.model, ds, cfg, progress=False)
        rows = next(t for t in res.tables() if t.name == "scores_per_image").rows
        return np.array([r["quantus:Sparseness"] for r in rows])

    def own_loop() -> np.ndarray:
        # the user's loop loads the same images from the same data set
        images, ann = raw.render_batch(range(n))
        x, y = pre.normalize(images), ann.labels
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            out = quantus.Sparseness(disable_warnings=True)(
                model=loaded.model,
                x_batch=x.numpy(),
                y_batch=y.numpy(),
                explain_func=quantus_explain_func("cmwp"),
                device="cpu",
                batch_size=args.batch_size,
            )
        return np.asarray(out, dtype=np.float64)

    def faults() -> int:  # minor page faults of this process so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    t_run, t_own, att_run, att_own, f_run, f_own = [], [], [], [], [], []
    runner()  # warm-up, untimed: first-call costs of both sides
    own_loop()
    for _ in range(reps):
        in_attribute["now"] = 0.0
        f, t = faults(), time.perf_counter()
        a = runner()
        t_run.append(time.perf_counter() - t)
        f_run.append(faults() - f)
        att_run.append(in_attribute["now"])
        in_attribute["now"] = 0.0
        f, t = faults(), time.perf_counter()
        b = own_loop()
        t_own.append(time.perf_counter() - t)
        f_own.append(faults() - f)
        att_own.append(in_attribute["now"])
    AttributionMethod.attribute = real_attribute
    diff = float(np.abs(a - b).max())
    r, o = statistics.median(t_run), statistics.median(t_own)
    print(
        f"images {n}, repetitions {reps}: runner {r:.2f} s, quantus loop {o:.2f} s; inside the "
        f"c-MWP calls: runner {statistics.median(att_run):.2f} s, quantus loop "
        f"{statistics.median(att_own):.2f} s; minor page faults: runner "
        f"{statistics.median(f_run):.0f}, quantus loop {statistics.median(f_own):.0f}"
    )
    print(f"RESULT quantus_sparseness_runner_over_quantus_loop {r / o:.2f} ratio")
    print(f"RESULT quantus_sparseness_max_abs_diff {diff:.1e} abs")


if __name__ == "__main__":
    main()
