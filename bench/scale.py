"""Scoring throughput with the number of processes: one process vs ``torchrun`` ranks.

The same scoring job (``bundled:vgg_synth`` on the synthetic test scenes, c-MWP and Grad-CAM,
five metrics, one intra-op thread per process) runs as one plain process and under
``torchrun --standalone --nproc_per_node K`` for K = 1, 2, ... up to the cores available;
each run's images per second come from the run's own manifest (``runs[0].seconds``, the
scoring without the interpreter start), and the tables of every run must be byte-identical
to the one-process run's. Runs alternate and repeat; medians are reported.

Usage: ``.venv/bin/python bench/scale.py [--quick] [--max-procs K]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ("per_image.csv", "aggregate.csv")


def job(out: str, n: int) -> None:
    """One scoring run into ``out`` (a plain process or one torchrun rank)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from xnn_toolkit.data import load_dataset
    from xnn_toolkit.models import load_model
    from xnn_toolkit.report import ScoringConfig, score_dataset

    torch.set_num_threads(1)
    lm = load_model("bundled:vgg_synth")
    data = load_dataset("synthetic", split="test", n=n, model=lm)
    cfg = ScoringConfig(
        methods=("cmwp", "gradcam"),
        metrics=(
            "pointing_game",
            "energy_pointing_game",
            "iou",
            "voronoi_locality",
            "mask_locality",
        ),
        n=n,
        batch_size=16,
        shard_size=32,
    )
    score_dataset(lm, data, cfg, out=out, progress=False)


def _run(procs: int, n: int, out: Path) -> float:
    """Scoring seconds of one run with ``procs`` processes (0: a plain process)."""
    if out.exists():
        shutil.rmtree(out)
    me = [str(Path(__file__).resolve()), "--job", str(out), "--job-images", str(n)]
    cmd = (
        [sys.executable, *me]
        if procs == 0
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(procs),
            *me,
        ]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    manifest = json.loads((out / "manifest.json").read_text())
    return float(manifest["runs"][0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images, one repetition")
    parser.add_argument("--max-procs", type=int, default=None, help="most torchrun processes")
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job is not None:
        job(args.job, args.job_images)
        return
    n = 64 if args.quick else 256
    reps = 1 if args.quick else 3
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    top = args.max_procs or max(2, min(8, cores or 1))
    settings = [0, *range(1, top + 1)]
    tmp = Path(tempfile.mkdtemp(prefix="xnn-bench-scale-"))
    times: dict[int, list[float]] = {k: [] for k in settings}
    try:
        for _ in range(reps):
            for k in settings:
                times[k].append(_run(k, n, tmp / f"p{k}"))
        ref = {name: (tmp / "p0" / name).read_bytes() for name in TABLES}
        same = all(
            (tmp / f"p{k}" / name).read_bytes() == ref[name] for k in settings for name in TABLES
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"scoring {n} images (vgg_synth, 64 px, c-MWP + Grad-CAM, 5 metrics), {cores} cores")
    base = statistics.median(times[0])
    for k in settings:
        t = statistics.median(times[k])
        label = "one process" if k == 0 else f"torchrun x{k}"
        print(f"  {label:14s} {t:6.2f} s  {n / t:6.1f} img/s  speed-up {base / t:.2f}")
        if k:
            print(f"RESULT scale_images_per_second_torchrun{k} {n / t:.1f} img/s")
    print(f"RESULT scale_images_per_second_one_process {n / base:.1f} img/s")
    print(f"RESULT scale_tables_identical {int(same)} bool")
    if not same:
        raise SystemExit("the tables differ between process counts")


if __name__ == "__main__":
    main()
