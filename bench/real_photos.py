"""The real model on real photos: top-1 and the time to explain one photo per method.

``bundled:efficientnet_lite0`` (ImageNet weights from the ``imagenet`` extra) on
scikit-image's bundled photos, each resized and centre-cropped as the model's data config
says (224 px). Prints the top-3 of each photo against its ImageNet label, then for one photo
(``coffee``) the median time of each attribution method over ``--reps`` runs, in units of one
plain forward + backward of the same photo (alternating order). One thread by default.

Run ``.venv/bin/python bench/real_photos.py`` (under a minute). Ends with ``RESULT`` lines.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("cmwp", "mwp", "gradcam", "gradcam++", "saliency", "integrated_gradients")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from xnn_toolkit import load_model
    from xnn_toolkit.attribution import get_method
    from xnn_toolkit.data import SkimagePhotos

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    lm = load_model("bundled:efficientnet_lite0")
    net, names = lm.model, lm.class_names
    photos = SkimagePhotos.for_model(lm)
    x = lm.preprocessing.normalize(torch.stack([photos[i][0] for i in range(len(photos))]))
    with torch.no_grad():
        probs = net(x).softmax(1)
    top = probs.topk(3, dim=1)
    hits = 0
    for i, name in enumerate(photos.names):
        label = photos.labels[i]
        hits += int(top.indices[i, 0]) == label
        best = ", ".join(
            f"{names[int(c)]} {float(p):.1%}" for p, c in zip(top.values[i], top.indices[i])
        )
        print(f"{name:10} label {label} {names[label]!r:16} top-3: {best}")

    one = x[photos.names.index("coffee")][None]
    target = int(probs[photos.names.index("coffee")].argmax())

    def unit():
        xg = one.clone().requires_grad_(True)
        out = net(xg)
        out[0, target].backward()

    fns = {"unit": unit}
    for m in METHODS:
        method = get_method(m)(net)
        fns[m] = lambda method=method: method.attribute(one, target)
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(args.reps):
        for n in list(fns) if rep % 2 == 0 else list(reversed(fns)):
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(
        f"\none photo (coffee, 224 px), threads {torch.get_num_threads()}, "
        f"unit = forward + backward {med['unit'] * 1000:.1f} ms"
    )
    for n in METHODS:
        print(f"  {n:22} {med[n] * 1000:8.1f} ms  {med[n] / med['unit']:6.2f} x")
    print()
    print(f"RESULT photos_top1_hits {hits} of {len(photos)}")
    for n in METHODS:
        print(f"RESULT lite0_{n.replace('+', 'p')}_over_unit {med[n] / med['unit']:.2f} ratio")


if __name__ == "__main__":
    main()
