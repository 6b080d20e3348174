"""Our Table 3.1 (Khorram 2020): XNN heads on fc6 of the bundled VGG, all classes (issue 4).

Fits SRAE, NN, SAE, CAE (:class:`~xnn_toolkit.heads.XNN`, the thesis's defaults: hidden
800, 100, n = 5, β = η = q = 1) and Lasso (:class:`~xnn_toolkit.heads.LassoXNN`, its α
sweep) one-vs-all on ``fc6`` of ``bundled:vgg_synth`` for every class of the synthetic part
data (docs/methods/xnn.rst), then scores them as in docs/methods/metrics.rst:

- F_reg and F_cls on the train and test banks (every image, every head);
- O₁ and O₂ of the c-MWP heatmaps of each head's x-features on the test images of its
  class, averaged over heads;
- Voronoi locality of those heatmaps, of every dimension of Z and of the 1-heatmap (c-MWP of
  the class logit), all read at the model's default layer (pool4, docs/methods/excitation.rst).

Locality is taken per class, as in the thesis (one XNN per category, the table averages the
categories): for class c the sources are the n x-features of head c (Z: every unit; 1-heatmap:
logit c) on the test images of class c; each source's entropy ``H`` of its mean part
histogram, averaged over sources and then over classes. A source without heatmap mass on
those images (a dead x-feature or unit) has no histogram and is left out of the mean; the
counts are printed. The row ``locality (pooled)`` is the report pipeline's convention (x-feature
i of every image's own head pooled over all test images) for comparison.

Heatmaps: the read layer is the input of the model's head (``avgpool``, ``fc6``, ``fc7``,
``classifier``), so c-MWP from any target down to it only runs through that head. The bench
therefore explains the head module on the read layer's stored activations and upsamples as
:func:`~xnn_toolkit.attribution.explain` does; it first checks on a few images that this
equals the library's full-model heatmaps (``xfeature_heatmaps``, ``class_heatmaps``, a
``Unit`` of Z) and stops if it does not.

    .venv/bin/python bench/xnn_table.py [--quick]

Prints the sample sizes, a Markdown table and ``RESULT`` lines.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

KINDS = ("srae", "nn", "sae", "lasso", "cae")  # the thesis's column order


def _render(n: int, seed: int) -> tuple[torch.Tensor, object]:
    from xnn_toolkit.data import SyntheticParts

    return SyntheticParts(n, seed=seed).render_batch(range(n))


def _head_of(model: nn.Module, read: str) -> nn.Sequential:
    """The model above ``read`` as a module with the model's own layer names.

    ``VGGSmall.forward_head``: avgpool, flatten, fc6, drop6, fc7, drop7, classifier (dropout
    is the identity in eval mode). Checked against the model by the caller.
    """
    names = ["avgpool", "flatten", "fc6", "drop6", "fc7", "drop7", "classifier"]
    last = [n for n, m in model.features.named_children() if isinstance(m, nn.MaxPool2d)][-1]
    if read != f"features.{last}" or not all(hasattr(model, n) for n in names):
        raise SystemExit(f"expected a VGGSmall read at its last pool, got {read!r}")
    return nn.Sequential(OrderedDict((n, getattr(model, n)) for n in names)).eval()


def _up(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``... x h x w`` to ``... x H x W``, bilinear, as the attribution engine upsamples."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size)


def _unit_maps(tail: nn.Module, acts: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """c-MWP at the read layer of Z units: ``M x u x h x w`` (every unit on every image)."""
    from xnn_toolkit.attribution import ContrastiveExcitationBackprop, Unit

    method = ContrastiveExcitationBackprop(tail, layer="input")
    m, u = acts.shape[0], len(units)
    rows = acts.repeat_interleave(u, 0)
    which = units.repeat(m)
    out = []
    for s in range(0, len(rows), 2048):
        att = method.attribute(rows[s : s + 2048], Unit("fc6", which[s : s + 2048]))
        out.append(att.heatmap.detach())
    return torch.cat(out).reshape(m, u, *acts.shape[-2:])


def _check_head(model, tail, x, acts, labels, head, read) -> float:
    """Max relative difference between full-model heatmaps and the head-only shortcut."""
    from xnn_toolkit.attribution import ContrastiveExcitationBackprop, Unit
    from xnn_toolkit.report.heatmaps import class_heatmaps, xfeature_heatmaps

    size = tuple(x.shape[-2:])
    pairs = [
        (
            xfeature_heatmaps(model, x, labels, head, "fc6", read),
            _up(xfeature_heatmaps(tail, acts, labels, head, "fc6", "input"), size),
        ),
        (
            class_heatmaps(model, x, labels, "cmwp", read),
            _up(class_heatmaps(tail, acts, labels, "cmwp", "input"), size),
        ),
        (
            ContrastiveExcitationBackprop(model, layer=read).attribute(x, Unit("fc6", 7)).heatmap,
            _up(_unit_maps(tail, acts, torch.tensor([7]))[:, 0], size),
        ),
    ]
    worst = 0.0
    for full, short in pairs:
        worst = max(worst, float((full - short).abs().max() / full.abs().max().clamp_min(1e-12)))
    return worst


def _per_class_locality(pp: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Mean over classes of the mean entropy of sources with heatmap mass on that class.

    ``pp``: ``M x S x B`` part probabilities (source s of image m's own class). Returns the
    locality, the number of (class, source) pairs scored and the number left out.
    """
    from xnn_toolkit.metrics import locality

    per_class, kept, dropped = [], 0, 0
    for c in labels.unique().tolist():
        sub = pp[labels == c]
        alive = sub.sum((0, 2)) > 0
        kept += int(alive.sum())
        dropped += int((~alive).sum())
        if alive.any():
            per_class.append(float(locality(sub[:, alive]).entropy.mean()))
    return sum(per_class) / len(per_class), kept, dropped


def _fmt(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few epochs")
    ap.add_argument("--n-train", type=int, default=1000, help="training images (all classes)")
    ap.add_argument("--n-test", type=int, default=1000, help="test images for faithfulness")
    ap.add_argument("--heat-images", type=int, default=300, help="test images with heatmaps")
    ap.add_argument("--n-positive", type=int, default=50, help="positives per head (thesis: 50)")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--q", type=float, default=1.0)
    ap.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        help="heads to fit (default all; srae is always fitted: it checks the heatmap shortcut)",
    )
    args = ap.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.heat_images = 400, 200, 60
        args.n_positive, args.max_epochs = 20, 3
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    from xnn_toolkit import default_read_layer, extract, load_model
    from xnn_toolkit.data import PartBatch, SyntheticParts
    from xnn_toolkit.heads import XNN, LassoXNN
    from xnn_toolkit.metrics import f_cls, f_reg, locality, orthogonality
    from xnn_toolkit.metrics import voronoi_part_probabilities as voronoi
    from xnn_toolkit.report.heatmaps import class_heatmaps, xfeature_heatmaps

    lm = load_model("bundled:vgg_synth")
    model = lm.model.eval()
    read = default_read_layer(model)
    tail = _head_of(model, read)
    raw_tr, parts_tr = _render(args.n_train, SyntheticParts.TRAIN_SEED)
    raw_te, parts_te = _render(args.n_test, SyntheticParts.TEST_SEED)
    x_tr, x_te = lm.preprocessing.normalize(raw_tr), lm.preprocessing.normalize(raw_te)
    bank_tr = extract(model, TensorDataset(x_tr, parts_tr.labels), ["fc6"], progress=False)
    bank_te = extract(model, TensorDataset(x_te, parts_te.labels), ["fc6", read], progress=False)
    acc = float((bank_te.logits.argmax(1) == bank_te.labels).float().mean())
    z_dim = bank_tr.shape("fc6")[-1]
    counts = torch.bincount(bank_tr.labels)
    n_neg = len(bank_tr) - int(counts.max())  # every image of the other classes
    m = min(args.heat_images, args.n_test)
    idx = torch.arange(m)  # labels are i % 10: the first m test images are balanced
    labels = bank_te.labels[idx]
    acts = bank_te.activations(read)[idx].float()
    with torch.no_grad():
        drift = float((tail(acts) - bank_te.logits[idx]).abs().max())
    if drift > 1e-3:
        raise SystemExit(f"the head module does not reproduce the model's logits ({drift:.2e})")
    print(
        f"model bundled:vgg_synth, test accuracy {100 * acc:.2f} % on {args.n_test} images; "
        f"XNN layer fc6 (dim Z = {z_dim}), heatmaps read at {read} "
        f"({'x'.join(map(str, bank_te.shape(read)[-2:]))} upsampled to 64 x 64)"
    )
    print(
        f"sizes: {args.n_train} train images ({int(counts.min())}-{int(counts.max())} per "
        f"class), {args.n_test} test images; per head {args.n_positive} positives and "
        f"{n_neg} negatives (10 % held out for early stopping), positives up-weighted; "
        f"heatmaps on {m} test images ({m // 10} per class); max_epochs {args.max_epochs}, "
        f"beta {args.beta}, eta {args.eta}, q {args.q}, seed {args.seed}",
        flush=True,
    )

    rows: dict[str, dict[str, object]] = {}
    heads = {}
    kinds = [k for k in KINDS if k in args.kinds or k == "srae"]
    for kind in kinds:
        t = time.perf_counter()
        if kind == "lasso":
            head = LassoXNN(
                n_features=5,
                n_positive=args.n_positive,
                n_negative=n_neg,
                random_state=args.seed,
                layer="fc6",
            )
        else:
            head = XNN(
                n_features=5,
                kind=kind,
                beta=args.beta,
                eta=args.eta,
                q=args.q,
                n_positive=args.n_positive,
                n_negative=n_neg,
                max_epochs=args.max_epochs,
                random_state=args.seed,
                layer="fc6",
            )
        head.fit(bank_tr)
        heads[kind] = head
        row: dict[str, object] = {}
        for split, bank in (("train", bank_tr), ("test", bank_te)):
            yb = head.predict(bank)
            row[f"F_reg {split}"] = float(f_reg(yb, bank.logits[:, head.classes_]).mean())
            kept = f_cls(yb, bank.logits, head.classes_, reduction="none")  # M x C
            row[f"F_cls {split} %"] = 100 * float(kept.float().mean())
            pos = bank.labels[:, None] == head.classes_[None, :]
            row[f"F_cls {split}, positives %"] = 100 * float(kept[pos].float().mean())
        epochs = (
            ""
            if kind == "lasso"
            else f", best epochs {head.best_epoch_.min()}-"
            f"{head.best_epoch_.max()} of {1 + max(h['epoch'] for h in head.history_)} run"
        )
        print(f"fitted {kind} in {time.perf_counter() - t:.1f} s{epochs}", flush=True)
        rows[kind] = row

    # Heatmaps: a few images through the full model first, to check the shortcut.
    k = min(8, m)
    worst = _check_head(model, tail, x_te[idx[:k]], acts[:k], labels[:k], heads["srae"], read)
    print(f"head-only c-MWP vs full model on {k} images: max relative difference {worst:.1e}")
    if worst > 1e-3:
        raise SystemExit("the head-only heatmaps differ from the library's full-model ones")
    t = time.perf_counter()
    size = tuple(x_te.shape[-2:])
    sub = PartBatch(
        labels=parts_te.labels[idx],
        keypoints=parts_te.keypoints[idx],
        visible=parts_te.visible[idx],
        bbox=parts_te.bbox[idx],
    )
    n_alive: dict[str, str] = {}
    for kind in kinds:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # dead x-features, counted below
            maps = _up(xfeature_heatmaps(tail, acts, labels, heads[kind], "fc6", "input"), size)
            o = [orthogonality(maps[labels == c]) for c in labels.unique()]
        row = rows[kind]
        row["O1"] = sum(v.o1 for v in o) / len(o)
        row["O2"] = sum(v.o2 for v in o) / len(o)
        pp = voronoi(maps, sub)
        row["locality"], kept, dropped = _per_class_locality(pp, labels)
        row["locality (pooled)"] = locality(pp).mean
        n_alive[kind] = f"{kept}/{kept + dropped}"
    one = _up(class_heatmaps(tail, acts, labels, "cmwp", "input"), size)
    pp1 = voronoi(one, sub)[:, None]
    rows["1-heatmap"] = {
        "locality": _per_class_locality(pp1, labels)[0],
        "locality (pooled)": locality(pp1).mean,
    }
    units = torch.arange(z_dim)
    z_small = _unit_maps(tail, acts, units)  # M x D x h x w
    pz = torch.cat(
        [voronoi(_up(z_small[:, s : s + 16], size), sub) for s in range(0, z_dim, 16)], 1
    )
    z_loc, z_kept, z_dropped = _per_class_locality(pz, labels)
    alive_any = pz.sum((0, 2)) > 0
    rows["Z"] = {"locality": z_loc, "locality (pooled)": locality(pz[:, alive_any]).mean}
    n_alive["Z"] = f"{z_kept}/{z_kept + z_dropped}"
    n_alive["1-heatmap"] = "10/10"
    print(f"heatmaps and metrics in {time.perf_counter() - t:.1f} s", flush=True)

    # --------------------------------------------------------------- the table
    cols = {
        "srae": "SRAE",
        "nn": "NN",
        "sae": "SAE",
        "lasso": "Lasso",
        "cae": "CAE",
        "Z": "Z",
        "1-heatmap": "1-Heatmap",
    }
    metrics = [
        "F_reg train",
        "F_reg test",
        "F_cls train %",
        "F_cls test %",
        "F_cls test, positives %",
        "O1",
        "O2",
        "locality",
        "locality (pooled)",
    ]
    print()
    print("| metric | " + " | ".join(cols.values()) + " |")
    print("|---|" + "---|" * len(cols))
    for met in metrics:
        cells = [_fmt(rows.get(key, {}).get(met)) for key in cols]
        print(f"| {met} | " + " | ".join(cells) + " |")
    print(
        "| sources with heatmap mass (class, source) | "
        + " | ".join(n_alive.get(key, "") for key in cols)
        + " |"
    )
    print()
    for key, name in cols.items():
        r = rows.get(key, {})
        for met, tag in (
            ("F_cls test %", "fcls_test"),
            ("F_reg test", "freg_test"),
            ("O1", "o1"),
            ("O2", "o2"),
            ("locality", "locality"),
        ):
            if met in r:
                print(f"RESULT xnn_table_{tag}_{name.lower()} {r[met]:.4g}")
    print(f"RESULT xnn_table_seconds {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
