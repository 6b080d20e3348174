"""Batched one-vs-all XNN heads vs fitting them one by one (issue 4, docs/methods/xnn.rst).

All ``C`` heads of a layer live in one grouped module and train together; the reference
fits the same heads one class at a time (``XNN(classes=[c])``), with the same objective
(SRAE, ``L_FS + β L_SR + η L_PT``), data sizes, batch size and number of epochs. Both sides
run alternately, several repetitions; the median wall times are compared. Activations are
synthetic (post-ReLU Gaussian ``N x D``, logits a random linear map of them): the timing does
not depend on what the heads learn.

Settings (``--setting``, default all):

- ``small``: 10 heads, dim Z 512, hidden (64, 16), 20 positives / 200 negatives per class
  (the earlier ``--quick`` setting; per-fit overhead is a large share of the work).
- ``thesis10``: 10 heads, dim Z 512, the thesis's hidden sizes (800, 100), 50 positives /
  1 000 negatives per class.
- ``thesis50``: 50 heads, dim Z 256 (the bundled VGG's fc6), hidden (800, 100), 50
  positives / 500 negatives per class: closer to the thesis's many classes with 50
  positives each (CUB: 200 classes, 50 / 8 000, dim Z 4 096; too large for a CPU bench).

    .venv/bin/python bench/xnn.py [--quick] [--setting NAME] [--impl FILE] [--profile]

``--impl FILE`` times the ``XNN`` of another copy of ``xnn_toolkit/heads/xnn.py`` (e.g. one
written by ``git show <commit>:xnn_toolkit/heads/xnn.py``) instead of the installed one.
Three sides per setting: the default grouped fit (``heads_per_step="auto"``: on a CPU, blocks
of heads whose first-layer weights take about 8 MB), the grouped fit with all heads in every
step (``heads_per_step=None``) and the loop over classes; repetitions alternate their order.
Prints one ``RESULT xnn_batched_speedup_<setting> <ratio> ratio`` line per setting (auto),
``RESULT xnn_all_heads_per_step_speedup_<setting>`` (all heads per step) and
``RESULT xnn_batched_speedup <ratio> ratio`` for ``thesis50`` (the headline).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import statistics
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Setting:
    classes: int
    dim: int
    hidden: tuple[int, ...]
    n_positive: int
    n_negative: int
    epochs: int
    n: int  # examples in the bank (balanced labels)


SETTINGS = {
    "small": Setting(10, 512, (64, 16), 20, 200, 3, 1000),
    "thesis10": Setting(10, 512, (800, 100), 50, 1000, 3, 4000),
    "thesis50": Setting(50, 256, (800, 100), 50, 500, 2, 5000),
}


def _xnn_class(impl: str | None) -> type:
    if impl is None:
        from xnn_toolkit.heads.xnn import XNN

        return XNN
    # Loaded as a sibling of the real module so that its relative imports resolve.
    spec = importlib.util.spec_from_file_location("xnn_toolkit.heads._bench_impl", impl)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.XNN


def _profile(name: str, batched: object, one_by_one: object) -> None:
    """torch.profiler tables (self CPU time, top operators) of one fit of each side."""
    from torch.profiler import ProfilerActivity, profile

    for side, fn in (("batched", batched), ("one by one", one_by_one)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e6
        print(f"profile {name}, {side}: wall {wall:.2f} s (profiled), operators {total:.2f} s")
        print(events.table(sort_by="self_cpu_time_total", row_limit=10))


def run(name: str, s: Setting, reps: int, xnn: type, profile: bool = False) -> dict[str, float]:
    """Median one-by-one time over the median times of the grouped fits, for one setting.

    Returns ``{"auto": ratio, "together": ratio}``: the default grouped fit
    (``heads_per_step="auto"``: blocks of heads on a CPU) and all heads in every step
    (``heads_per_step=None``); only ``auto`` where ``xnn`` has no such parameter.
    """
    gen = torch.Generator().manual_seed(0)
    n = s.n
    z = torch.relu(torch.randn(n, s.dim, generator=gen))
    logits = z @ torch.randn(s.dim, s.classes, generator=gen) * 0.1
    labels = torch.arange(n) % s.classes
    kw = dict(
        n_features=5,
        hidden=s.hidden,
        n_positive=s.n_positive,
        n_negative=s.n_negative,
        max_epochs=s.epochs,
        patience=100,
        batch_size=256,
    )
    blocks = "heads_per_step" in inspect.signature(xnn).parameters

    def grouped(**extra) -> float:
        t = time.perf_counter()
        xnn(**kw, **extra).fit(z, logits, labels=labels)
        return time.perf_counter() - t

    def one_by_one() -> float:
        t = time.perf_counter()
        for k in range(s.classes):
            xnn(classes=[k], **kw).fit(z, logits, labels=labels)
        return time.perf_counter() - t

    sides = {"auto": grouped}
    if blocks:
        sides["together"] = lambda: grouped(heads_per_step=None)
    sides["one by one"] = one_by_one
    grouped()  # warm-up
    if profile:
        _profile(name, grouped, one_by_one)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(reps):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for k in order:
            times[k].append(sides[k]())
    med = {k: statistics.median(v) for k, v in times.items()}
    shown = ", ".join(f"{k} {v:.2f} s" for k, v in med.items())
    print(
        f"{name}: {s.classes} heads, dim Z = {s.dim}, hidden {s.hidden}, {s.n_positive} / "
        f"{s.n_negative} positives / negatives per class, {s.epochs} epochs, N = {n}: "
        f"{shown} (medians of {reps}; auto = heads_per_step='auto', together = all heads "
        "in every step)",
        flush=True,
    )
    return {k: med["one by one"] / med[k] for k in sides if k != "one by one"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small setting, one repetition")
    ap.add_argument("--setting", choices=sorted(SETTINGS), action="append")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impl", help="path of another xnn.py whose XNN is timed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.setting or (["small"] if args.quick else list(SETTINGS))
    reps = 1 if args.quick else args.reps
    xnn = _xnn_class(args.impl)
    ratios = {}
    for name in names:
        got = run(name, SETTINGS[name], reps, xnn, args.profile)
        ratios[name] = got["auto"]
        print(f"RESULT xnn_batched_speedup_{name} {got['auto']:.2f} ratio", flush=True)
        if "together" in got:
            print(f"RESULT xnn_all_heads_per_step_speedup_{name} {got['together']:.2f} ratio")
    if "thesis50" in ratios:
        print(f"RESULT xnn_batched_speedup {ratios['thesis50']:.2f} ratio")


if __name__ == "__main__":
    main()
