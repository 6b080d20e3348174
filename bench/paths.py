"""Benchmark: class paths (docs/methods/paths.rst) -- one pass for all classes, and what the paths
show.

Run: ``.venv/bin/python bench/paths.py [--quick] [--threads N] [--no-train]``. No network.

Part A, speed (any weights do; a freshly initialised ``vgg_synth`` architecture is used):
time per epoch of fitting the paths of 10 classes in one pass (each image gathers its own
class's masks) vs one class at a time (a ``ClassPaths(classes=[c])`` fit per class), measured
side by side, alternating, medians of several repetitions, in two settings:

- ``stream``: the data is one DataLoader over ``SyntheticParts`` (rendered on the fly, as a
  user streams a dataset with augmentation); a one-class fit reads the whole stream and runs
  the network on its class's images only;
- ``presplit``: the images are rendered once into memory and a one-class fit gets only its
  class's images (same batch size), so both sides run the network on the same images.

Part B, quality (needs trained networks): the bundled ``vgg_synth`` / ``resnet_synth``
(``xnn_toolkit.zoo.load_bundled``); when they are not bundled, stand-ins trained with the same
recipes on fewer images (``xnn_toolkit.train.train``) cached in ``bench/out/models`` (shared
with ``bench/gates.py``), trained here unless ``--no-train``. Paths are fitted on training
images (seed 0) and evaluated on held-out images (seed 1):

- hit rate per layer on 2 x 2 composites of 4 classes (chance 25 %);
- mean path similarity of class pairs that differ in one part
  (``SyntheticParts.pairs_differing_in_one_part``) vs all other class pairs;
- misclassification analysis: share of errors whose predicted class is among the 3 classes
  with the most similar paths (chance 3/9).

Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from xnn_toolkit.data.normalized import Normalized  # noqa: E402
from xnn_toolkit.data.synthetic import SyntheticParts  # noqa: E402
from xnn_toolkit.errors import AssetError  # noqa: E402
from xnn_toolkit.heads.paths import ClassPaths  # noqa: E402
from xnn_toolkit.zoo import build_model, load_bundled  # noqa: E402

OUT = HERE / "out"
K = 10
VGG_SYNTH = dict(
    channels=[32, 64, 128, 128],
    convs_per_block=[1, 1, 2, 2],
    fc=[256, 256],
    pool_size=4,
    dropout=0.3,
)


def render(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``SyntheticParts(seed)`` in [0, 1] and their labels."""
    ds = SyntheticParts(n, size=size, seed=seed)
    xs, ys = [], []
    for start in range(0, n, 256):
        img, batch = ds.render_batch(range(start, min(n, start + 256)))
        xs.append(img)
        ys.append(batch.labels)
    return torch.cat(xs), torch.cat(ys).long()


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# --------------------------------------------------------------------------- part A


def part_a(quick: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model("vgg_small", num_classes=K, **VGG_SYNTH).eval()
    n = 200 if quick else 480
    reps = 1 if quick else 2
    epochs = 1
    kw = dict(epochs=epochs, batch_size=16, min_images=10)
    ds = Normalized(SyntheticParts(n, size=64, seed=0), SyntheticParts.mean, SyntheticParts.std)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    x, y = render(n, 0)
    x = normalise(x, SyntheticParts.mean, SyntheticParts.std)

    def one_pass(data):
        t = time.perf_counter()
        ClassPaths(**kw).fit(model, data)
        return (time.perf_counter() - t) / epochs

    def per_class_stream():
        t = time.perf_counter()
        for c in range(K):
            ClassPaths(classes=[c], **kw).fit(model, loader)
        return (time.perf_counter() - t) / epochs

    def per_class_presplit():
        t = time.perf_counter()
        for c in range(K):
            keep = y == c
            ClassPaths(classes=[c], **kw).fit(model, (x[keep], y[keep]))
        return (time.perf_counter() - t) / epochs

    def read_stream():
        t = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t

    times: dict[str, list[float]] = {
        k: [] for k in ("one_stream", "per_stream", "one_pre", "per_pre", "read")
    }
    ClassPaths(epochs=1, min_images=1).fit(model, (x[:40], y[:40]))  # warm-up
    for r in range(reps):
        pairs = [
            ("one_stream", lambda: one_pass(loader)),
            ("per_stream", per_class_stream),
            ("one_pre", lambda: one_pass((x, y))),
            ("per_pre", per_class_presplit),
            ("read", read_stream),
        ]
        if r % 2:
            pairs = pairs[::-1]
        for name, fn in pairs:
            times[name].append(fn())
            print(f"  rep {r}: {name:<10} {times[name][-1]:7.2f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"A. {n} images, 10 classes, batch 16, {reps} repetition(s), medians (s/epoch):")
    print(
        f"   stream  : one pass {med['one_stream']:.2f}  one class at a time "
        f"{med['per_stream']:.2f}  -> {med['per_stream'] / med['one_stream']:.1f}x"
    )
    print(
        f"   presplit: one pass {med['one_pre']:.2f}  one class at a time "
        f"{med['per_pre']:.2f}  -> {med['per_pre'] / med['one_pre']:.1f}x"
    )
    load, compute = med["read"], max(med["one_stream"] - med["read"], 1e-9)
    print(
        f"   reading the stream once takes {load:.2f} s/epoch, the masked passes "
        f"{compute:.2f} s: re-reading it per class accounts for "
        f"(K·read + compute)/(read + compute) = {(K * load + compute) / (load + compute):.1f}x, "
        "the rest is the per-step cost of small one-class batches; the ratio approaches K "
        "only when reading dominates (decoding, augmentation, a GPU for the network)"
    )
    return {
        "paths_one_pass_speedup_stream": med["per_stream"] / med["one_stream"],
        "paths_one_pass_speedup_presplit": med["per_pre"] / med["one_pre"],
        "paths_one_pass_epoch_seconds": med["one_stream"],
    }


# --------------------------------------------------------------------------- part B


def load_model(name: str, quick: bool, allow_train: bool):
    try:
        model, card = load_bundled(name)
        return model, card, "bundled"
    except AssetError as exc:
        print(f"# bundled {name} unavailable ({str(exc)[:80]}...)", flush=True)
    root = OUT / "models"
    try:
        model, card = load_bundled(name, root=root)
        return model, card, f"stand-in cached in {root} ({card.get('train_size')} images)"
    except AssetError:
        pass
    if not allow_train:
        return None, None, "missing"
    from xnn_toolkit.train import train

    root.mkdir(parents=True, exist_ok=True)
    n, epochs = (2000, 3) if quick else (4000, 4)
    print(f"# training a stand-in {name}: {n} images, {epochs} epochs", flush=True)
    train(
        name,
        out=root,
        train_size=n,
        test_size=500,
        epochs=epochs,
        threads=torch.get_num_threads(),
        verbose=True,
    )
    model, card = load_bundled(name, root=root)
    return model, card, f"stand-in trained now ({n} images, {epochs} epochs)"


def part_b(name: str, quick: bool, allow_train: bool) -> dict[str, float]:
    model, card, origin = load_model(name, quick, allow_train)
    if model is None:
        print(f"B. {name}: no trained model (bundled or cached); skipped")
        return {}
    model.eval()
    size = int(card["input_size"][-1])
    n_fit = 500 if quick else 800
    n_test = 300 if quick else 600
    x, y = render(n_fit, SyntheticParts.TRAIN_SEED, size)
    xt, yt = render(n_test, SyntheticParts.TEST_SEED, size)
    x = normalise(x, card["mean"], card["std"])
    xt = normalise(xt, card["mean"], card["std"])
    with torch.no_grad():
        acc = float(
            (torch.cat([model(xt[s : s + 256]) for s in range(0, n_test, 256)]).argmax(1) == yt)
            .float()
            .mean()
        )
    print(f"B. {name} ({origin}), test accuracy {acc:.3f}", flush=True)
    out: dict[str, float] = {}
    epochs = 2 if quick else 3
    t = time.perf_counter()
    cp = ClassPaths(objective="code", beta=1.0, epochs=epochs, batch_size=16).fit(model, (x, y))
    print(
        f"   fitted (objective=code, beta=1, Adam) {len(cp.layers_)} layers x {K} classes, "
        f"{epochs} epochs in "
        f"{time.perf_counter() - t:.1f} s; channels on the path per class:"
    )
    for n in cp.layers_:
        on = cp.paths_[n].float().sum(1).mean()
        print(f"     {n:<12} {float(on):6.1f} / {cp.paths_[n].shape[1]}")
    hr = cp.hit_rates(model, xt, yt, n_composites=40 if quick else 120, random_state=0)
    print("   hit rate on 2 x 2 composites (chance 0.25), mean ± std per layer:")
    for n, m, s in zip(hr.layers, hr.mean.tolist(), hr.std.tolist()):
        print(f"     {n:<12} {m:.3f} ± {s:.3f}")
    hb = cp.hit_rates(model, xt, yt, n_composites=40 if quick else 120, random_state=0, binary=True)
    print("   the same with binary paths (μ > 0.5 kept as 1, the rest 0):")
    print("     " + "  ".join(f"{n} {m:.3f}" for n, m in zip(hb.layers, hb.mean.tolist())))
    out[f"paths_hit_rate_last_{name}"] = float(hr.mean[-1])
    out[f"paths_hit_rate_best_{name}"] = float(hr.mean.max())
    out[f"paths_hit_rate_binary_last_{name}"] = float(hb.mean[-1])
    sim = cp.similarity()
    ds = SyntheticParts(1, size=size)
    one = {(a, b) for a, b, _ in ds.pairs_differing_in_one_part()}
    s_one = [float(sim[a, b]) for a, b in sorted(one)]
    s_other = [float(sim[a, b]) for a in range(K) for b in range(a + 1, K) if (a, b) not in one]
    print(
        f"   path similarity: {len(s_one)} one-part pairs {statistics.mean(s_one):.3f}, "
        f"{len(s_other)} other pairs {statistics.mean(s_other):.3f}"
    )
    out[f"paths_similarity_one_part_{name}"] = statistics.mean(s_one)
    out[f"paths_similarity_other_{name}"] = statistics.mean(s_other)
    mis = cp.misclassification(model, (xt, yt))
    print(
        f"   {len(mis.indices)} test errors; predicted class among the 3 most similar paths: "
        f"{mis.rate:.3f} (chance {mis.chance:.3f})"
    )
    out[f"paths_misclassified_in_similar_{name}"] = mis.rate
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, runs in seconds")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: the reference machine is shared)",
    )
    p.add_argument(
        "--no-train",
        action="store_true",
        help="skip part B when no trained model is bundled or cached",
    )
    p.add_argument("--skip-speed", action="store_true", help="skip part A")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), quick={args.quick}")
    results: dict[str, float] = {}
    if not args.skip_speed:
        results.update(part_a(args.quick))
    for name in ("vgg_synth", "resnet_synth"):
        results.update(part_b(name, args.quick, not args.no_train))
    for k, v in results.items():
        unit = "x" if "speedup" in k else ("s" if "seconds" in k else "ratio")
        print(f"RESULT {k} {v:.3f} {unit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
