"""Benchmark: class-specific gates fitted post hoc on the synthetic-part residual network.

Run: ``.venv/bin/python bench/gates.py [--quick] [--finetune [--seeds N]] [--method gradmap]``.
No network; a few minutes on 2 idle cores (``--finetune`` adds about 6 minutes per seed,
``--method gradmap`` about 7 minutes per scored network: one backward pass per filter).

Model: the bundled ``resnet_synth`` (``xnn_toolkit.zoo.load_bundled``). When it is not bundled
yet, a stand-in is trained once with the same recipe on fewer images and epochs
(``xnn_toolkit.train.train``) into ``bench/out/models`` and reused by later runs; the output
says which model was used.

What is measured (docs/methods/gates.rst, Liang et al. 2020 App. A, G, H), on held-out images (seed
1):

- accuracy of the original network vs the STD path of the post-hoc CSG head (frozen recipe;
  with ``--finetune`` also the fine-tune recipe, on 1 000 images for 45 epochs by default
  (``--ft-epochs``) with two CSG epochs in three, since every epoch runs the network): the
  drop must stay within 1 point;
- the L1-density of the gates and its interval ``[1/C, g/(CK)]``;
- localization (ActivMap, IoU and AP50, object masks): class-specific filters on their
  gated class vs every filter of the same layer without gating (each on its best class),
  and CAM with the head's weights, ungated and gated;
- with ``--finetune``, the paper's own comparison (Liang et al. 2020 §5.1, App. H.1): every filter
of
  the layer, each on the class it localizes best (IoU and AP50 with ``c*`` by AP50, AP30 with
  ``c*`` by AP30; ties by the higher IoU), for the original network, the same fine-tuning
  *without* gating (``lambda1 = lambda2 = 0``: same blocks, schedule, seed and batches, so the
  control differs from the CSG fine-tune only in the gates) and the CSG fine-tune; ``--seeds N``
  repeats both fine-tunes with ``random_state`` 0 .. N-1 and counts the seeds where CSG wins;
- the mutual-information score (binned estimator; the original vs the fine-tuned network);
- timings on 500 images, alternating repetitions, medians: the CSG fit vs a plain linear
  probe on the same layer (same epochs and batches), and our binned MI vs scikit-learn's
  ``mutual_info_classif`` (the authors' estimator).

Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from xnn_toolkit.data.synthetic import SyntheticParts  # noqa: E402
from xnn_toolkit.errors import AssetError  # noqa: E402
from xnn_toolkit.heads.gates import ClassSpecificGates  # noqa: E402
from xnn_toolkit.hooks import record  # noqa: E402
from xnn_toolkit.metrics import gate_localization, mutual_information_score  # noqa: E402
from xnn_toolkit.metrics.localization import filter_localization  # noqa: E402
from xnn_toolkit.zoo import load_bundled  # noqa: E402

OUT = HERE / "out"
NAME = "resnet_synth"


def load_model(quick: bool) -> tuple[nn.Module, dict, str]:
    """The bundled model, else a cached or freshly trained stand-in."""
    try:
        model, card = load_bundled(NAME)
        return model, card, "bundled"
    except AssetError as exc:
        print(f"# bundled {NAME} unavailable ({str(exc)[:90]}...)", flush=True)
    root = OUT / "models"
    try:
        model, card = load_bundled(NAME, root=root)
        return model, card, f"stand-in (cached in {root}, {card.get('train_size')} images)"
    except AssetError:
        pass
    from xnn_toolkit.train import train

    root.mkdir(parents=True, exist_ok=True)
    n, epochs = (2000, 3) if quick else (4000, 4)
    print(f"# training a stand-in {NAME}: {n} images, {epochs} epochs", flush=True)
    train(NAME, out=root, train_size=n, test_size=500, epochs=epochs, threads=2, verbose=True)
    model, card = load_bundled(NAME, root=root)
    return model, card, f"stand-in (trained now, {n} images, {epochs} epochs)"


def render(n: int, seed: int, card: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` normalised images of ``SyntheticParts(seed)``, labels and object masks."""
    size = int(card["input_size"][-1])
    ds = SyntheticParts(n, size=size, seed=seed)
    xs, ys, ms = [], [], []
    for start in range(0, n, 256):
        img, batch = ds.render_batch(range(start, min(n, start + 256)))
        xs.append(img)
        ys.append(batch.labels)
        ms.append(batch.object_mask)
    mean = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(card["std"]).view(1, -1, 1, 1)
    return (torch.cat(xs) - mean) / std, torch.cat(ys), torch.cat(ms)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def linear_probe(model: nn.Module, layer: str, x, y, epochs: int, batch: int, seed: int) -> float:
    """The reference: pooled features of ``layer`` + Adam on a new linear head (seconds)."""
    t0 = time.perf_counter()
    with record(model, layer) as rec, torch.no_grad():
        feats = []
        for i in range(0, len(x), 256):
            model(x[i : i + 256])
            feats.append(rec.activations[layer].mean((2, 3)))
    f = torch.cat(feats)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(f.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(f), generator=gen)
        for i in range(0, len(f), batch):
            idx = order[i : i + batch]
            loss = F.cross_entropy(head(f[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def fit_seconds(model, x, y, **kw) -> tuple[float, ClassSpecificGates]:
    t0 = time.perf_counter()
    est = ClassSpecificGates(**kw).fit(model, (x, y))
    return time.perf_counter() - t0, est


def report_fit(
    tag: str, est, model_acc: float, x_te, y_te, m_te, n_loc: int, method: str = "activmap"
) -> dict:
    s = est.evaluate(x_te, y_te)
    lo, hi = s.density_bounds
    loc = gate_localization(est, None, x_te[:n_loc], m_te[:n_loc], y_te[:n_loc], method=method)
    n_spec = [len(f) for f in est.class_specific_filters_]
    print(
        f"## {tag}: layer {est.layer_}, finetune {est.finetune_}, K = {est.n_filters_}, "
        f"g = {est.g_:g}, head from model: {est.head_from_model_}"
    )
    print(
        f"   accuracy: model {100 * model_acc:.2f} %, STD {100 * s.std_accuracy:.2f} %, "
        f"CSG (true-class gates) {100 * s.csg_accuracy:.2f} %"
    )
    print(
        f"   density {s.density:.6f} in [{lo:.4f}, {hi:.4f}]: {lo <= s.density <= hi + 1e-9}; "
        f"class-specific filters per class {n_spec}"
    )
    diag_tp = torch.nanmean(torch.diagonal(s.s_tp)).item()
    off = s.s_tp[~torch.eye(est.n_classes_, dtype=torch.bool)]
    print(f"   S_TP diagonal mean {diag_tp:.3f}, off-diagonal mean {torch.nanmean(off).item():.3f}")
    print(
        f"   localization ({method}, {loc.n_specific} class-specific filters, "
        f"{len(y_te[:n_loc])} images): "
        f"IoU {loc.specific_iou:.4f} vs all filters {loc.all_iou:.4f}; AP50 "
        f"{loc.specific_ap:.4f} vs {loc.all_ap:.4f}"
    )
    # AP at IoU >= 0.3, the threshold of the authors' ActivMap / CAM code
    y_loc = y_te[:n_loc]
    spec = torch.nonzero(loc.specific_class >= 0).reshape(-1)
    hits = (loc.ious >= 0.3).double()
    ap30_spec = (
        float(torch.stack([hits[y_loc == loc.specific_class[k], k].mean() for k in spec]).mean())
        if len(spec)
        else float("nan")
    )
    ap30_all = filter_localization(loc.ious, y_loc, est.n_classes_, 0.3).ap
    same = float(loc.filters.iou_per_filter[spec].mean()) if len(spec) else float("nan")
    print(
        f"   every filter on every image (no class): IoU {loc.pooled_iou:.4f}, AP50 "
        f"{loc.pooled_ap:.4f}, AP30 {float((loc.ious >= 0.3).double().mean()):.4f}"
    )
    print(
        f"   AP30 {ap30_spec:.4f} vs {ap30_all:.4f}; the class-specific filters on their own "
        f"best class (ungated protocol): IoU {same:.4f}"
    )
    # a baseline without the max over classes: for each class-specific filter k of class
    # c, every filter of the layer on the same images (those of class c)
    same_cls = {"iou": [], "ap50": [], "ap30": [], "area": [], "spec_area": []}
    for k in spec.tolist():
        own = y_loc == loc.specific_class[k]
        rows = loc.ious[own]
        same_cls["area"].append(float(loc.areas[own].mean()))
        same_cls["spec_area"].append(float(loc.areas[own, k].mean()))
        same_cls["iou"].append(float(rows.mean()))
        same_cls["ap50"].append(float((rows >= 0.5).double().mean()))
        same_cls["ap30"].append(float((rows >= 0.3).double().mean()))
    same_cls = {k: statistics.mean(v) if v else float("nan") for k, v in same_cls.items()}
    print(
        f"   every filter on the images of each class-specific filter's class (no max over "
        f"classes): IoU {same_cls['iou']:.4f}, AP50 {same_cls['ap50']:.4f}, AP30 "
        f"{same_cls['ap30']:.4f}"
    )
    obj = float(m_te[:n_loc].float().mean())
    print(
        f"   segment area (share of the image): class-specific filters on their class "
        f"{same_cls['spec_area']:.3f}, every filter on the same images {same_cls['area']:.3f}; "
        f"object masks {obj:.3f}"
    )
    print(
        f"   CAM IoU {loc.cam.iou:.4f} (AP50 {loc.cam.ap:.4f}); gated CAM IoU "
        f"{loc.cam_gated.iou:.4f} (AP50 {loc.cam_gated.ap:.4f})"
    )
    print(f"   mutual-information score {s.mutual_information:.4f} nats", flush=True)
    return dict(s=s, loc=loc, ap30_spec=ap30_spec, ap30_all=ap30_all, same_cls=same_cls)


def h1_scores(loc, labels: torch.Tensor, n_classes: int) -> dict:
    """App. H.1 over all filters: IoU and AP50 (``c*`` by AP50), AP30 (``c*`` by AP30)."""
    ap30 = filter_localization(loc.ious, labels, n_classes, 0.3).ap
    return {"iou": loc.all_iou, "ap50": loc.all_ap, "ap30": ap30}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, runs in seconds")
    ap.add_argument("--reps", type=int, default=None, help="timing repetitions")
    ap.add_argument(
        "--finetune",
        action="store_true",
        help="also fit the fine-tune recipe (slow: it runs the network every epoch)",
    )
    ap.add_argument(
        "--layer", default=None, help="gated layer (default: the estimator's, the last conv stage)"
    )
    ap.add_argument(
        "--method",
        choices=("activmap", "gradmap"),
        default="activmap",
        help="filter maps for localization (Liang et al. 2020 App. G; default activmap)",
    )
    ap.add_argument(
        "--ft-epochs", type=int, default=45, help="epochs of the fine-tune recipe (default 45)"
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="with --finetune: fit the gated and the ungated fine-tune this many "
        "times (random_state 0, 1, ...; default 1)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    quick = args.quick
    n_fit, n_test, n_loc, n_time = (300, 200, 100, 150) if quick else (2000, 1000, 500, 500)
    epochs = 9 if quick else 60
    reps = args.reps or (1 if quick else 3)
    OUT.mkdir(parents=True, exist_ok=True)

    model, card, source = load_model(quick)
    print(f"# model: {NAME} ({source}); card test accuracy {card.get('test_accuracy')}")
    x_fit, y_fit, _ = render(n_fit, SyntheticParts.TRAIN_SEED, card)
    x_te, y_te, m_te = render(n_test, SyntheticParts.TEST_SEED, card)
    model_acc = accuracy(model, x_te, y_te)
    kw = dict(epochs=epochs, batch_size=64, random_state=0)
    if args.layer:
        kw["layer"] = args.layer

    t_frozen, est = fit_seconds(model, x_fit, y_fit, **kw)
    frozen = report_fit("frozen recipe", est, model_acc, x_te, y_te, m_te, n_loc, args.method)
    results = {"": (est, frozen)}
    h1_rows: dict[str, list[dict]] = {}
    wins: dict[str, int] = {}  # seeds where the CSG fine-tune beats the ungated one
    if args.finetune:
        # every epoch of the fine-tune recipe runs the network: fewer images and epochs,
        # two CSG epochs in three (the paper's fine-tuning setting) to keep the gate steps
        n_ft = 300 if quick else 1000
        kw_ft = dict(kw, epochs=args.ft_epochs, warmup=0, csg_ratio=2, lr_gates=2e-2)
        h1_rows["model"] = [h1_scores(frozen["loc"], y_te[:n_loc], est.n_classes_)]
        for seed in range(args.seeds):
            kw_s = dict(kw_ft, random_state=seed, recipe="finetune")
            t_ft, est_ft = fit_seconds(model, x_fit[:n_ft], y_fit[:n_ft], **kw_s)
            tag = "fine-tune recipe" + (f", seed {seed}" if args.seeds > 1 else "")
            r_ft = report_fit(tag, est_ft, model_acc, x_te, y_te, m_te, n_loc, args.method)
            if seed == 0:
                results["ft_"] = (est_ft, r_ft)
            print(f"   fine-tune fit {t_ft:.1f} s")
            # the control: the same fine-tuning (blocks, schedule, seed, batches) without
            # gating: lambda1 = lambda2 = 0 leave CE(STD) alone in every epoch
            t_pl, est_pl = fit_seconds(
                model, x_fit[:n_ft], y_fit[:n_ft], lambda1=0.0, lambda2=0.0, **kw_s
            )
            loc_pl = gate_localization(
                est_pl, None, x_te[:n_loc], m_te[:n_loc], y_te[:n_loc], method=args.method
            )
            acc_pl = est_pl.evaluate(x_te, y_te).std_accuracy
            print(
                f"## the same fine-tuning without gating (seed {seed}): fit {t_pl:.1f} s, "
                f"accuracy {100 * acc_pl:.2f} %"
            )
            h1_rows.setdefault("ft", []).append(
                h1_scores(r_ft["loc"], y_te[:n_loc], est.n_classes_)
            )
            h1_rows.setdefault("plain", []).append(h1_scores(loc_pl, y_te[:n_loc], est.n_classes_))
        print(
            f"## App. H.1 over all K filters of {est.layer_} ({args.method}; each filter on "
            f"the class it localizes best), the paper's CSG-vs-STD comparison:"
        )
        for name, label in (
            ("model", "original network"),
            ("plain", "fine-tuned, no gates"),
            ("ft", "fine-tuned with CSG"),
        ):
            for i, row in enumerate(h1_rows[name]):
                print(
                    f"   {label:22s} {'' if name == 'model' else f'seed {i}'}: IoU "
                    f"{row['iou']:.4f}, AP50 {row['ap50']:.4f}, AP30 {row['ap30']:.4f}"
                )
        for key in ("iou", "ap50", "ap30"):
            wins[key] = sum(a[key] > b[key] for a, b in zip(h1_rows["ft"], h1_rows["plain"]))
            print(f"   CSG > no gates in {key}: {wins[key]} of {args.seeds} seeds")

    # figures
    from xnn_toolkit.viz import class_filter_gallery, gate_matrix_figure, save_figure

    save_figure(
        gate_matrix_figure(
            est.gates_, class_names=card.get("class_names"), title="post-hoc CSG, frozen recipe"
        ),
        OUT / "gates_matrix",
    )
    display = x_te * torch.tensor(card["std"]).view(1, -1, 1, 1)
    display = display + torch.tensor(card["mean"]).view(1, -1, 1, 1)
    save_figure(
        class_filter_gallery(est, x_te[:100], y_te[:100], 0, display=display[:100]),
        OUT / "gates_gallery_class0",
    )

    # timings on n_time images: CSG fit vs a plain linear probe (same layer, epochs,
    # batches), alternating
    t_csg, t_probe = [], []
    xt, yt = x_fit[:n_time], y_fit[:n_time]
    for _ in range(reps):
        t_csg.append(fit_seconds(model, xt, yt, **kw)[0])
        t_probe.append(linear_probe(model, est.layer_, xt, yt, epochs, 64, 0))
    feats = est.transform(x_te)
    f_time, y_time = feats[:n_time], y_te[:n_time]
    t_bin, t_knn = [], []
    from sklearn.feature_selection import mutual_info_classif

    for _ in range(reps):
        t0 = time.perf_counter()
        _ovr_mi(f_time, y_time, est.n_classes_)
        t_bin.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fx, yx = f_time.double().numpy(), y_time.numpy()
        knn = [mutual_info_classif(fx, yx == c, random_state=0) for c in range(est.n_classes_)]
        t_knn.append(time.perf_counter() - t0)
    mis_knn = float(np.stack(knn, 1).max(1).mean())
    med = statistics.median
    print(
        f"# timings (median of {reps}, {n_time} images): CSG fit {med(t_csg):.2f} s, "
        f"linear probe "
        f"{med(t_probe):.2f} s; binned MI {med(t_bin) * 1e3:.1f} ms, sklearn kNN MI "
        f"{med(t_knn) * 1e3:.0f} ms (kNN MIS {mis_knn:.4f})"
    )

    print(f"RESULT gates_model_accuracy {100 * model_acc:.2f} %")
    for prefix, (_est, r) in results.items():
        s, loc = r["s"], r["loc"]
        lo, hi = s.density_bounds
        p = f"gates_{prefix}"
        print(f"RESULT {p}std_accuracy {100 * s.std_accuracy:.2f} %")
        print(f"RESULT {p}std_accuracy_drop {100 * (model_acc - s.std_accuracy):.2f} points")
        print(f"RESULT {p}csg_accuracy {100 * s.csg_accuracy:.2f} %")
        print(f"RESULT {p}density {s.density:.6f} ratio")
        print(f"RESULT {p}density_upper_bound {hi:.4f} ratio")
        print(f"RESULT {p}density_in_bounds {int(lo <= s.density <= hi + 1e-9)} bool")
        print(f"RESULT {p}specific_filters {loc.n_specific} count")
        print(f"RESULT {p}specific_filter_iou {loc.specific_iou:.4f} iou")
        print(f"RESULT {p}all_filter_iou {loc.all_iou:.4f} iou")
        print(f"RESULT {p}specific_filter_ap50 {loc.specific_ap:.4f} ap")
        print(f"RESULT {p}all_filter_ap50 {loc.all_ap:.4f} ap")
        print(f"RESULT {p}pooled_filter_iou {loc.pooled_iou:.4f} iou")
        print(f"RESULT {p}pooled_filter_ap50 {loc.pooled_ap:.4f} ap")
        print(f"RESULT {p}specific_filter_ap30 {r['ap30_spec']:.4f} ap")
        print(f"RESULT {p}all_filter_ap30 {r['ap30_all']:.4f} ap")
        for key, unit in (
            ("iou", "iou"),
            ("ap50", "ap"),
            ("ap30", "ap"),
            ("area", "ratio"),
            ("spec_area", "ratio"),
        ):
            print(f"RESULT {p}same_class_filter_{key} {r['same_cls'][key]:.4f} {unit}")
        print(f"RESULT {p}cam_iou {loc.cam.iou:.4f} iou")
        print(f"RESULT {p}cam_gated_iou {loc.cam_gated.iou:.4f} iou")
        print(f"RESULT {p}mis {s.mutual_information:.4f} nats")
    for name, rows in h1_rows.items():
        for key in ("iou", "ap50", "ap30"):
            mean = statistics.mean(r[key] for r in rows)
            print(f"RESULT gates_h1_{name}_{key} {mean:.4f} {'iou' if key == 'iou' else 'ap'}")
    for key, n_wins in wins.items():
        print(f"RESULT gates_h1_csg_beats_no_gates_{key} {n_wins}/{args.seeds} seeds")
    mis = mutual_information_score(feats, y_te, est.n_classes_).mean
    print(f"RESULT gates_mis_model {mis:.4f} nats")
    print(f"RESULT gates_fit_seconds_{n_time} {med(t_csg):.2f} s")
    print(f"RESULT gates_fit_over_linear_probe {med(t_csg) / med(t_probe):.2f} ratio")
    print(f"RESULT gates_mi_binned_speedup_over_sklearn {med(t_knn) / med(t_bin):.1f} ratio")
    return 0


def _ovr_mi(features, labels, num_classes, **kw):
    """``K x C`` one-vs-rest mutual information (the metrics module's per-class table)."""
    return mutual_information_score(features, labels, num_classes, **kw).per_class.cpu()


if __name__ == "__main__":
    raise SystemExit(main())
