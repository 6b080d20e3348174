"""The stages of ``xnn explain`` (:func:`xnn_toolkit.report.run_explain`), one per section.

Each stage takes the report and the run's state (:class:`~xnn_toolkit.report.pipeline._Run`,
with the typed artifacts of the stages before it) and adds its section: the model and its
photos, the activation bank, XNN heads, heatmaps and their metrics, localization, NMF concepts,
class paths, class-specific gates. :data:`STAGES` lists them in order.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .document import Card, Paragraph, Report, Table, progress_bar

if TYPE_CHECKING:
    from .pipeline import _Run

#: XNN variants the report compares (:doc:`/methods/xnn`), in the order of the thesis's Table 3.1.
XNN_KINDS = ("srae", "nn", "sae", "lasso", "cae")

__all__: list[str] = []


def _model_section(report: Report, run: _Run) -> None:
    from ..viz.heatmaps import annotated_samples

    pred = _logits(run.model, run.x_test).argmax(1)
    acc = float((pred == run.y_test).float().mean())
    card = dict(getattr(run.loaded, "card", None) or {})
    items = {
        "model": run.spec,
        "dataset": run.cfg.dataset,
        "classes": len(run.class_names),
        "measured test accuracy": f"{100 * acc:.2f} % on {len(run.y_test)} images",
        "XNN layer": run.fc_layer,
        "heatmap / NMF layer": run.conv_layer,
        "parameters": sum(p.numel() for p in run.model.parameters()),
    }
    for key in ("arch", "dataset", "train_command", "seed", "epochs", "test_accuracy"):
        if key in card:
            items[f"card: {key}"] = card[key]
    s = report.section("Model")
    s.add(Card(items))
    rows = []
    for c, name in enumerate(run.class_names):
        sel = run.y_test == c
        if int(sel.sum()) == 0:
            continue
        rows.append(
            {
                "class": name,
                "test images": int(sel.sum()),
                "accuracy %": 100 * float((pred[sel] == c).float().mean()),
                "predicted as": int((pred == c).sum()),
            }
        )
    s.add(Table("class_accuracy", rows, caption="Per-class accuracy on the test images"))
    n = min(16, len(run.raw_test))
    p = run.parts
    titles = [run.class_names[int(c)] for c in run.y_test[:n]]
    fig = annotated_samples(
        run.raw_test[:n],
        None if p is None else p.keypoints[:n],
        None if p is None else p.visible[:n],
        None if p is None else p.bbox[:n],
        titles=titles,
        part_names=None if p is None else getattr(p, "part_names", None),
    )
    s.add(run.figure("samples", fig, "Test samples with their part keypoints and boxes"))


def _bank_section(report: Report, run: _Run) -> None:
    from torch.utils.data import TensorDataset

    from ..bank import extract

    layers = list(dict.fromkeys([run.fc_layer, run.conv_layer]))
    kw = dict(progress=run.cfg.progress, device=run.cfg.device)
    for split, x, y in (("train", run.x_train, run.y_train), ("test", run.x_test, run.y_test)):
        setattr(run.made, f"bank_{split}", extract(run.model, TensorDataset(x, y), layers, **kw))
    bank = run.made.bank_test
    s = report.section("Activations")
    s.add(
        Paragraph(
            f"Activations of {', '.join(layers)} for {len(run.x_train)} training and "
            f"{len(run.x_test)} test images, extracted with forward hooks (the model is left "
            "unchanged)." + run.made.train_note
        )
    )
    s.add(
        Table(
            "activations",
            [
                {"layer": name, "shape": "x".join(str(v) for v in bank.shape(name))}
                for name in layers
            ],
        )
    )


def _xnn_section(report: Report, run: _Run) -> None:
    from ..metrics import f_cls, f_reg

    cfg = run.cfg
    tr, te = run.made.bank_train, run.made.bank_test
    rows = []
    kinds = [k for k in XNN_KINDS if k in cfg.kinds]
    n_pos = n_neg = 0
    for kind in progress_bar(kinds, desc="XNN heads", disable=not cfg.progress, leave=False):
        head, n_pos, n_neg = _fit_xnn(
            kind,
            tr,
            run.fc_layer,
            n_features=cfg.n_features,
            hidden=tuple(cfg.hidden),
            epochs=cfg.xnn_epochs,
            seed=cfg.seed,
            device=cfg.device,
        )
        run.made.xnn_heads[kind] = head
        row = {"method": kind.upper()}
        for split, bank in (("train", tr), ("test", te)):
            yb = head.predict(bank)
            cls = head.classes_
            row[f"F_reg {split}"] = float(f_reg(yb, bank.logits[:, cls]).mean())
            row[f"F_cls {split} %"] = 100 * float(f_cls(yb, bank.logits, cls).mean())
        rows.append(row)
    run.made.xnn_rows = rows
    s = report.section("XNN explanation heads")
    s.add(
        Paragraph(
            f"One-vs-all heads with n = {cfg.n_features} x-features on {run.fc_layer}, all classes "
            f"trained together ({n_pos} positives and {n_neg} negatives per class, positives "
            "up-weighted). Faithfulness as in the thesis (docs: methods/metrics): "
            "F_reg = mean |ȳ − ŷ|, "
            "F_cls = share of predictions unchanged when ŷ_c is replaced by ȳ_c."
        )
    )
    s.add(Table("xnn_faithfulness", rows))


def _z_heatmaps(run: _Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c-MWP heatmaps of the ``z_units`` most active dimensions of Z: M x u x H x W."""
    from ..attribution import ContrastiveExcitationBackprop, Unit

    z = run.made.bank_test.activations(run.fc_layer)[idx].flatten(1)
    units = z.mean(0).argsort(descending=True)[: run.cfg.z_units]
    method = ContrastiveExcitationBackprop(run.model, layer=run.conv_layer)
    h, w = run.x_test.shape[-2:]
    out = torch.zeros(len(idx), len(units), h, w)
    for j, u in enumerate(units.tolist()):
        for s in range(0, len(idx), 64):
            r = idx[s : s + 64]
            att = method.attribute(run.x_test[r], Unit(run.fc_layer, int(u)))
            out[s : s + len(r), j] = att.heatmap.detach().float().cpu()
    return out, units


def _orthogonality_per_class(maps: torch.Tensor, labels: torch.Tensor):
    """O1 / O2 of each class's heatmaps and the number of constant x-features over classes.

    The metric warns about constant (dead) x-features; the report states their count instead
    of printing one warning per class.
    """
    from ..metrics import orthogonality

    scores, constant = [], 0
    for c in labels.unique():
        sel = maps[labels == c]
        if len(sel) < 2:
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*zero variance", category=RuntimeWarning)
            scores.append(orthogonality(sel))
        constant += scores[-1].n_constant
    return scores, constant


def _heatmap_section(report: Report, run: _Run) -> None:
    from ..metrics import locality, voronoi_part_probabilities
    from ..viz.heatmaps import xnn_figure
    from .heatmaps import class_heatmaps, xfeature_heatmaps

    cfg = run.cfg
    m = min(cfg.heatmap_images, len(run.x_test))
    idx = torch.arange(m)
    labels = run.y_test[idx]
    bar = progress_bar(
        total=len(run.made.xnn_heads) + 2, desc="heatmaps", disable=not cfg.progress, leave=False
    )
    one_maps = class_heatmaps(run.model, run.x_test[idx], labels, "cmwp", run.conv_layer)
    bar.update()
    sub = _sub_parts(run.parts, idx) if run.parts is not None else None
    rows: dict[str, dict[str, Any]] = {r["method"]: dict(r) for r in run.made.xnn_rows}
    maps_by_kind = {}
    dead_notes: list[str] = []
    for kind, head in run.made.xnn_heads.items():
        maps = xfeature_heatmaps(
            run.model, run.x_test[idx], labels, head, run.fc_layer, run.conv_layer
        )
        maps_by_kind[kind] = maps
        o, constant = _orthogonality_per_class(maps, labels)
        if constant:
            dead_notes.append(f"{kind.upper()} {constant}")
        row = rows[kind.upper()]
        if o:
            row["O1"] = sum(float(v.o1) for v in o) / len(o)
            row["O2"] = sum(float(v.o2) for v in o) / len(o)
        if sub is not None:
            row["locality"] = float(locality(voronoi_part_probabilities(maps, sub)).mean)
        bar.update()
    z_note = ""
    if sub is not None:
        if cfg.z_units > 0:
            z_maps, units = _z_heatmaps(run, idx)
            rows["Z"] = {
                "method": "Z",
                "locality": float(locality(voronoi_part_probabilities(z_maps, sub)).mean),
            }
            z_note = (
                f" Z: the {len(units)} most active of the "
                f"{run.made.bank_test.shape(run.fc_layer)[-1]} units of {run.fc_layer}."
            )
        rows["1-heatmap"] = {
            "method": "1-heatmap",
            "locality": float(locality(voronoi_part_probabilities(one_maps[:, None], sub)).mean),
        }
    bar.update()
    bar.close()
    metrics = ["F_reg train", "F_reg test", "F_cls train %", "F_cls test %", "O1", "O2", "locality"]
    table = [{"metric": k, **{name: r[k] for name, r in rows.items() if k in r}} for k in metrics]
    table = [t for t in table if len(t) > 1]
    s = report.section("x-feature heatmaps")
    s.add(
        Paragraph(
            f"Contrastive Excitation Backprop (c-MWP) of every x-feature, "
            f"read at {run.conv_layer}, "
            f"on {m} test images (each image explained by its own class's head); the 1-heatmap "
            "is the c-MWP of the class logit. Orthogonality O1 = ||P||_F − √n and O2 = −log det "
            "P over the heatmaps of each head, averaged over heads (0 is best); Voronoi locality "
            "= entropy of the part histogram (lower is more local; docs: methods/metrics)."
            + z_note
            + ("" if sub is not None else " The data has no part keypoints: no locality.")
            + (
                ""
                if not dead_notes
                else " x-features whose heatmaps are constant (all zero) on their class's "
                "images count "
                "as uncorrelated in O1 / O2; their number over heads: "
                + ", ".join(dead_notes)
                + "."
            )
        )
    )
    s.add(
        Table(
            "table_3_1",
            table,
            columns=["metric", *rows],
            caption="XNN metrics per method, in the manner of the thesis's Table 3.1",
        )
    )
    pick = torch.stack([(labels == c).nonzero().flatten()[0] for c in labels.unique()])
    for kind, head in run.made.xnn_heads.items():
        contrib = head.contributions(run.made.bank_test)[idx[pick]]
        cls_pos = torch.stack([(head.classes_ == labels[i]).nonzero().flatten()[0] for i in pick])
        contrib = contrib[torch.arange(len(pick)), cls_pos]
        fig = xnn_figure(
            run.raw_test[idx[pick]],
            one_maps[pick],
            maps_by_kind[kind][pick],
            contrib,
            labels=[run.class_names[int(labels[i])] for i in pick],
        )
        s.add(
            run.figure(
                f"xnn_explanations_{kind}",
                fig,
                f"{kind.upper()}: one test image per class; the image, its 1-heatmap, then the "
                "x-features sorted by their contribution v_i E_i (written above each heatmap)",
            )
        )


def _sub_parts(parts: object, idx: torch.Tensor) -> object:
    from ..data import PartBatch

    return PartBatch(
        labels=parts.labels[idx],
        keypoints=parts.keypoints[idx],
        visible=parts.visible[idx],
        bbox=parts.bbox[idx],
        part_mask=None if parts.part_mask is None else parts.part_mask[idx],
        object_mask=None if parts.object_mask is None else parts.object_mask[idx],
    )


def _localization_section(report: Report, run: _Run) -> None:
    from ..metrics import class_localization, energy_pointing_game, iou, pointing_game, top_pixels
    from ..viz.heatmaps import heatmap_grid
    from .heatmaps import class_heatmaps, class_method

    s = report.section("Heatmap methods on class logits")
    if run.parts is None or run.parts.object_mask is None:
        s.add(Paragraph("The data has no object masks: no localization scores."))
        return
    m = min(run.cfg.heatmap_images, len(run.x_test))
    masks = run.parts.object_mask[:m].bool()
    labels = run.y_test[:m]
    h, w = masks.shape[-2:]
    tol = 15 * min(h, w) / 224
    rows, shown = [], []
    for method in run.cfg.methods:
        name = class_method(method)
        t = time.perf_counter()
        maps = class_heatmaps(run.model, run.x_test[:m], labels, name, run.conv_layer)
        seconds = time.perf_counter() - t
        loc = class_localization(iou(top_pixels(maps, 0.3), masks), labels, len(run.class_names))
        rows.append(
            {
                "method": name,
                f"pointing game % (tolerance {tol:.1f} px)": 100
                * float(pointing_game(maps, masks, tolerance=tol).float().mean()),
                "pointing game % (15 px)": 100 * float(pointing_game(maps, masks).float().mean()),
                "energy pointing %": 100 * float(energy_pointing_game(maps, masks).mean()),
                "IoU top 30 %": float(loc.iou),
                "AP50 %": 100 * float(loc.ap),
                "ms / image": round(1000 * seconds / m, 2),
            }
        )
        shown.append(maps[:8])
    area = 100 * float(masks.float().mean())
    s.add(
        Paragraph(
            f"Heatmaps of the true class's logit on {m} test images, scored against the object "
            f"mask (it covers {area:.1f} % of the pixels: the energy pointing game's chance "
            f"level). Pointing game: the maximum within the tolerance of the mask (15 px at 224 "
            f"px, i.e. {tol:.1f} px here, and the literal 15 px); IoU and AP50 of the top 30 % "
            "of pixels (Liang et al. 2020 App. H)."
        )
    )
    s.add(Table("localization", rows))
    n = min(8, m)
    grid = torch.stack([mp[:n] for mp in shown], 1)
    fig = heatmap_grid(
        run.raw_test[:n],
        grid,
        col_labels=["image", *[r["method"] for r in rows]],
        row_labels=[run.class_names[int(c)] for c in labels[:n]],
    )
    s.add(run.figure("methods", fig, "The class logit's heatmap by each method"))


def _nmf_section(report: Report, run: _Run) -> None:
    from ..heads.nmf import NMFConcepts
    from ..heads.nmf_tools import concept_maps
    from ..heads.nmf_tools import top_images as concept_top_images
    from ..metrics.concepts import concept_importance, nmf_faithfulness
    from ..viz.concepts import concept_gallery
    from ..viz.heatmaps import overlay_grid

    cfg = run.cfg
    acts = run.made.bank_train.activations(run.conv_layer)
    s = report.section("NMF concepts")
    if acts.dim() != 4:
        s.add(Paragraph(f"{run.conv_layer} is not a conv layer: no NMF concepts."))
        return
    if bool((acts < 0).any()):
        s.add(Paragraph(f"{run.conv_layer} has negative activations: NMF needs a ReLU layer."))
        return
    nmf = NMFConcepts(rank=cfg.nmf_rank, random_state=cfg.seed, device=cfg.device).fit(acts)
    test_acts = run.made.bank_test.activations(run.conv_layer)
    scores = nmf.transform(test_acts)
    faith = nmf_faithfulness(run.model, run.x_test, nmf, layer=run.conv_layer)
    s.add(
        Paragraph(
            f"Non-negative factorisation of {run.conv_layer} (rank {cfg.nmf_rank}, HALS) on the "
            "training activations; test activations projected with the basis fixed. "
            "Faithfulness: the layer's activation replaced by its reconstruction M·S inside the "
            "network. Importance: the drop of a class's logit when the concept is removed from "
            "the reconstruction, on the test images of that class."
        )
    )
    s.add(
        Table(
            "nmf_faithfulness",
            [
                {
                    "rank": cfg.nmf_rank,
                    "relative reconstruction error (train)": float(nmf.relative_err_),
                    "prediction agreement %": 100 * faith.agreement,
                    "logit MAE": faith.logit_mae,
                    "activation relative error (test)": faith.activation_rel_err,
                }
            ],
        )
    )
    imp = concept_importance(run.model, run.x_test, nmf, layer=run.conv_layer, y=run.y_test)
    imp = torch.nan_to_num(imp[:, : len(run.class_names)], nan=float("-inf"))
    rows = []
    for k in range(imp.shape[0]):
        best = int(imp[k].argmax())
        finite = imp[k][torch.isfinite(imp[k])]
        rows.append(
            {
                "concept": k,
                "most important for": run.class_names[best],
                "logit drop": float(imp[k, best]),
                "mean drop over classes": float(finite.mean()) if finite.numel() else float("nan"),
            }
        )
    s.add(Table("nmf_importance", rows))
    n = min(8, len(run.raw_test))
    fig = concept_gallery(
        run.raw_test[:n], scores[:n], ncols=4, title=f"NMF concepts of {run.conv_layer}"
    )
    s.add(run.figure("nmf_concepts", fig, "Each concept a colour over the image"))
    k_img = min(6, len(run.raw_test))
    _, top = concept_top_images(scores, k_img)
    maps = concept_maps(scores, tuple(run.raw_test.shape[-2:]), normalize=True)
    r = scores.shape[1]
    grid_images = run.raw_test[top]  # r x k x C x H x W
    grid_maps = torch.stack([maps[top[c], c] for c in range(r)])  # r x k x H x W
    fig = overlay_grid(
        grid_images,
        grid_maps,
        row_labels=[f"concept {c}" for c in range(r)],
        titles=[[run.class_names[int(run.y_test[i])] for i in t] for t in top],
        shared_scale=True,
    )
    s.add(
        run.figure(
            "nmf_top_images", fig, "Each concept's map on the test images where it is strongest"
        )
    )


def _paths_section(report: Report, run: _Run) -> None:
    from ..heads.paths import ClassPaths
    from ..viz.paths import hit_rate_figure, path_mask_figure, path_similarity_figure

    cfg = run.cfg
    n_fit = min(cfg.path_images, len(run.x_train))
    paths = ClassPaths(
        objective="code",
        epochs=cfg.path_epochs,
        batch_size=32,
        random_state=cfg.seed,
        device=cfg.device,
        min_images=2,
    )
    paths.fit(run.model, (run.x_train[:n_fit], run.y_train[:n_fit]))
    hits = paths.hit_rates(
        run.model, run.x_test, run.y_test, n_composites=20 if len(run.x_test) < 300 else 60
    )
    mis = paths.misclassification(run.model, (run.x_test, run.y_test))
    names = [run.class_names[int(c)] for c in paths.classes_]
    s = report.section("Class paths")
    s.add(
        Paragraph(
            "Information-bottleneck channel masks per class on the frozen network (official-code "
            f"objective, {cfg.path_epochs} epochs on {n_fit} training images, all classes in one "
            "pass). A channel is on a class's path when its mask exceeds 0.5; similarity = mean "
            "Jaccard index over layers; hit rate on 2x2 composites of four classes (chance 25 %)."
        )
    )
    s.add(
        Table(
            "path_layers",
            [
                {
                    "layer": name,
                    "channels": int(paths.masks_[name].shape[1]),
                    "on the path per class (mean)": float(paths.paths_[name].float().sum(1).mean()),
                    "hit rate mean": float(hits.mean[hits.layers.index(name)])
                    if name in hits.layers
                    else float("nan"),
                    "hit rate std": float(hits.std[hits.layers.index(name)])
                    if name in hits.layers
                    else float("nan"),
                }
                for name in paths.layers_
            ],
        )
    )
    s.add(
        Table(
            "path_misclassification",
            [
                {
                    "misclassified test images": int(len(mis.indices)),
                    "wrong top-1 among the 3 most similar paths %": 100 * mis.rate
                    if len(mis.indices)
                    else float("nan"),
                    "chance %": 100 * mis.chance,
                }
            ],
            caption="Misclassification analysis (docs: methods/paths)",
        )
    )
    s.add(
        run.figure(
            "path_masks",
            path_mask_figure(paths.masks_, names),
            "Mask values μ per layer (classes down, channels across)",
        )
    )
    s.add(run.figure("path_similarity", path_similarity_figure(paths.similarity(), names)))
    s.add(run.figure("path_hit_rate", hit_rate_figure(hits)))


def _gates_section(report: Report, run: _Run) -> None:
    from ..heads.gates import ClassSpecificGates
    from ..metrics.localization import gate_localization
    from ..viz.gates import class_filter_gallery, gate_matrix_figure

    cfg = run.cfg
    from ..errors import LayerNotFoundError

    def fit(layer: str | None) -> ClassSpecificGates:
        est = ClassSpecificGates(
            layer=layer, epochs=cfg.gate_epochs, warmup=1, random_state=cfg.seed, device=cfg.device
        )
        return est.fit(run.model, (run.x_train, run.y_train))

    try:
        gates = fit(cfg.gate_layer)
    except LayerNotFoundError:
        if cfg.gate_layer is not None:
            raise
        gates = fit(run.conv_layer)  # no known stages: gate the heatmap layer
    sc = gates.evaluate((run.x_test, run.y_test))
    s = report.section("Class-specific gates")
    s.add(
        Paragraph(
            f"Gate matrix G (classes x filters of {gates.layer_}) learned "
            "post hoc on the frozen "
            f"backbone with a new linear head, {cfg.gate_epochs} epochs alternating STD and CSG "
            "steps (docs: methods/gates). A filter is specific to a class when its gate "
            "exceeds 0.5 "
            "there, no other class's does and the others' mean gate is at most 0.2."
        )
    )
    lo, hi = sc.density_bounds
    n_spec = sum(len(gates.class_filters(c)) for c in range(gates.gates_.shape[0]))
    s.add(
        Table(
            "gates",
            [
                {
                    "STD accuracy %": 100 * sc.std_accuracy,
                    "CSG accuracy % (true-class gates)": 100 * sc.csg_accuracy,
                    "L1 density": sc.density,
                    "density bounds": f"[{lo:.3f}, {hi:.3f}]",
                    "mutual information": sc.mutual_information,
                    "class-specific filters": n_spec,
                }
            ],
        )
    )
    names = run.class_names[: gates.gates_.shape[0]]
    s.add(
        run.figure(
            "gate_matrix",
            gate_matrix_figure(gates.gates_, class_names=names),
            "Gate matrix, filters in block order",
        )
    )
    if run.parts is not None and run.parts.object_mask is not None:
        m = min(cfg.heatmap_images, len(run.x_test))
        loc = gate_localization(
            gates, run.model, run.x_test[:m], run.parts.object_mask[:m], run.y_test[:m]
        )
        rows = [
            {
                "maps": "ActivMap, class-specific filters on their class",
                "filters": loc.n_specific,
                "IoU": loc.specific_iou,
                "AP50 %": 100 * loc.specific_ap,
            },
            {
                "maps": "ActivMap, every filter on its best class",
                "filters": len(loc.ious[0]),
                "IoU": loc.all_iou,
                "AP50 %": 100 * loc.all_ap,
            },
        ]
        for label, res in (("CAM (new head)", loc.cam), ("gated CAM", loc.cam_gated)):
            if res is not None:
                rows.append(
                    {
                        "maps": label,
                        "filters": len(loc.ious[0]),
                        "IoU": float(res.iou),
                        "AP50 %": 100 * float(res.ap),
                    }
                )
        s.add(
            Table(
                "gate_localization",
                rows,
                caption=(
                    f"Localization against the object mask on {m} test images "
                    "(Liang et al. 2020 App. H); "
                    "ActivMaps segmented at each filter's top-30 % threshold"
                ),
            )
        )
    else:
        s.add(Paragraph("The data has no object masks: no filter localization."))
    present = [int(c) for c in run.y_test.unique()][: cfg.gallery_classes]
    for c in present:
        fig = class_filter_gallery(
            gates,
            run.x_test,
            run.y_test,
            c,
            top=4,
            n_images=3,
            display=run.raw_test,
            class_names=names,
        )
        s.add(
            run.figure(
                f"gate_filters_class{c}",
                fig,
                f"{names[c]}: ActivMaps of its top filters (* class-specific; g its "
                "gate for the class, o the mean gate of the others)",
            )
        )


STAGES: dict[str, Callable[[Report, _Run], None]] = {
    "model": _model_section,
    "activations": _bank_section,
    "xnn": _xnn_section,
    "heatmaps": _heatmap_section,
    "localization": _localization_section,
    "nmf": _nmf_section,
    "paths": _paths_section,
    "gates": _gates_section,
}


def _fit_xnn(
    kind: str,
    bank: object,
    layer: str,
    *,
    n_features: int,
    hidden: tuple[int, ...],
    epochs: int,
    seed: int,
    device: str,
) -> tuple[object, int, int]:
    """Fit one XNN variant on a bank, every class at once; returns it with its sample sizes.

    Positives per class: 80 % of the rarest class's images (at most 200, the thesis's CUB
    setting has 50); negatives: all other images up to 8 000 (:doc:`/methods/xnn`).
    """
    from ..heads.lasso_xnn import LassoXNN
    from ..heads.xnn import XNN

    counts = torch.bincount(bank.labels)
    n_pos = max(2, min(200, int(int(counts[counts > 0].min()) * 0.8)))
    n_neg = min(8000, len(bank) - int(counts.max()))
    if kind == "lasso":
        head = LassoXNN(
            n_features=n_features,
            n_positive=n_pos,
            n_negative=n_neg,
            random_state=seed,
            layer=layer,
        )
    else:
        head = XNN(
            n_features=n_features,
            kind=kind,
            hidden=hidden,
            n_positive=n_pos,
            n_negative=n_neg,
            max_epochs=epochs,
            patience=8,
            random_state=seed,
            device=device,
            layer=layer,
        )
    return head.fit(bank), n_pos, n_neg


def _logits(model: nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    from .._guard import model_guard

    dev = next(model.parameters()).device
    with model_guard(model), torch.no_grad():
        return torch.cat([model(x[i : i + batch].to(dev)).cpu() for i in range(0, len(x), batch)])
