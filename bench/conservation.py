"""Excitation Backprop conservation on many timm / torchvision architectures.

Random weights (seed 0), one 64 x 64 image (seed 1), target class 3, CPU, no network. For
each architecture: the default read layer, the MWP read at the input (its sum, which is 1
minus the booked loss), the share lost and where most of it was lost, the c-MWP sum (0 when
nothing is lost), and at the default read layer the total ``|P|`` with today's positive split
of residual sums against TorchRay's proportional split (which makes mass where branches
cancel), plus whether ``stabilizer=0`` gives a NaN.

Run ``.venv/bin/python bench/conservation.py`` (about a minute on 2 cores); ``--arch`` picks
some. Ends with ``RESULT`` lines: how many architectures conserve within 1e-3 at the input,
how many lose more but book it, and how many are unbooked (must be 0).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ARCHS = [
    "timm:repvgg_a0",
    "timm:hrnet_w18_small",
    "timm:xception41",
    "tv:googlenet",
    "timm:efficientnet_b0",
    "timm:tf_efficientnet_lite0",
    "tv:mobilenet_v2",
    "tv:mobilenet_v3_small",
    "timm:mobilenetv3_small_050",
    "tv:shufflenet_v2_x0_5",
    "timm:ghostnet_100",
    "timm:fastvit_t8",
    "timm:convnext_atto",
    "tv:densenet121",
    "timm:regnetx_002",
    "tv:regnet_y_400mf",
    "tv:resnet18",
    "tv:resnext50_32x4d",
    "tv:vgg11",
    "tv:alexnet",
    "tv:squeezenet1_0",
    "timm:mnasnet_small",
    "timm:ese_vovnet19b_dw",
    "timm:hgnetv2_b0",
    "timm:dla34",
    "timm:cspresnet50",
    "timm:dpn48b",
    "timm:selecsls42b",
]


def _build(spec: str):
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    kind, name = spec.split(":")
    if kind == "tv":
        kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
        return getattr(torchvision.models, name)(num_classes=10, **kw).eval()
    return timm.create_model(name, pretrained=False, num_classes=10).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="*", default=ARCHS)
    args = ap.parse_args()

    import torch

    from xnn_toolkit.attribution import ContrastiveExcitationBackprop, ExcitationBackprop

    warnings.filterwarnings("ignore")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    counts = {"conserved": 0, "booked": 0, "unbooked": 0, "nan": 0, "negative": 0}
    print(
        "| architecture | read layer | MWP sum at input | lost | most lost at | c-MWP sum "
        "| sum abs at read layer (positive / proportional split) |"
    )
    print("|---|---|---|---|---|---|---|")
    for spec in args.arch:
        net = _build(spec)
        res = ExcitationBackprop(net, layer="input").attribute(x, 3)
        books = res.metadata.conservation
        total = float(books.read_sum[0])
        lost = float(books.lost[0])
        worst = next(iter(books.by_layer), "-") if lost > 1e-4 else "-"
        csum = float(ContrastiveExcitationBackprop(net, layer="input").attribute(x, 3).raw.sum())
        read = ExcitationBackprop(net).attribute(x, 3)
        old = ExcitationBackprop(net, residual="proportional").attribute(x, 3)
        zero = ExcitationBackprop(net, stabilizer=0.0).attribute(x, 3)
        if abs(total - 1) < 1e-3:
            counts["conserved"] += 1
        elif abs(total + lost - 1) < 1e-4:
            counts["booked"] += 1
        else:
            counts["unbooked"] += 1
        counts["nan"] += int(not bool(torch.isfinite(zero.raw).all()))
        counts["negative"] += int(float(res.raw.min()) < -1e-9 * float(res.raw.abs().max()))
        print(
            f"| {spec} | {read.metadata.layer} | {total:.6f} | {100 * lost:.2f} % | {worst} "
            f"| {csum:+.1e} | {float(read.metadata.conservation.read_abs[0]):.4f} / "
            f"{float(old.metadata.conservation.read_abs[0]):.4f} |",
            flush=True,
        )
    print()
    for name, value in counts.items():
        print(f"RESULT conservation_{name} {value} architectures")


if __name__ == "__main__":
    main()
