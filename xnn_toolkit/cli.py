"""The ``xnn`` command.

``xnn demo`` explains a bundled model end to end into an HTML report; ``xnn models`` lists
the bundled models; ``xnn data`` draws annotated samples of a dataset; ``xnn extract``
streams activations into a bank on disk; ``xnn explain`` runs the whole explanation pipeline
on any model spec, layer and dataset; ``xnn score`` scores heatmap methods into tables;
``xnn figures`` writes heatmap figures. Every command takes ``--device`` and ``--seed``;
errors print one line that says what was wrong and what to try.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence

from .errors import InputError, XnnError

__all__ = ["main", "build_parser"]


def _common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda:0, ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    if out_default is not None:
        p.add_argument("--out", default=out_default, help=f"output folder (default: {out_default})")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")


def _model_options(p: argparse.ArgumentParser, images: bool = True) -> None:
    """--pretrained, --weights (and --images) for a command with --model."""
    p.add_argument(
        "--pretrained",
        action="store_true",
        help="load the library's pretrained weights of a timm: / torchvision: model "
        "(downloads once; needs network)",
    )
    p.add_argument(
        "--weights",
        default=None,
        metavar="FILE",
        help="a state dict (.safetensors, .pt, .pth) for the --model architecture",
    )
    if not images:
        return
    p.add_argument(
        "--images",
        default=None,
        metavar="PATH",
        help="your images instead of --dataset: a file, a folder (one sub-folder per class "
        "gives labels) or a glob; resized and cropped as the model's data config says",
    )


def _load_cli_model(args: argparse.Namespace, device: str | None = None):
    """The --model, with --pretrained / --weights."""
    from .models import RandomWeightsWarning, load_model, load_weights

    with warnings.catch_warnings():
        if args.weights:
            # the architecture is built random only to receive the file's weights
            warnings.simplefilter("ignore", RandomWeightsWarning)
        lm = load_model(args.model, pretrained=args.pretrained, device=device)
    if args.weights:
        load_weights(lm, args.weights)
    return lm


def _dataset_spec(args: argparse.Namespace) -> str:
    return f"images:{args.images}" if getattr(args, "images", None) else args.dataset


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``xnn`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="xnn",
        allow_abbrev=False,  # a typo must not silently pick another option
        description="Explain pretrained CNNs post hoc: XNN heads, NMF concepts, class paths, "
        "class-specific gates, Excitation Backprop / CAM heatmaps and their metrics.",
    )
    sub = parser.add_subparsers(
        dest="command",
        metavar="COMMAND",
        parser_class=functools.partial(argparse.ArgumentParser, allow_abbrev=False),
    )

    p = sub.add_parser("demo", help="explain a bundled model end to end into an HTML report")
    _common(p, "xnn-report")
    p.add_argument("--model", default="vgg_synth", help="bundled model (default: vgg_synth)")
    p.add_argument(
        "--quick", action="store_true", help="small sample sizes (about a minute; for smoke tests)"
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("explain", help="explain any model on a dataset into an HTML report")
    _common(p, "xnn-report")
    p.add_argument(
        "--model",
        required=True,
        help="model spec: bundled:NAME, timm:NAME, "
        "torchvision:NAME or a weights file with its card",
    )
    _model_options(p, images=False)
    p.add_argument("--dataset", default="synthetic", help="as in `xnn data` (default: synthetic)")
    p.add_argument("--fc-layer", default=None, help="layer of the XNN heads (default: fc6)")
    p.add_argument(
        "--conv-layer",
        default=None,
        help="layer of heatmaps and NMF (default: VGG pool4, ResNet layer3, else the middle stage)",
    )
    p.add_argument(
        "--stages",
        default=None,
        help="comma-separated subset of: "
        "model,activations,xnn,heatmaps,localization,nmf,paths,gates",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated attribution methods of "
        "the localization table (default: cmwp,mwp,gradcam,saliency)",
    )
    p.add_argument(
        "--kinds",
        default=None,
        help="comma-separated XNN variants (default: srae,nn,sae,lasso,cae)",
    )
    p.add_argument(
        "--n-train", type=int, default=None, help="training images (default: 3000, --quick 600)"
    )
    p.add_argument(
        "--n-test", type=int, default=None, help="test images (default: 600, --quick 120)"
    )
    p.add_argument("--quick", action="store_true", help="small sample sizes")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser("models", help="list the bundled models and their cards")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")

    p = sub.add_parser("data", help="write sample images of a dataset with their annotations")
    _common(p, "xnn-data")
    p.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic | fashion-mnist | cub:PATH | masks:IMAGES:MASKS (default: synthetic)",
    )
    p.add_argument("--n", type=int, default=24, help="number of samples (default: 24)")
    p.add_argument("--split", default="test", choices=["train", "test"])

    p = sub.add_parser("extract", help="stream activations of layers into a bank on disk")
    _common(p, "xnn-bank")
    p.add_argument(
        "--model",
        required=True,
        help="model spec: bundled:NAME, timm:NAME, torchvision:NAME or a weights file",
    )
    _model_options(p)
    p.add_argument("--layer", action="append", required=True, help="layer name (repeatable)")
    p.add_argument("--dataset", default="synthetic", help="as in `xnn data`")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=1000, help="number of images (default: 1000)")
    p.add_argument("--pool", choices=["avg", "max"], default=None, help="pool spatial maps")
    p.add_argument("--float16", action="store_true", help="store float16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--grey-to-rgb",
        action="store_true",
        help="accept a grey dataset for a colour model (the channel is repeated)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "score",
        help="score heatmap methods with metrics into tables "
        "(resumable; shards over torchrun processes)",
    )
    _common(p, "xnn-scores")
    p.add_argument(
        "--model",
        required=True,
        help="model spec: bundled:NAME, timm:NAME, torchvision:NAME or a weights file",
    )
    _model_options(p)
    p.add_argument(
        "--layer",
        default=None,
        help="read layer of EB / CAM methods (default: each method's own, e.g. VGG pool4)",
    )
    p.add_argument("--dataset", default="synthetic", help="as in `xnn data`")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--methods",
        default="cmwp,gradcam",
        help="comma-separated attribution "
        "methods (default: cmwp,gradcam); besides the toolkit's own, the CAM "
        "family of pytorch-grad-cam (extra [cam]): scorecam, layercam, xgradcam, "
        "hirescam, eigencam, eigengradcam, ablationcam, fullgrad",
    )
    p.add_argument(
        "--metrics",
        default="auto",
        help="comma-separated metrics, or auto: "
        "every metric the dataset's ground truth supports; quantus:NAME adds any "
        "Quantus metric (e.g. quantus:Sparseness, quantus:MaxSensitivity, "
        "quantus:RandomLogit), scored from the runner's maps",
    )
    p.add_argument(
        "--target",
        default="label",
        choices=["label", "predicted"],
        help="class explained on each image (default: label)",
    )
    # --num-images: torchrun's own parser reads "--n" as an abbreviation of its --nnodes
    p.add_argument(
        "--n",
        "--num-images",
        dest="n",
        type=int,
        default=200,
        help="number of images (default: 200); under torchrun use --num-images",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--grey-to-rgb",
        action="store_true",
        help="accept a grey dataset for a colour model (the channel is repeated)",
    )
    p.add_argument(
        "--shard-size", type=int, default=None, help="images per shard (default: 4 x batch size)"
    )
    p.add_argument("--steps", type=int, default=20, help="deletion / insertion steps")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per process while "
        "scoring (default: 1; tables are identical for any number of torchrun "
        "processes with the same value)",
    )
    p.add_argument(
        "--num-workers",
        default="auto",
        help="DataLoader processes that read and decode the next images while one batch is "
        "explained (default auto: up to 4 for image folders (cub:, masks:, images:), 0 for "
        "generated or in-memory data); the tables do not depend on it",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in --out (same arguments)",
    )
    p.add_argument(
        "--save-maps",
        action="store_true",
        help="also write every heatmap "
        "(float32) to OUT/maps as safetensors shards + manifest.json; read them "
        "with xnn_toolkit.load_maps(OUT)",
    )
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "figures",
        help="heatmap figures (PNG/SVG/PDF) of a model on a dataset",
        description="Explain the first --n images of a dataset with one or more attribution "
        "methods and write a grid of overlays (rows: images, columns: methods) as PNG, SVG "
        "and PDF, with an index.html; --xnn adds the thesis's XNN layout (image, 1-heatmap, "
        "x-features sorted by their contribution v_i E_i).",
        epilog="example: xnn figures --model bundled:vgg_synth --methods cmwp,gradcam "
        "--target label --n 6 --xnn --out figs",
    )
    _common(p, "xnn-figures")
    p.add_argument(
        "--model",
        required=True,
        help="model spec: bundled:NAME, timm:NAME, torchvision:NAME or a weights file",
    )
    _model_options(p)
    p.add_argument("--dataset", default="synthetic", help="as in `xnn data`")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument(
        "--methods",
        "--method",
        default="cmwp",
        help="comma-separated methods of "
        "class logits, e.g. cmwp, mwp, gradcam, gradcam++, saliency, "
        "integrated_gradients (default: cmwp)",
    )
    p.add_argument(
        "--target",
        default="label",
        help="class explained on each image: label, "
        "predicted, or a class index / name for all (default: label)",
    )
    p.add_argument("--n", type=int, default=8, help="number of images (default: 8)")
    p.add_argument(
        "--layer",
        default=None,
        help="read layer of c-MWP / MWP / Grad-CAM (default: VGG pool4, ResNet layer3)",
    )
    p.add_argument(
        "--formats",
        default="png,svg,pdf",
        help="comma-separated figure formats (default: png,svg,pdf)",
    )
    p.add_argument("--dpi", type=int, default=200, help="PNG resolution (default: 200)")
    p.add_argument(
        "--xnn", action="store_true", help="also fit an SRAE head and draw the XNN layout"
    )
    p.add_argument("--fc-layer", default=None, help="layer of the XNN head (default: fc6)")
    p.add_argument(
        "--n-train", type=int, default=1000, help="training images of the XNN head (default: 1000)"
    )
    p.add_argument("--n-features", type=int, default=5, help="x-features (default: 5)")
    p.add_argument("--per-image", action="store_true", help="also one overlay per image and method")
    p.add_argument("--cmap", default="jet", help="matplotlib colour map (default: jet)")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="heatmap opacity of the per-image overlays (default: 0.5)",
    )
    p.add_argument("--colorbar", action="store_true", help="colour bar on per-image overlays")
    p.add_argument(
        "--save-maps",
        action="store_true",
        help="also write the heatmaps "
        "(float32) to OUT/maps; read them with xnn_toolkit.load_maps(OUT)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xnn``; returns the exit status (0 on success, 2 on a user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "device", None) is not None:
            from ._device import resolve_device

            if not (args.device == "cuda" and "LOCAL_RANK" in os.environ):
                resolve_device(args.device, "--device")
        return _COMMANDS[args.command](args)
    except XnnError as exc:
        print(f"xnn {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"xnn {args.command}: interrupted", file=sys.stderr)
        return 130


def _cmd_models(args: argparse.Namespace) -> int:
    from . import zoo

    cards = [zoo.model_card(n) for n in zoo.bundled_names()]
    if args.json:
        print(json.dumps(cards, indent=1))
        return 0
    if not cards:
        print("no bundled models found in", zoo.assets_dir())
        return 0
    print(f"{'name':18} {'arch':27} {'dataset':22} {'input':12} {'test acc':>8}")
    for c in cards:
        size = "x".join(str(v) for v in c["input_size"])
        acc = c.get("test_accuracy")
        acc = f"{100 * float(acc):7.2f}%" if acc is not None else "     n/a"
        photos = c.get("photos_top1")
        if photos:  # a pretrained model: its top-1 on the bundled photos instead
            acc += "  photos: " + ", ".join(f"{k} -> {v[1]}" for k, v in photos.items())
        print(f"{c['name']:18} {c['arch']:27} {str(c['dataset'])[:22]:22} {size:12} {acc}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .viz.heatmaps import annotated_samples, save_figure

    ds = load_dataset(args.dataset, split=args.split, n=args.n, seed=args.seed)
    n = min(args.n, len(ds))
    if n < 1:
        raise InputError(f"the dataset {args.dataset!r} is empty")
    images, annotations, titles = [], [], []
    names = getattr(ds, "classes", None)
    for i in range(n):
        item = ds[i]
        images.append(item[0])
        label = int(item[1])
        titles.append(names[label] if names else str(label))
        annotations.append(item[2] if len(item) > 2 else None)
    import torch

    x = torch.stack(images)
    kp = vis = box = None
    if all(a is not None for a in annotations):
        kp = torch.stack([a.keypoints for a in annotations])
        vis = torch.stack([a.visible for a in annotations])
        box = torch.stack([a.bbox for a in annotations])
    fig = annotated_samples(
        x, kp, vis, box, titles=titles, part_names=getattr(ds, "part_names", None)
    )
    out = _prepare_out(args.out, args.overwrite)
    paths = save_figure(fig, os.path.join(out, "samples"), formats=("png", "pdf"))
    print("\n".join(paths))
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .bank import extract
    from .data import load_dataset

    out = _prepare_out(args.out, args.overwrite, create=False)
    lm = _load_cli_model(args, args.device)
    # raw images: extract normalises them with the model's preprocessing after checking
    # that data and model fit (channels, classes)
    ds = load_dataset(_dataset_spec(args), split=args.split, n=args.n, seed=args.seed, model=lm)
    import torch

    made = not os.path.exists(out)
    try:
        bank = extract(
            lm,
            ds,
            args.layer,
            pool=args.pool,
            dtype=torch.float16 if args.float16 else torch.float32,
            path=out,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.no_progress,
            resume=not args.overwrite,
            grey_to_rgb=args.grey_to_rgb,
        )
    except BaseException:
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # an empty folder left by the failure
        raise
    print(f"wrote {len(bank)} examples of layers {', '.join(bank.layers)} to {out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _prepare_out(args.out, args.overwrite, create=False)
    index = run_demo(
        out=args.out,
        overwrite=args.overwrite,
        model=args.model,
        device=args.device,
        seed=args.seed,
        quick=args.quick,
        progress=not args.no_progress,
    )
    print(f"report written to {index}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .report.pipeline import ExplainConfig, run_explain

    model = _load_cli_model(args, args.device) if args.pretrained or args.weights else args.model
    kw = dict(
        model=model,
        dataset=args.dataset,
        fc_layer=args.fc_layer,
        conv_layer=args.conv_layer,
        n_train=args.n_train,
        n_test=args.n_test,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        methods=_names(args.methods),
        kinds=_names(args.kinds),
    )
    kw = {k: v for k, v in kw.items() if v is not None}  # unset: the (quick) default
    cfg = ExplainConfig.quick(**kw) if args.quick else ExplainConfig(**kw)
    stages = args.stages.split(",") if args.stages else None
    _prepare_out(args.out, args.overwrite, create=False)
    index = run_explain(cfg, args.out, overwrite=args.overwrite, stages=stages)
    print(f"report written to {index}")
    return 0


def _num_workers(value: str, dataset: str) -> int:
    """``--num-workers``: an int >= 0, or auto (loader processes for files read from disk)."""
    if value == "auto":
        from .report._score_batches import auto_workers

        on_disk = dataset.split(":", 1)[0] in ("cub", "masks", "images")
        return auto_workers() if on_disk else 0
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise InputError(f"--num-workers must be auto or an int >= 0, got {value!r}")
    return n


def _cmd_score(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .report.scoring import ScoringConfig, score_dataset

    rank = int(os.environ.get("RANK", "0"))  # set by torchrun; rank 0 writes and prints
    device = args.device
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{os.environ['LOCAL_RANK']}"  # one GPU per torchrun process
    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    # every rank checks (read-only) before the processes meet: all of them stop with this
    # one line instead of the others failing inside a collective
    _prepare_out(args.out, args.overwrite or args.resume, create=False)

    def names(text: str) -> tuple[str, ...]:
        return tuple(v.strip() for v in text.split(",") if v.strip())

    cfg = ScoringConfig(
        methods=names(args.methods),
        metrics=None if args.metrics == "auto" else names(args.metrics),
        layer=args.layer,
        target=args.target,
        n=args.n,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=args.seed,
        steps=args.steps,
        threads=args.threads,
        save_maps=args.save_maps,
        num_workers=_num_workers(args.num_workers, _dataset_spec(args)),
    )
    lm = _load_cli_model(args, device)
    # raw images: score_dataset normalises them after checking that data and model fit
    ds = load_dataset(_dataset_spec(args), split=args.split, n=args.n, model=lm)
    res = score_dataset(
        lm,
        ds,
        cfg,
        out=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
        grey_to_rgb=args.grey_to_rgb,
    )
    if rank == 0:
        shown = list(res.manifest["metrics"])
        print(f"{'target':10} {'method':10} " + " ".join(f"{m[:14]:>14}" for m in shown))
        for t in res.manifest["targets"]:
            for m in cfg.methods:
                vals = [res.value(k, m, t) for k in shown]
                cells = " ".join(f"{'-' if v is None else f'{v:.4f}':>14}" for v in vals)
                print(f"{t[:10]:10} {m[:10]:10} {cells}")
        print(f"scored {res.manifest['dataset']['scored']} images; tables in {res.out}")
    return 0


def _cmd_figures(args: argparse.Namespace) -> int:
    from .report.export import figure_report

    out = _prepare_out(args.out, args.overwrite, create=False)
    lm = _load_cli_model(args, args.device)
    report = figure_report(
        lm,
        _dataset_spec(args),
        _names(args.methods) or (),
        target=args.target,
        n=args.n,
        split=args.split,
        layer=args.layer,
        xnn=args.xnn,
        fc_layer=args.fc_layer,
        n_train=args.n_train,
        n_features=args.n_features,
        formats=_names(args.formats) or (),
        dpi=args.dpi,
        device=args.device,
        seed=args.seed,
        progress=not args.no_progress,
        per_image=args.per_image,
        cmap=args.cmap,
        alpha=args.alpha,
        colorbar=args.colorbar,
    )
    index = report.write(out, overwrite=args.overwrite)
    if args.save_maps:
        from .report.export import save_figure_maps

        save_figure_maps(report, os.path.join(out, "maps"))
    print(
        "\n".join(
            sorted(
                os.path.join(out, "figures", f) for f in os.listdir(os.path.join(out, "figures"))
            )
        )
    )
    print(f"index: {index}")
    return 0


def _names(text: str | None) -> tuple[str, ...] | None:
    """``"a, b,"`` → ``("a", "b")``; None stays None."""
    return None if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def _prepare_out(out: str, overwrite: bool, create: bool = True) -> str:
    """Check ``--out`` before any work: a folder, empty unless ``--overwrite``, writable."""
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise InputError(f"--out {out!r} is a file; give a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise InputError(
            f"--out {out!r} exists and is not empty; pass --overwrite or another --out"
        )
    parent = out if os.path.isdir(out) else os.path.dirname(out)
    while parent and not os.path.isdir(parent):
        if os.path.exists(parent):
            raise InputError(f"--out {out!r} is inside {parent!r}, which is not a folder")
        parent = os.path.dirname(parent)
    try:  # os.access answers yes to root even where nothing can be written: try it
        os.rmdir(tempfile.mkdtemp(dir=parent or ".", prefix=".xnn-write-test-"))
    except OSError as exc:
        raise InputError(
            f"--out {out!r} is not writable ({exc.strerror}); choose another folder"
        ) from exc
    if create:
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create --out {out!r}: {exc}") from exc
    return out


_COMMANDS = {
    "demo": _cmd_demo,
    "explain": _cmd_explain,
    "models": _cmd_models,
    "data": _cmd_data,
    "extract": _cmd_extract,
    "score": _cmd_score,
    "figures": _cmd_figures,
}


def _cpu_allocator_defaults() -> None:
    """Let torch back large CPU buffers with transparent huge pages (the ``xnn`` command only).

    ``THP_MEM_ALLOC_ENABLE=1`` makes torch align CPU buffers of 2 MiB and more to huge pages
    and ask the kernel for them, so a batch's activations cost one page fault per 2 MiB
    instead of one per 4 KiB. torch reads the variable at its first CPU allocation, so this
    runs before any tensor exists; a value already in the environment (``0`` to switch it
    off) is kept. The values computed are the same either way.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def console_main() -> None:
    """Entry point of the ``xnn`` command (and of ``python -m xnn_toolkit.cli``)."""
    _cpu_allocator_defaults()
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    console_main()
