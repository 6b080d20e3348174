"""Rendering speed of the synthetic part-annotated birds on one CPU thread.

Measures, side by side and alternating (medians over repetitions), per CPU second of the
one thread (what one core delivers, robust to other jobs on a shared machine) and per
wall-clock second:

- ours, batched: ``SyntheticParts.render_batch`` (images *and* all annotations: keypoints,
  visibility, boxes, part and object masks) at 64 x 64;
- ours, per sample: ``SyntheticParts.__getitem__`` in a loop (the slow path a plain
  DataLoader without ``__getitems__`` would take);
- reference: ``torchvision.datasets.FakeData`` (random PIL images, ``ToTensor``), the
  cheapest image source torchvision offers, at the same size.

``--grid PATH`` also writes a PNG grid of samples with their keypoints (filled: visible,
crosses: invisible) and boxes, for a look at what the models see.
``--stats`` also measures the per-channel mean and std recorded in
``SyntheticParts.mean`` / ``SyntheticParts.std`` (20 000 images of seed 0).

Run: ``.venv/bin/python bench/synthetic.py [--quick] [--stats] [--grid /tmp/synthetic_grid.png]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision import transforms
from torchvision.datasets import FakeData

from xnn_toolkit.data.synthetic import SyntheticParts


def _time(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call (one thread: CPU time is time on one core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _stats(n: int) -> None:
    ds = SyntheticParts(n, seed=SyntheticParts.TRAIN_SEED)
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for start in range(0, n, 1000):
        images, _ = ds.render_batch(range(start, min(start + 1000, n)))
        total += images.double().sum(dim=(0, 2, 3))
        squares += images.double().pow(2).sum(dim=(0, 2, 3))
        pixels += images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / pixels
    std = (squares / pixels - mean**2).sqrt()
    print(f"stats over {n} images: mean {tuple(round(v, 4) for v in mean.tolist())}")
    print(f"stats over {n} images: std  {tuple(round(v, 4) for v in std.tolist())}")
    print(f"recorded:               mean {SyntheticParts.mean} std {SyntheticParts.std}")


def _grid(path: str, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ds = SyntheticParts(48, size=size, seed=SyntheticParts.TEST_SEED, num_classes=12)
    images, batch = ds.render_batch(range(48))
    colours = plt.get_cmap("tab20")
    fig, axes = plt.subplots(6, 8, figsize=(16, 13))
    for k, ax in enumerate(axes.flat):
        ax.imshow(images[k].permute(1, 2, 0).numpy(), interpolation="nearest")
        for p in range(len(ds.part_names)):
            x, y = batch.keypoints[k, p].tolist()
            if 0 <= x < size and 0 <= y < size:
                marker = "o" if batch.visible[k, p] else "x"
                ax.plot(x, y, marker, ms=3, color=colours(p), mec="k", mew=0.4)
        x0, y0, x1, y1 = batch.bbox[k].tolist()
        box = plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, ec="w")
        ax.add_patch(box)
        ax.set_title(ds.classes[int(batch.labels[k])], fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)
    print(f"grid of samples written to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds")
    parser.add_argument("--stats", action="store_true", help="measure mean and std")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--grid", metavar="PATH", help="write a PNG grid of samples")
    args = parser.parse_args()
    torch.set_num_threads(1)

    reps = 3 if args.quick else 9
    n_batch = 256 if args.quick else 1024
    n_single = 32 if args.quick else 128
    ds = SyntheticParts(1_000_000, size=args.size, seed=0)
    fake = FakeData(
        size=1_000_000,
        image_size=(3, args.size, args.size),
        num_classes=10,
        transform=transforms.ToTensor(),
    )
    ds.render_batch(range(64))  # build templates, warm up
    fake[0]

    # Rates per wall-clock second and per CPU second; on a shared machine the wall-clock
    # rate drops with the load while the CPU rate is what one core delivers.
    rates: dict[str, list[tuple[float, float]]] = {"batched": [], "single": [], "fake": []}
    for r in range(reps):
        o = r * n_batch  # fresh samples every repetition
        wall, cpu = _time(lambda o=o: ds.render_batch(range(o, o + n_batch)))
        rates["batched"].append((n_batch / wall, n_batch / cpu))
        wall, cpu = _time(lambda o=o: [fake[o + i] for i in range(n_single)])
        rates["fake"].append((n_single / wall, n_single / cpu))
        wall, cpu = _time(lambda o=o: [ds[o + i] for i in range(n_single)])
        rates["single"].append((n_single / wall, n_single / cpu))
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
        for k, v in rates.items()
    }
    print(f"size {args.size}, one thread, {reps} repetitions, medians (per wall s / per CPU s):")
    names = {
        "batched": f"SyntheticParts.render_batch ({n_batch}/call)",
        "single": "SyntheticParts[i] loop",
        "fake": "torchvision FakeData[i] loop",
    }
    for k, label in names.items():
        print(f"  {label:42s} {med[k][0]:8.0f} img/s  {med[k][1]:8.0f} img/s")
    if args.grid:
        _grid(args.grid, args.size)
    if args.stats:
        _stats(2000 if args.quick else 20000)
    print(f"RESULT synthetic_images_per_s {med['batched'][1]:.0f} img/s")
    print(f"RESULT synthetic_images_per_wall_s {med['batched'][0]:.0f} img/s")
    print(f"RESULT synthetic_getitem_images_per_s {med['single'][1]:.0f} img/s")
    print(f"RESULT synthetic_batched_over_fakedata {med['batched'][1] / med['fake'][1]:.2f} ratio")


if __name__ == "__main__":
    main()
