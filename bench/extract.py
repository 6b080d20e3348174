"""Activation-bank extraction: throughput against the plain forward pass, and bounded memory.

Two measurements, both with random weights and no network:

1. **Throughput.** ``xnn_toolkit.bank.extract`` over a batch stream vs the plain forward
   pass (``with torch.no_grad(): model(x)``) over the same batches, in memory and on disk,
   with and without spatial pooling. Variants run in rotating order within each repetition;
   the figure is the median over repetitions of ``plain time / extract time`` (1.0 = no
   overhead; target >= 0.9).
2. **Memory.** In a fresh subprocess each (peak RSS from ``VmHWM`` in ``/proc/self/status``,
   minus the RSS before the measured call): extracting a bank 4 x larger than a memory budget
   to disk, streaming it back with ``iter_batches``, and, as the reference, extracting the
   same data into memory.

Run ``.venv/bin/python bench/extract.py`` (about two minutes on 2 cores) or with ``--quick``
(seconds). Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


# --------------------------------------------------------------------------- throughput


def _throughput(quick: bool) -> dict[str, float]:
    import timm
    import torch

    from xnn_toolkit.bank import extract

    torch.manual_seed(0)
    size, batch, n_batches, reps = (64, 16, 3, 3) if quick else (128, 32, 6, 5)
    model = timm.create_model("resnet18", pretrained=False, num_classes=100).eval()
    x = torch.randn(batch * n_batches, 3, size, size, generator=torch.Generator().manual_seed(1))
    batches = list(x.split(batch))
    layers = ["layer2", "layer3", "layer4"]
    tmp = Path(tempfile.mkdtemp(prefix="xnn-bench-extract-"))

    def plain() -> None:
        with torch.no_grad():
            for xb in batches:
                model(xb)

    counter = [0]

    def ours(pool, disk) -> None:
        counter[0] += 1
        path = tmp / f"bank{counter[0]}" if disk else None
        extract(model, batches, layers, pool=pool, path=path, progress=False)

    variants = {
        "plain": plain,
        "memory_unpooled": lambda: ours(None, False),
        "memory_pooled": lambda: ours("avg", False),
        "disk_unpooled": lambda: ours(None, True),
        "disk_pooled": lambda: ours("avg", True),
    }
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    plain()  # warm-up (thread pools, allocator)
    ours(None, True)
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
    for p in tmp.glob("bank*"):
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    tmp.rmdir()
    med = {k: statistics.median(v) for k, v in times.items()}
    # ratio within each repetition (same load on the machine), then the median over them
    ratios = {
        k: statistics.median(p / t for p, t in zip(times["plain"], times[k]))
        for k in names
        if k != "plain"
    }
    print(
        f"throughput: timm resnet18, {len(x)} images of {size} px in batches of {batch}, "
        f"layers {layers}, {reps} repetitions (median seconds):"
    )
    for k in names:
        extra = f"   plain/this {ratios[k]:.3f}" if k in ratios else ""
        print(f"  {k:16s} {med[k]:.3f} s   ({len(x) / med[k]:.0f} img/s){extra}")
    return ratios


# --------------------------------------------------------------------------- memory


_MEMORY_CHILD = r"""
import json, os, sys, tempfile
import torch
from torch import nn
sys.path.insert(0, {root!r})
from xnn_toolkit.bank import ActivationBank, extract

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

mode, n, size, batch, shard, path = sys.argv[1:7]
n, size, batch, shard = int(n), int(size), int(batch), int(shard)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(64, 10)).eval()

def stream():  # inputs made batch by batch: the data set itself never sits in memory
    for k, a in enumerate(range(0, n, batch)):
        g = torch.Generator().manual_seed(k)
        yield torch.randn(min(batch, n - a), 3, size, size, generator=g)

with torch.no_grad():  # warm-up outside the measurement
    model(torch.zeros(batch, 3, size, size))
reset_peak()
base = status("VmRSS")
if mode == "disk":
    bank = extract(model, stream(), ["1"], path=path, shard_size=shard, progress=False)
elif mode == "memory":
    bank = extract(model, stream(), ["1"], progress=False)
else:
    bank = ActivationBank.load(path)
    total = 0.0
    for z in bank.iter_batches("1", batch):
        total += float(z[:, 0, 0, 0].sum())
peak = status("VmHWM") - base
print(json.dumps({{"peak": peak, "n": len(bank), "shape": list(bank.shape("1"))}}))
"""


def _memory(quick: bool) -> dict[str, float]:
    budget = (32 if quick else 64) * 2**20
    size, batch = 32, 8  # a forward's own working set (~2 MB per batch) stays well inside
    per_sample = 64 * size * size * 4  # float32 output of the first conv: 256 KB
    n = 4 * budget // per_sample  # the bank is 4 x the budget
    shard = max(1, budget // 4 // per_sample)  # a quarter of the budget per shard
    tmp = Path(tempfile.mkdtemp(prefix="xnn-bench-memory-"))
    script = tmp / "child.py"
    script.write_text(_MEMORY_CHILD.format(root=str(ROOT)))
    bank = tmp / "bank"
    out = {}
    for mode in ("disk", "iter", "memory"):
        proc = subprocess.run(
            [
                sys.executable,
                str(script),
                mode,
                str(n),
                str(size),
                str(batch),
                str(shard),
                str(bank),
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode:
            raise SystemExit(f"memory child ({mode}) failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    bank_bytes = sum(f.stat().st_size for f in bank.iterdir())
    for f in bank.iterdir():
        f.unlink()
    bank.rmdir()
    script.unlink()
    tmp.rmdir()
    mb = 2**20
    print(
        f"memory: {n} samples x {per_sample // 1024} KB = bank of {bank_bytes / mb:.0f} MB on "
        f"disk, budget {budget / mb:.0f} MB, shards of {shard} samples "
        f"({shard * per_sample / mb:.0f} MB):"
    )
    for mode, label in (
        ("disk", "extract to disk"),
        ("iter", "iter_batches from disk"),
        ("memory", "extract in memory (reference)"),
    ):
        print(f"  {label:32s} peak RSS + {out[mode]['peak'] / mb:7.1f} MB")
    return {
        "bank_mb": bank_bytes / mb,
        "budget_mb": budget / mb,
        "disk_peak_mb": out["disk"]["peak"] / mb,
        "iter_peak_mb": out["iter"]["peak"] / mb,
        "memory_peak_mb": out["memory"]["peak"] / mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: stable timings on a shared machine)",
    )
    args = parser.parse_args()
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for the memory subprocesses
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs")
    ratios = _throughput(args.quick)
    mem = _memory(args.quick)
    for k, v in ratios.items():
        print(f"RESULT extract_{k}_over_forward {v:.3f} ratio")
    print(f"RESULT extract_bank_over_budget {mem['bank_mb'] / mem['budget_mb']:.2f} ratio")
    print(f"RESULT extract_disk_peak_rss {mem['disk_peak_mb']:.1f} MB")
    print(
        f"RESULT extract_disk_peak_over_budget {mem['disk_peak_mb'] / mem['budget_mb']:.3f} ratio"
    )
    print(f"RESULT bank_iter_batches_peak_rss {mem['iter_peak_mb']:.1f} MB")
    print(f"RESULT extract_memory_peak_rss_reference {mem['memory_peak_mb']:.1f} MB")


if __name__ == "__main__":
    main()
