"""Where class-path masks go in a network (:doc:`/methods/paths`, "Mask placement").

The NAD paper (Hu et al. 2021) masks the output of

- every ReLU'd convolution of a plain (VGG-style) network, or the pooling layer right after
  it when one follows;
- the stem and every residual block of a ResNet;
- every dense block and every transition of a DenseNet.

:func:`auto_layers` finds these places by name patterns (ResNet ``layerN`` stages,
DenseNet ``denseblockN`` / ``transitionN``) and, for plain networks, by tracing the order in
which leaf modules run on an example input. :func:`check_layers` validates any list of
places (automatic or the user's): each must be a module that runs exactly once per forward
and outputs ``N x C x H x W`` or ``N x C``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from .._guard import model_guard
from ..errors import InputError, LayerNotFoundError
from ..layers import resolve_layer

__all__ = ["auto_layers", "check_layers", "trace_calls"]

_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.LPPool2d)
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def trace_calls(
    model: nn.Module, example: torch.Tensor, names: Sequence[str] | None = None
) -> list[tuple[str, tuple[int, ...] | None]]:
    """Run one forward and list module calls in execution order.

    Parameters
    ----------
    model : nn.Module
        The network (left exactly as it was).
    example : Tensor
        ``N x ...`` input batch (a single image is enough).
    names : sequence of str, optional
        Modules to watch (default: every leaf module).

    Returns
    -------
    list of (str, tuple or None)
        ``(name, output shape)`` per call (shape ``None`` for non-tensor outputs); a module
        called twice appears twice.
    """
    modules = dict(model.named_modules())
    if names is None:
        names = [n for n, m in modules.items() if n and not list(m.children())]
    calls: list[tuple[str, tuple[int, ...] | None]] = []

    def make(name: str):
        def hook(_m, _i, out):
            t = out[0] if isinstance(out, list | tuple) and out else out
            calls.append((name, tuple(t.shape) if isinstance(t, torch.Tensor) else None))

        return hook

    with model_guard(model, eval_mode=True):
        handles = [modules[n].register_forward_hook(make(n)) for n in names]
        try:
            with torch.no_grad():
                model(example)
        finally:
            for h in handles:
                h.remove()
    return calls


def _resnet_layers(model: nn.Module, example: torch.Tensor) -> list[str] | None:
    stages = []
    for name, child in model.named_children():
        if re.fullmatch(r"layer\d+", name) and isinstance(child, nn.Sequential):
            stages.append((int(name[5:]), name, child))
    if not stages:
        return None
    stages.sort()
    blocks = [f"{name}.{sub}" for _, name, seq in stages for sub, _ in seq.named_children()]
    # The stem is whatever top-level module runs last before the first block, with a 4-D
    # output (timm's ``act1`` when its max-pool is an Identity, torchvision's ``maxpool``).
    top = [n for n, _ in model.named_children()]
    calls = trace_calls(model, example, top)
    first = stages[0][1]
    stem = None
    for name, shape in calls:
        if name == first:
            break
        module = model.get_submodule(name)
        if shape is not None and len(shape) == 4 and not isinstance(module, nn.Identity):
            stem = name
    return ([stem] if stem else []) + blocks


def _densenet_layers(model: nn.Module) -> list[str] | None:
    out = [
        n for n, _ in model.named_modules() if re.fullmatch(r"(.*\.)?(denseblock|transition)\d+", n)
    ]
    return out or None


def _plain_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """ReLU'd convolutions in execution order; the pooling layer instead when one follows."""
    calls = trace_calls(model, example)
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    out: list[str] = []
    pending = False  # a convolution ran and no activation yet
    for i, (name, shape) in enumerate(calls):
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            pending = True
        elif isinstance(module, _NORMS) and pending:
            continue
        elif isinstance(module, _ACTIVATIONS) and pending:
            pending = False
            if shape is None or len(shape) != 4 or counts[name] != 1:
                continue
            place = name
            if i + 1 < len(calls):
                nxt, nshape = calls[i + 1]
                if (
                    isinstance(model.get_submodule(nxt), _POOLS)
                    and counts[nxt] == 1
                    and nshape is not None
                    and len(nshape) == 4
                ):
                    place = nxt
            out.append(place)
        else:
            pending = False
    return out


def auto_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Mask placement of :doc:`/methods/paths` for VGG-, ResNet- and DenseNet-like networks.

    Parameters
    ----------
    model : nn.Module
        The frozen network.
    example : Tensor
        An input batch ``N x C x H x W`` (used to trace plain networks and ResNet stems).

    Returns
    -------
    list of str
        Dotted layer names, shallow to deep.

    Raises
    ------
    LayerNotFoundError
        When no place is found; pass the layer names explicitly then.
    """
    found = _resnet_layers(model, example) or _densenet_layers(model)
    if not found:
        found = _plain_layers(model, example)
    if not found:
        raise LayerNotFoundError(
            f"found no place for class-path masks in {type(model).__name__}: no ResNet "
            "stages (layer1..), no DenseNet blocks and no convolution followed by an "
            "activation module; pass layers=[...] with the dotted names to mask"
        )
    return found


def check_layers(
    model: nn.Module, layers: Sequence[object], example: torch.Tensor
) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Resolve mask places and check that each can hold a channel mask.

    Parameters
    ----------
    model : nn.Module
    layers : sequence of layer specs
        Dotted names, modules or stage indices (see :func:`xnn_toolkit.layers.resolve_layer`).
    example : Tensor
        An input batch for a probe forward.

    Returns
    -------
    (list of str, dict)
        The dotted names (in the order given) and each one's output shape on ``example``.

    Raises
    ------
    LayerNotFoundError
        Unknown layer.
    InputError
        A layer listed twice, one that runs more or less than once per forward (a shared
        activation module, say: mask its parent block instead), or one whose output is not
        ``N x C x H x W`` / ``N x C`` (e.g. ``N x L x D`` tokens).
    """
    if len(layers) == 0:
        raise InputError("layers is empty; pass 'auto' or a list of dotted layer names")
    names = [resolve_layer(model, spec)[0] for spec in layers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"layers {dup} are listed more than once; list each layer once")
    calls = trace_calls(model, example, names)
    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        hits = [s for n, s in calls if n == name]
        if len(hits) != 1:
            raise InputError(
                f"layer {name!r} runs {len(hits)} times per forward pass; a mask needs a "
                "module that runs exactly once (a shared activation module runs once per "
                "use): mask its parent block or a module of its own instead"
            )
        shape = hits[0]
        if shape is None or len(shape) not in (2, 4):
            raise InputError(
                f"layer {name!r} outputs shape {shape}; channel masks need N x C x H x W "
                "(conv) or N x C (fully connected) outputs"
            )
        shapes[name] = shape
    return names, shapes
