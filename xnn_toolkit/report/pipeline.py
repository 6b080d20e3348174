"""The end-to-end explanation run behind ``xnn demo`` and ``xnn explain``.

model + data → activation bank → heads (XNN/SRAE and baselines, NMF concepts, class
paths, class-specific gates) → heatmaps (Excitation Backprop, Grad-CAM, ...) → metrics →
report. Each stage is a function that adds a section to a :class:`Report`; the data flows one
way through the plain dataclass :class:`_Run`. Sections whose ground truth the data lacks
(part keypoints, object masks) say so in the report instead of showing numbers.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..errors import InputError
from .document import Card, Figure, Paragraph, Report, Table

__all__ = ["ExplainConfig", "build_report", "run_explain"]


@dataclass
class ExplainConfig:
    """What to explain and how much work to spend on it.

    Attributes
    ----------
    model : str
        Model spec (``bundled:vgg_synth``, ``timm:resnet18``, a weights file...).
    dataset : str
        Dataset spec (see :func:`xnn_toolkit.data.load_dataset`).
    fc_layer : str or None
        Layer the XNN heads attach to (default: ``fc6`` when the model has it, else the
        input of the last linear layer is not available and the read layer is used).
    conv_layer : str or None
        Conv layer for NMF concepts and heatmaps (default: the model's default read layer).
    n_train, n_test : int
        Images used to fit heads and to score them.
    n_features : int
        x-features per XNN head.
    hidden : tuple of int
        XNN encoder hidden sizes.
    xnn_epochs : int
        Maximum epochs of the XNN heads.
    kinds : tuple of str
        XNN variants to compare (``srae``, ``nn``, ``sae``, ``cae``, ``lasso``).
    nmf_rank : int
    path_epochs, gate_epochs : int
    heatmap_images : int
        Test images that get x-feature heatmaps (for orthogonality and locality).
    methods : tuple of str
        Attribution methods compared on class logits (localization table).
    device : str
    seed : int
    progress : bool
    """

    model: str = "bundled:vgg_synth"
    dataset: str = "synthetic"
    fc_layer: str | None = None
    conv_layer: str | None = None
    n_train: int = 3000
    n_test: int = 600
    n_features: int = 5
    hidden: tuple[int, ...] = (256, 64)
    xnn_epochs: int = 40
    kinds: tuple[str, ...] = ("srae", "nn", "sae", "cae", "lasso")
    nmf_rank: int = 8
    path_epochs: int = 3
    gate_epochs: int = 6
    heatmap_images: int = 200
    methods: tuple[str, ...] = ("cmwp", "mwp", "gradcam", "saliency")
    device: str = "cpu"
    seed: int = 0
    progress: bool = True

    @classmethod
    def quick(cls, **kw: object) -> ExplainConfig:
        """Small sizes for smoke tests (about a minute on 2 cores)."""
        base = dict(
            n_train=600, n_test=120, hidden=(32, 16), xnn_epochs=4, kinds=("srae", "nn"),
            nmf_rank=4, path_epochs=1, gate_epochs=2, heatmap_images=40,
            methods=("cmwp", "gradcam"),
        )  # fmt: skip
        base.update(kw)
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class _Run:
    """What the stages hand each other."""

    cfg: ExplainConfig
    model: torch.nn.Module
    loaded: object
    class_names: list[str]
    x_train: torch.Tensor  # normalised N x C x H x W
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    raw_test: torch.Tensor  # images in [0, 1] for figures
    parts: object | None  # PartBatch of the test images, when the data has annotations
    fc_layer: str
    conv_layer: str
    timings: dict[str, float] = field(default_factory=dict)
    heads: dict[str, object] = field(default_factory=dict)


def _stage(run: _Run, name: str, fn: Callable[[], None]) -> None:
    t = time.perf_counter()
    fn()
    run.timings[name] = round(time.perf_counter() - t, 2)


def _images(ds: object, n: int) -> tuple[torch.Tensor, torch.Tensor, object | None]:
    from ..data import SyntheticParts, collate_annotations

    inner = getattr(ds, "dataset", ds)
    if isinstance(ds, SyntheticParts) or isinstance(inner, SyntheticParts):
        synth = ds if isinstance(ds, SyntheticParts) else inner
        images, batch = synth.render_batch(range(min(n, len(synth))))
        return images, batch.labels, batch
    items = [ds[i] for i in range(min(n, len(ds)))]
    if not items:
        raise InputError("the dataset is empty")
    images = torch.stack([it[0] for it in items])
    labels = torch.tensor([int(it[1]) for it in items])
    anns = [it[2] for it in items if len(it) > 2]
    parts = collate_annotations(anns) if len(anns) == len(items) else None
    return images, labels, parts


def _prepare(cfg: ExplainConfig) -> _Run:
    from ..data import load_dataset
    from ..layers import default_read_layer, list_layers
    from ..models import load_model

    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, device=cfg.device)
    model = lm.model
    train = load_dataset(cfg.dataset, split="train", n=cfg.n_train)
    test = load_dataset(cfg.dataset, split="test", n=cfg.n_test)
    raw_train, y_train, _ = _images(train, cfg.n_train)
    raw_test, y_test, parts = _images(test, cfg.n_test)
    pre = lm.preprocessing
    names = lm.class_names or getattr(train, "classes", None)
    k = int(y_train.max()) + 1
    class_names = list(names) if names else [str(i) for i in range(k)]
    layers = set(list_layers(model))
    fc = cfg.fc_layer or ("fc6" if "fc6" in layers else None)
    if fc is None:
        linears = list_layers(model, torch.nn.Linear)
        if len(linears) < 2:
            raise InputError(
                "the model has no fully connected layer below its classifier for the XNN "
                "heads; pass fc_layer= (a layer whose output is N x D)"
            )
        fc = linears[-2]
    return _Run(
        cfg=cfg, model=model, loaded=lm, class_names=class_names,
        x_train=pre.normalize(raw_train), y_train=y_train, x_test=pre.normalize(raw_test),
        y_test=y_test, raw_test=raw_test, parts=parts, fc_layer=fc,
        conv_layer=cfg.conv_layer or default_read_layer(model),
    )  # fmt: skip


def _model_section(report: Report, run: _Run) -> None:
    from .figures import annotated_samples

    with torch.no_grad():
        pred = _logits(run.model, run.x_test).argmax(1)
    acc = float((pred == run.y_test).float().mean())
    card = dict(getattr(run.loaded, "card", None) or {})
    items = {
        "model": run.cfg.model,
        "classes": len(run.class_names),
        "measured test accuracy": f"{100 * acc:.2f} % on {len(run.y_test)} images",
        "XNN layer": run.fc_layer,
        "heatmap / NMF layer": run.conv_layer,
    }
    for key in ("arch", "dataset", "train_command", "seed", "epochs", "test_accuracy"):
        if key in card:
            items[f"card: {key}"] = card[key]
    s = report.section("Model")
    s.add(Card(items))
    n = min(16, len(run.raw_test))
    p = run.parts
    titles = [run.class_names[int(c)] for c in run.y_test[:n]]
    fig = annotated_samples(
        run.raw_test[:n],
        None if p is None else p.keypoints[:n],
        None if p is None else p.visible[:n],
        None if p is None else p.bbox[:n],
        titles=titles, part_names=None if p is None else getattr(p, "part_names", None),
    )  # fmt: skip
    s.add(Figure("samples", fig, caption="Test samples with their part keypoints and boxes"))
    run.heads["accuracy"] = acc


def _logits(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    from .._guard import model_guard

    dev = next(model.parameters()).device
    with model_guard(model), torch.no_grad():
        return torch.cat([model(x[i : i + batch].to(dev)).cpu() for i in range(0, len(x), batch)])


def _bank_section(report: Report, run: _Run) -> None:
    from torch.utils.data import TensorDataset

    from ..features import extract

    layers = [run.fc_layer, run.conv_layer]
    kw = dict(progress=run.cfg.progress, device=run.cfg.device)
    for split, x, y in (("train", run.x_train, run.y_train), ("test", run.x_test, run.y_test)):
        run.heads[f"bank_{split}"] = extract(run.model, TensorDataset(x, y), layers, **kw)
    bank = run.heads["bank_test"]
    s = report.section("Activations")
    s.add(Paragraph(
        f"Activations of {', '.join(layers)} for {len(run.x_train)} training and "
        f"{len(run.x_test)} test images, extracted with forward hooks (the model is left "
        "unchanged)."
    ))  # fmt: skip
    s.add(Table("activations", [
        {"layer": name, "shape": "x".join(str(v) for v in bank.shape(name))} for name in layers
    ]))  # fmt: skip


def _xnn_section(report: Report, run: _Run) -> None:
    from ..heads.xnn import XNN, LassoXNN
    from ..metrics import f_cls, f_reg

    cfg = run.cfg
    tr, te = run.heads["bank_train"], run.heads["bank_test"]
    per_class = int(torch.bincount(tr.labels).min())
    n_pos = max(2, min(200, int(per_class * 0.8)))
    n_neg = min(8000, len(tr) - int(torch.bincount(tr.labels).max()))
    rows = []
    for kind in cfg.kinds:
        if kind == "lasso":
            head = LassoXNN(n_features=cfg.n_features, n_positive=n_pos, n_negative=n_neg,
                            random_state=cfg.seed, layer=run.fc_layer)  # fmt: skip
        else:
            head = XNN(n_features=cfg.n_features, kind=kind, hidden=cfg.hidden, n_positive=n_pos,
                       n_negative=n_neg, max_epochs=cfg.xnn_epochs, patience=8,
                       random_state=cfg.seed, device=cfg.device, layer=run.fc_layer)  # fmt: skip
        head.fit(tr)
        run.heads[f"xnn_{kind}"] = head
        row = {"method": kind.upper()}
        for split, bank in (("train", tr), ("test", te)):
            yb = head.predict(bank)
            cls = head.classes_
            row[f"F_reg {split}"] = float(f_reg(yb, bank.logits[:, cls]).mean())
            row[f"F_cls {split} %"] = 100 * float(f_cls(yb, bank.logits, cls).mean())
        rows.append(row)
    s = report.section("XNN explanation heads")
    s.add(Paragraph(
        f"One-vs-all heads with n = {cfg.n_features} x-features on {run.fc_layer}, all classes "
        f"trained together ({n_pos} positives and {n_neg} negatives per class, positives "
        "up-weighted). Faithfulness as in the thesis (METHODS §6): F_reg = mean |ȳ − ŷ|, "
        "F_cls = share of predictions unchanged when ŷ_c is replaced by ȳ_c."
    ))  # fmt: skip
    s.add(Table("xnn_faithfulness", rows))


def _xfeature_heatmaps(run: _Run, head: object, idx: torch.Tensor) -> torch.Tensor:
    """c-MWP heatmaps of every x-feature of each image's own class head: M x n x H x W."""
    from ..attribution import ContrastiveExcitationBackprop, HeadOutput

    method = ContrastiveExcitationBackprop(run.model, layer=run.conv_layer)
    n = run.cfg.n_features
    h, w = run.x_test.shape[-2:]
    out = torch.zeros(len(idx), n, h, w)
    labels = run.y_test[idx]
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        module = head.as_target_module(c)
        x = run.x_test[idx[rows]]
        for i in range(n):
            att = method.attribute(x, HeadOutput(run.fc_layer, module, i))
            out[rows, i] = att.heatmap.cpu()
    return out


def _heatmap_section(report: Report, run: _Run) -> None:
    from ..attribution import ContrastiveExcitationBackprop
    from ..metrics import locality, orthogonality, voronoi_part_probabilities
    from .figures import xnn_figure

    cfg = run.cfg
    m = min(cfg.heatmap_images, len(run.x_test))
    idx = torch.arange(m)
    one = ContrastiveExcitationBackprop(run.model, layer=run.conv_layer)
    one_maps = torch.cat([
        one.attribute(run.x_test[i : min(i + 64, m)], run.y_test[i : min(i + 64, m)]).heatmap
        for i in range(0, m, 64)
    ])  # fmt: skip
    rows = []
    maps_by_kind = {}
    for kind in cfg.kinds:
        head = run.heads[f"xnn_{kind}"]
        maps = _xfeature_heatmaps(run, head, idx)
        maps_by_kind[kind] = maps
        o = [orthogonality(maps[run.y_test[idx] == c]) for c in run.y_test[idx].unique()]
        row = {
            "method": kind.upper(),
            "O1": sum(float(v.o1) for v in o) / len(o),
            "O2": sum(float(v.o2) for v in o) / len(o),
        }
        if run.parts is not None:
            sub = _sub_parts(run.parts, idx)
            row["locality"] = float(locality(voronoi_part_probabilities(maps, sub)).mean)
        rows.append(row)
    if run.parts is not None:
        sub = _sub_parts(run.parts, idx)
        rows.append({"method": "1-heatmap",
                     "locality": float(locality(voronoi_part_probabilities(one_maps, sub)).mean)})
    s = report.section("x-feature heatmaps")
    s.add(Paragraph(
        f"Contrastive Excitation Backprop (c-MWP) of every x-feature, read at {run.conv_layer}, "
        f"on {m} test images (each image explained by its own class's head). Orthogonality "
        "O1 = ||P||_F − √n and O2 = −log det P over the heatmaps of each head, averaged over "
        "heads; Voronoi locality = entropy of the part histogram (lower is more local; "
        "METHODS §6)."
        + ("" if run.parts is not None else " The data has no part keypoints: no locality.")
    ))  # fmt: skip
    s.add(Table("xnn_heatmap_metrics", rows))
    kind = cfg.kinds[0]
    head = run.heads[f"xnn_{kind}"]
    pick = torch.stack([(run.y_test[idx] == c).nonzero().flatten()[0]
                        for c in run.y_test[idx].unique()])  # fmt: skip
    pick = pick[:10]
    contrib = head.contributions(run.heads["bank_test"])[idx[pick]]
    cls_pos = torch.stack([(head.classes_ == run.y_test[i]).nonzero().flatten()[0] for i in pick])
    contrib = contrib[torch.arange(len(pick)), cls_pos]
    fig = xnn_figure(
        run.raw_test[idx[pick]], one_maps[pick], maps_by_kind[kind][pick], contrib,
        labels=[run.class_names[int(run.y_test[i])] for i in pick],
    )  # fmt: skip
    s.add(Figure("xnn_explanations", fig,
                 caption=f"{kind.upper()} explanations: image, 1-heatmap, then x-features sorted "
                 "by their contribution v_i E_i (written above)"))  # fmt: skip


def _sub_parts(parts: object, idx: torch.Tensor) -> object:
    from ..data import PartBatch

    return PartBatch(
        labels=parts.labels[idx], keypoints=parts.keypoints[idx], visible=parts.visible[idx],
        bbox=parts.bbox[idx],
        part_mask=None if parts.part_mask is None else parts.part_mask[idx],
        object_mask=None if parts.object_mask is None else parts.object_mask[idx],
    )  # fmt: skip


def _localization_section(report: Report, run: _Run) -> None:
    from ..attribution import explain
    from ..metrics import energy_pointing_game, pointing_game

    s = report.section("Heatmap methods on class logits")
    if run.parts is None or run.parts.object_mask is None:
        s.add(Paragraph("The data has no object masks: no localization scores."))
        return
    m = min(run.cfg.heatmap_images, len(run.x_test))
    rows = []
    for method in run.cfg.methods:
        layer = None if method in ("saliency",) else run.conv_layer
        t = time.perf_counter()
        maps = torch.cat([
            explain(run.model, run.x_test[i : min(i + 50, m)], run.y_test[i : min(i + 50, m)],
                    method=method, layer=layer).heatmap.cpu()
            for i in range(0, m, 50)
        ])  # fmt: skip
        masks = run.parts.object_mask[:m]
        rows.append({
            "method": method,
            "pointing game %": 100 * float(pointing_game(maps, masks).float().mean()),
            "energy pointing %": 100 * float(energy_pointing_game(maps, masks).mean()),
            "seconds": round(time.perf_counter() - t, 2),
        })  # fmt: skip
    s.add(Paragraph(
        f"Heatmaps of the true class's logit on {m} test images; pointing game with the "
        "15-pixel tolerance and the energy-based pointing game against the object mask."
    ))  # fmt: skip
    s.add(Table("localization", rows))


def _nmf_section(report: Report, run: _Run) -> None:
    from ..figures import concept_gallery
    from ..heads.nmf import NMFConcepts, nmf_faithfulness

    cfg = run.cfg
    acts = run.heads["bank_train"].activations(run.conv_layer)
    s = report.section("NMF concepts")
    if acts.dim() != 4:
        s.add(Paragraph(f"{run.conv_layer} is not a conv layer: no NMF concepts."))
        return
    if bool((acts < 0).any()):
        s.add(Paragraph(f"{run.conv_layer} has negative activations: NMF needs a ReLU layer."))
        return
    nmf = NMFConcepts(rank=cfg.nmf_rank, random_state=cfg.seed, device=cfg.device).fit(acts)
    run.heads["nmf"] = nmf
    test_acts = run.heads["bank_test"].activations(run.conv_layer)
    scores = nmf.transform(test_acts)
    faith = nmf_faithfulness(run.model, run.x_test, nmf, layer=run.conv_layer)
    s.add(Paragraph(
        f"Non-negative factorisation of {run.conv_layer} (rank {cfg.nmf_rank}, HALS) on the "
        "training activations; test activations projected with the basis fixed. "
        "Faithfulness: the layer's activation replaced by its reconstruction M·S inside the "
        "network."
    ))  # fmt: skip
    s.add(Table("nmf_faithfulness", [{
        "rank": cfg.nmf_rank,
        "relative reconstruction error (train)": float(nmf.reconstruction_err_),
        "prediction agreement %": 100 * faith.agreement,
        "logit MAE": faith.logit_mae,
        "activation relative error (test)": faith.activation_rel_err,
    }]))  # fmt: skip
    n = min(8, len(run.raw_test))
    fig = concept_gallery(run.raw_test[:n], scores[:n], ncols=4,
                          title=f"NMF concepts of {run.conv_layer}")  # fmt: skip
    s.add(Figure("nmf_concepts", fig, caption="Each concept a colour over the image"))


def _paths_section(report: Report, run: _Run) -> None:
    from ..heads.paths import ClassPaths
    from .path_figures import hit_rate_figure, path_similarity_figure

    cfg = run.cfg
    paths = ClassPaths(objective="code", epochs=cfg.path_epochs, batch_size=32,
                       random_state=cfg.seed, device=cfg.device, min_images=2)  # fmt: skip
    paths.fit(run.model, (run.x_train, run.y_train))
    run.heads["paths"] = paths
    hits = paths.hit_rates(run.model, run.x_test, run.y_test,
                           n_composites=20 if len(run.x_test) < 300 else 60)  # fmt: skip
    s = report.section("Class paths")
    s.add(Paragraph(
        "Information-bottleneck channel masks per class on the frozen network (official-code "
        f"objective, {cfg.path_epochs} epochs, all classes in one pass). A channel is on a "
        "class's path when its mask exceeds 0.5; similarity = mean Jaccard index over layers; "
        "hit rate on 2x2 composites of four classes (chance 25 %)."
    ))  # fmt: skip
    s.add(Table("path_hit_rate", [
        {"layer": name, "hit rate mean": float(hits.mean[i]), "std": float(hits.std[i])}
        for i, name in enumerate(hits.layers)
    ]))  # fmt: skip
    s.add(Figure("path_similarity", path_similarity_figure(paths.similarity(), run.class_names)))
    s.add(Figure("path_hit_rate", hit_rate_figure(hits)))


def _gates_section(report: Report, run: _Run) -> None:
    from ..heads.gates import ClassSpecificGates
    from .gate_figures import gate_matrix_figure

    cfg = run.cfg
    gates = ClassSpecificGates(epochs=cfg.gate_epochs, warmup=1, random_state=cfg.seed,
                               device=cfg.device)  # fmt: skip
    gates.fit(run.model, (run.x_train, run.y_train))
    run.heads["gates"] = gates
    sc = gates.evaluate((run.x_test, run.y_test))
    s = report.section("Class-specific gates")
    s.add(Paragraph(
        "Gate matrix G (classes x filters) learned post hoc on the frozen backbone with a new "
        f"linear head, {cfg.gate_epochs} epochs alternating STD and CSG steps (METHODS §5)."
    ))  # fmt: skip
    lo, hi = sc.density_bounds
    s.add(Table("gates", [{
        "STD accuracy %": 100 * sc.std_accuracy,
        "CSG accuracy % (true-class gates)": 100 * sc.csg_accuracy,
        "L1 density": sc.density,
        "density bounds": f"[{lo:.3f}, {hi:.3f}]",
        "mutual information": sc.mutual_information,
    }]))  # fmt: skip
    s.add(Figure("gate_matrix", gate_matrix_figure(gates.gates_, class_names=run.class_names)))


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


def build_report(cfg: ExplainConfig, stages: Sequence[str] | None = None) -> Report:
    """Run the stages and return the report (not yet written).

    Parameters
    ----------
    cfg : ExplainConfig
    stages : sequence of str, optional
        Subset of :data:`STAGES` (in their order); default all.

    Returns
    -------
    Report
    """
    names = list(STAGES) if stages is None else list(stages)
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise InputError(f"unknown stages {bad}; choose from {list(STAGES)}")
    t0 = time.perf_counter()
    run = _prepare(cfg)
    report = Report(f"xnn_toolkit report: {cfg.model} on {cfg.dataset}")
    bar = tqdm(names, desc="xnn", disable=not cfg.progress)
    for name in bar:
        bar.set_postfix_str(name)
        _stage(run, name, lambda name=name: STAGES[name](report, run))
    run.timings["total"] = round(time.perf_counter() - t0, 2)
    s = report.section("Run")
    s.add(Table("timings", [{"stage": k, "seconds": v} for k, v in run.timings.items()]))
    s.add(Card(_versions() | {"device": cfg.device, "seed": cfg.seed}))
    report.meta.update(config=cfg.__dict__, timings=run.timings, versions=_versions())
    return report


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("xnn_toolkit", "torch", "torchvision", "timm", "captum", "scikit-learn"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_explain(
    cfg: ExplainConfig, out: str, *, overwrite: bool = False, stages: Sequence[str] | None = None
) -> str:
    """Run the pipeline and write the report folder; returns the path of ``index.html``."""
    import os

    out_abs = os.path.abspath(out)
    if os.path.isdir(out_abs) and os.listdir(out_abs) and not overwrite:
        raise InputError(
            f"--out {out!r} exists and is not empty; pass --overwrite or choose another folder"
        )
    return build_report(cfg, stages).write(out, overwrite=overwrite)
