"""Batched one-vs-all XNN heads vs fitting them one by one (issue: XNN heads).

All ``C`` heads of a layer live in one grouped module and train together; the reference
fits the same heads one class at a time (``classes=[c]``), with the same objective, data
sizes, batch size and number of epochs. Both sides run alternately, several repetitions;
the median wall times are compared.

    .venv/bin/python bench/xnn.py [--quick]

Ends with ``RESULT xnn_batched_speedup <ratio> ratio``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from xnn_toolkit.heads.xnn import XNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    c, d = args.classes, args.dim
    n = 4000 if not args.quick else 1000
    z = torch.relu(torch.randn(n, d))
    logits = z @ torch.randn(d, c) * 0.1
    labels = torch.arange(n) % c
    hidden = (800, 100) if not args.quick else (64, 16)
    kw = dict(n_features=5, hidden=hidden, n_positive=50 if not args.quick else 20,
              n_negative=1000 if not args.quick else 200, max_epochs=3, patience=100,
              batch_size=256)  # fmt: skip

    def batched() -> float:
        t = time.perf_counter()
        XNN(**kw).fit(z, logits, labels)
        return time.perf_counter() - t

    def one_by_one() -> float:
        t = time.perf_counter()
        for k in range(c):
            XNN(classes=[k], **kw).fit(z, logits, labels)
        return time.perf_counter() - t

    batched()  # warm-up
    tb, to = [], []
    for _ in range(args.reps if not args.quick else 1):
        tb.append(batched())
        to.append(one_by_one())
    mb, mo = statistics.median(tb), statistics.median(to)
    print(f"{c} heads, dim Z = {d}, hidden {hidden}, 3 epochs: batched {mb:.2f} s, "
          f"one by one {mo:.2f} s (medians of {len(tb)})")  # fmt: skip
    print(f"RESULT xnn_batched_speedup {mo / mb:.2f} ratio")


if __name__ == "__main__":
    main()
