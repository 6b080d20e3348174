"""Attribution engine speed: Excitation Backprop and Grad-CAM against their peers.

torchvision VGG-16 and ResNet-50 with random weights, 224 x 224 images, batch 4, CPU,
parameters frozen, no network. The unit is one plain forward + backward to the input
(``model(x)`` then ``out.backward(one_hot)`` with ``x.requires_grad``). In the same run, in
rotating order per repetition (medians over ``--reps``):

- ``unit``                  plain forward + backward to the input;
- ``mwp`` / ``torchray_eb`` our MWP and TorchRay's ``excitation_backprop`` read at the same
  middle layer (VGG pool4 ``features.23``, ResNet ``layer3``);
- ``cmwp`` / ``torchray_ceb`` our c-MWP (one backward pass) and TorchRay's
  ``contrastive_excitation_backprop`` (two passes), same read layer;
- ``mwp_input`` / ``zennit_eb`` our MWP read at the input and Zennit's ``ExcitationBackprop``
  composite (with its VGG / ResNet canonizer, biases zeroed) to the input;
- ``gradcam`` / ``gradcam_pkg`` our Grad-CAM and ``pytorch_grad_cam.GradCAM`` at the last
  stage (VGG ``features.29``, ResNet ``layer4``), both upsampled to the input (the
  package needs a graph to hook, so with frozen parameters its input requires grad and its
  backward runs down to the input; ours stops at the layer).

``--real`` (on by default, ``--no-real`` to skip) adds the real ImageNet
EfficientNet-Lite0 (``bundled:efficientnet_lite0``: depthwise convolutions, ReLU6, residual
adds) on scikit-image's photos: time of MWP, c-MWP, MWP to the input and Grad-CAM in units
of one forward + backward, and the conservation books (``metadata.conservation``): mass at
the read layer and the share lost per image. When the bundled weights are not installed it
says so and uses timm's architecture with random weights.

Targets (reference on this kind of machine, from the brief): MWP <= TorchRay's time at the
same layer; c-MWP <= 0.75 x TorchRay's contrastive; MWP to the input <= 0.5 x Zennit's.

Run ``.venv/bin/python bench/attribution.py`` (several minutes on 2 busy cores) or
``--quick`` (64 px, batch 2, one repetition: seconds). ``--threads`` sets torch's intra-op
threads (default 1: on a shared 2-core box, 2 threads thrash when other jobs run). Each
pair (ours, peer) runs back to back in alternating order; the headline ``*_over_*`` figures
are medians of these paired ratios (robust to the load drifting during the run), the
``*_over_unit`` figures ratios of medians. Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _setup(arch: str, size: int, batch: int):
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, size, size)
    classes = torch.arange(batch) * 7 % 1000
    return model, x, classes


def _callables(arch: str, model, x, classes):
    import torch
    from pytorch_grad_cam import GradCAM as PkgGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchray.attribution.excitation_backprop import (
        contrastive_excitation_backprop,
        excitation_backprop,
    )
    from zennit.composites import ExcitationBackprop as ZennitEB
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    from xnn_toolkit.attribution import ContrastiveExcitationBackprop, ExcitationBackprop, GradCAM

    vgg = arch.startswith("vgg")
    read = "features.23" if vgg else "layer3"
    contrast = "features.30" if vgg else "layer4"
    classifier = "classifier.6" if vgg else "fc"
    cam_layer = "features.29" if vgg else "layer4"
    target = classes.tolist()

    mwp = ExcitationBackprop(model, layer=read)
    cmwp = ContrastiveExcitationBackprop(model, layer=read)
    mwp_in = ExcitationBackprop(model, layer="input")
    gradcam = GradCAM(model, layer=cam_layer)
    pkg = PkgGradCAM(model=model, target_layers=[model.get_submodule(cam_layer)])
    pkg_targets = [ClassifierOutputTarget(int(c)) for c in classes]
    canon = VGGCanonizer if vgg else ResNetCanonizer

    def onehot(out):
        g = torch.zeros_like(out)
        g[torch.arange(len(classes)), classes] = 1
        return g

    def unit():
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        out.backward(onehot(out))

    def zennit():
        composite = ZennitEB(zero_params=["bias"], canonizers=[canon()])
        xg = x.clone().requires_grad_(True)
        with composite.context(model) as modified:
            out = modified(xg)
            torch.autograd.grad(out, xg, onehot(out))

    return {
        "unit": unit,
        "mwp": lambda: mwp.attribute(x, target),
        "torchray_eb": lambda: excitation_backprop(model, x, classes, saliency_layer=read),
        "cmwp": lambda: cmwp.attribute(x, target),
        "torchray_ceb": lambda: contrastive_excitation_backprop(
            model,
            x,
            classes,
            saliency_layer=read,
            contrast_layer=contrast,
            classifier_layer=classifier,
        ),
        "mwp_input": lambda: mwp_in.attribute(x, target),
        "zennit_eb": zennit,
        "gradcam": lambda: gradcam.attribute(x, target),
        # the package needs a graph: with frozen parameters the input must require grad
        "gradcam_pkg": lambda: pkg(
            input_tensor=x.clone().requires_grad_(True), targets=pkg_targets
        ),
    }


PAIRS = [
    ("mwp", "torchray_eb"),
    ("cmwp", "torchray_ceb"),
    ("mwp_input", "zennit_eb"),
    ("gradcam", "gradcam_pkg"),
]


def _measure(fns: dict, reps: int) -> dict[str, list[float]]:
    """Times per callable; each pair runs back to back, its order alternating per rep."""
    for f in fns.values():  # warm-up: allocator, mkldnn primitives, lazy imports
        f()
    times: dict[str, list[float]] = {n: [] for n in fns}

    def run(name: str) -> None:
        t = time.perf_counter()
        fns[name]()
        times[name].append(time.perf_counter() - t)

    for rep in range(reps):
        run("unit")
        for ours, ref in PAIRS:
            for name in (ours, ref) if rep % 2 == 0 else (ref, ours):
                run(name)
    return times


def _profile(arch: str, fns: dict) -> None:
    """torch.profiler of one call of our MWP and of TorchRay's: convolution share, op counts."""
    from torch.profiler import ProfilerActivity, profile

    for name in ("mwp", "torchray_eb"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fns[name]()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        conv = [e for e in events if "conv" in e.key and e.key.startswith("aten::")]
        conv_self = sum(e.self_cpu_time_total for e in conv)
        counts = ", ".join(f"{e.key} x{e.count}" for e in conv if e.self_cpu_time_total > 0)
        print(
            f"profile {arch} {name}: {total / 1e6:.3f} s of operators, convolutions "
            f"{100 * conv_self / total:.0f} % ({counts})"
        )


def _real_model():
    """bundled:efficientnet_lite0 and two photos at its input size (or a stand-in, said)."""
    import numpy as np
    import timm
    import torch
    import torch.nn.functional as F
    from skimage import data

    from xnn_toolkit import load_model

    try:
        lm = load_model("bundled:efficientnet_lite0")
        model, what = lm.model, "bundled:efficientnet_lite0 (ImageNet weights)"
        mean, std = lm.preprocessing.mean, lm.preprocessing.std
    except Exception as err:  # noqa: BLE001 - the bench still runs, and says what it ran
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
        what = f"timm tf_efficientnet_lite0, RANDOM weights ({type(err).__name__}: {err})"
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    photos = [data.chelsea(), data.coffee()]
    x = torch.stack(
        [
            F.interpolate(
                torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float() / 255,
                size=(224, 224),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
            for im in photos
        ]
    )
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return model, (x - m) / s, what


def _real(reps: int) -> list[tuple[str, float]]:
    import torch

    from xnn_toolkit.attribution import ContrastiveExcitationBackprop, ExcitationBackprop, GradCAM
    from xnn_toolkit.layers import default_read_layer

    model, x, what = _real_model()
    with torch.no_grad():
        classes = model(x).argmax(1)
    target = classes.tolist()
    read = default_read_layer(model)
    methods = {
        "mwp": ExcitationBackprop(model),
        "cmwp": ContrastiveExcitationBackprop(model),
        "mwp_input": ExcitationBackprop(model, layer="input"),
        "gradcam": GradCAM(model),
    }

    def unit():
        xg = x.clone().requires_grad_(True)
        out = model(xg)
        g = torch.zeros_like(out)
        g[torch.arange(len(target)), classes] = 1
        out.backward(g)

    fns = {"unit": unit, **{n: (lambda m=m: m.attribute(x, target)) for n, m in methods.items()}}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(reps):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for n in order:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) for n, v in times.items()}
    print(f"\nefficientnet_lite0: {what}; predicted classes {target}; read layer {read}")
    print(f"  median seconds and multiples of one forward + backward ({med['unit']:.3f} s)")
    results = []
    for n, t in med.items():
        print(f"  {n:13s} {t:8.3f} s  {t / med['unit']:6.2f} x")
        if n != "unit":
            results.append((f"efficientnet_lite0_{n}_over_unit", t / med["unit"]))
    for n in ("mwp", "mwp_input", "cmwp"):
        res = methods[n].attribute(x, target)
        books = res.metadata.conservation
        lost = books.lost_share
        print(
            f"  {n:13s} at {res.metadata.layer}: sum {books.read_sum.tolist()}, "
            f"|sum| {books.read_abs.tolist()}, lost {lost.tolist()}, "
            f"top losses {dict(list(books.by_layer.items())[:3])}, "
            f"fallbacks {len(res.metadata.fallbacks)}"
        )
        if n != "cmwp":
            results.append((f"efficientnet_lite0_{n}_lost_share_max", float(lost.max())))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 px, batch 2, one repetition")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--arch", nargs="*", default=["vgg16", "resnet50"])
    ap.add_argument(
        "--real",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the real EfficientNet-Lite0 on two photos (default on)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one MWP and one TorchRay call (convolution share)",
    )
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    size, batch = (64, 2) if args.quick else (224, 4)
    reps = args.reps or (1 if args.quick else 4)
    print(
        f"images {batch} x 3 x {size} x {size}, reps {reps}, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    results: list[tuple[str, float]] = []
    for arch in args.arch:
        model, x, classes = _setup(arch, size, batch)
        fns = _callables(arch, model, x, classes)
        times = _measure(fns, reps)
        if args.profile:
            _profile(arch, fns)
        med = {n: statistics.median(v) for n, v in times.items()}
        unit = med["unit"]
        print(f"\n{arch}: median seconds and multiples of one forward + backward ({unit:.3f} s)")
        for n, t in med.items():
            print(f"  {n:13s} {t:8.3f} s  {t / unit:6.2f} x")
        for ours, ref in PAIRS:  # median of the ratios of back-to-back runs
            ratio = statistics.median(a / b for a, b in zip(times[ours], times[ref]))
            results.append((f"{arch}_{ours}_over_{ref}", ratio))
        for n in med:
            if n != "unit":
                results.append((f"{arch}_{n}_over_unit", med[n] / unit))
    if args.real:
        results += _real(reps)
    print()
    for name, value in results:
        unit = "share" if name.endswith("lost_share_max") else "ratio"
        print(f"RESULT {name} {value:.4f} {unit}")


if __name__ == "__main__":
    main()
