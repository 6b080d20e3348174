"""Small test models and a model-state snapshot for the attribution tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xnn_toolkit._guard import HOOK_DICTS


def snapshot(model: nn.Module) -> dict:
    """Everything an attribution call must leave unchanged."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [
            [len(getattr(m, d)) for d in HOOK_DICTS if hasattr(m, d)] for m in model.modules()
        ],
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(now["state"][k], v), k
    assert now["training"] == snap["training"]
    assert now["requires_grad"] == snap["requires_grad"]
    for a, b in zip(now["grad"], snap["grad"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert now["hooks"] == snap["hooks"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            # some negative gammas: folding then flips weights (positive ones cancel in z+)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model


class ResidualConcatNet(nn.Module):
    """Bias-free ReLU network with functional and in-place residual additions, a
    concatenation, max / average / adaptive pooling; ``tap_*`` identities mark tensors that
    modules do not name."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.c4 = nn.Conv2d(16, 8, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.tap_add = nn.Identity()
        self.tap_iadd = nn.Identity()
        self.tap_cat = nn.Identity()
        self.fc = nn.Linear(8, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        y = torch.relu(self.tap_add(b + a))  # functional add: x + shortcut
        z = self.relu(self.c3(y))  # in-place ReLU module
        z += y  # in-place residual add
        z = self.tap_iadd(torch.add(z, y))  # torch.add
        q = self.tap_cat(torch.cat([F.max_pool2d(z, 2), F.avg_pool2d(z, 2)], 1))
        r = F.relu(self.c4(q), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(r, 1).flatten(1))


class PlainNet(nn.Sequential):
    """conv-ReLU-maxpool-conv-ReLU-avgpool-linear with biases (EB must ignore them)."""

    def __init__(self, classes: int = 5, size: int = 16) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(6 * (size // 4) ** 2, classes),
        )


class SpatialMask(nn.Module):
    """Multiplies by a fixed 0/1 mask: nothing outside the region reaches the output."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask[None, None].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def planted_net(size: int, region: tuple[int, int, int, int], classes: int = 3) -> nn.Module:
    """A CNN whose logits depend only on the pixels of ``region`` (y0, y1, x0, x1), grown by
    the first 3 x 3 convolution's one-pixel reach.

    Bias-free, so Excitation Backprop conserves mass exactly (c-MWP then sums to 0 and is
    positive somewhere); the second conv has positive weights and each class one small
    negative weight, so Grad-CAM's channel weights are positive and c-MWP's dual is not 0.
    """
    y0, y1, x0, x1 = region
    mask = torch.zeros(size, size)
    mask[y0:y1, x0:x1] = 1
    g = torch.Generator().manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        SpatialMask(mask),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(net[0].weight.shape, generator=g))
        net[3].weight.copy_(torch.rand(net[3].weight.shape, generator=g))
        w = torch.rand(classes, 8, generator=g) + 0.5
        w[torch.arange(classes), torch.arange(classes)] = -0.3
        net[7].weight.copy_(w)
    return net
