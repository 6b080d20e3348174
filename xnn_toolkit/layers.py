"""Find layers of a model: by dotted name, by module object, or by stage.

Stages follow timm's ``feature_info`` when the model has it; known torchvision families
(ResNet, VGG, DenseNet, MobileNet, EfficientNet, ConvNeXt, RegNet, ...) are described by
name patterns; any other network falls back to a shape probe that ends a stage at every
change of spatial resolution.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LayerNotFoundError, close_matches

__all__ = ["Stage", "LayerSpec", "list_layers", "resolve_layer", "stages", "default_read_layer"]

LayerSpec = str | nn.Module | int


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone: its last module, its channels and its stride to the input.

    Attributes
    ----------
    name : str
        Dotted module name of the stage's output.
    channels : int or None
        Number of output channels, when known.
    reduction : int or None
        Total stride relative to the input, when known.
    """

    name: str
    channels: int | None = None
    reduction: int | None = None


def list_layers(model: nn.Module, kind: type | tuple[type, ...] | None = None) -> list[str]:
    """Dotted names of the model's modules (the root excluded), in definition order.

    Parameters
    ----------
    model : nn.Module
        Any network.
    kind : type or tuple of types, optional
        Keep only modules of these types (e.g. ``nn.Conv2d``).

    Returns
    -------
    list of str
    """
    return [
        name
        for name, module in model.named_modules()
        if name and (kind is None or isinstance(module, kind))
    ]


def resolve_layer(model: nn.Module, layer: LayerSpec) -> tuple[str, nn.Module]:
    """Turn a layer specification into ``(dotted_name, module)``.

    Parameters
    ----------
    model : nn.Module
        The network that holds the layer.
    layer : str, nn.Module or int
        A dotted name (``"layer3"``, ``"features.23"``), the module object itself, an
        integer stage index into :func:`stages` (negative counts from the end), or the
        strings ``"stage:N"`` / ``"default"`` (see :func:`default_read_layer`).

    Returns
    -------
    (str, nn.Module)

    Raises
    ------
    LayerNotFoundError
        When nothing matches; the message lists the closest names.
    """
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer and name:
                return name, module
        raise LayerNotFoundError(
            f"the module {type(layer).__name__} is not a submodule of "
            f"{type(model).__name__}; pass one of its own modules or a dotted name"
        )
    if isinstance(layer, bool) or not isinstance(layer, int | str):
        raise LayerNotFoundError(
            f"layer must be a dotted name, a module or a stage index, got {type(layer).__name__}"
        )
    if isinstance(layer, str) and layer == "default":
        return resolve_layer(model, default_read_layer(model))
    if isinstance(layer, str) and layer.startswith("stage:"):
        try:
            layer = int(layer.split(":", 1)[1])
        except ValueError:
            raise LayerNotFoundError(f"bad stage spec {layer!r}; expected 'stage:N'") from None
    if isinstance(layer, int):
        st = stages(model)
        if not -len(st) <= layer < len(st):
            raise LayerNotFoundError(
                f"layer {layer}: stage {layer} out of range: {type(model).__name__} has "
                f"{len(st)} stages "
                f"({', '.join(s.name for s in st)})"
            )
        name = st[layer].name
        return name, model.get_submodule(name)
    modules = dict(model.named_modules())
    if layer in modules and layer:
        return layer, modules[layer]
    raise LayerNotFoundError(
        f"no layer named {layer!r} in {type(model).__name__}; "
        + close_matches(layer, [n for n in modules if n])
    )


def _timm_stages(model: nn.Module) -> list[Stage] | None:
    info = getattr(model, "feature_info", None)
    if not isinstance(info, list | tuple) or not info:
        return None
    out = []
    names = dict(model.named_modules())
    for entry in info:
        if not isinstance(entry, dict) or "module" not in entry:
            return None
        name = entry["module"]
        if name not in names:
            # timm names some stages with '_' where the module path has '.'
            alt = name.replace("_", ".")
            if alt not in names:
                return None
            name = alt
        out.append(Stage(name, entry.get("num_chs"), entry.get("reduction")))
    return out


def _pattern_stages(model: nn.Module) -> list[Stage] | None:
    names = [n for n, _ in model.named_modules() if n]
    top = set(names)
    if {"layer1", "layer2", "layer3", "layer4"} <= top:  # torchvision ResNet / ResNeXt
        return [Stage(f"layer{i}") for i in range(1, 5)]
    dense = [n for n in names if n.startswith("features.denseblock") and n.count(".") == 1]
    if dense:  # torchvision DenseNet: every dense block ends a stage
        return [Stage(n) for n in dense]
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        pools = [f"features.{i}" for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        if len(pools) >= 3:  # VGG-style: stages end at the pooling layers
            return [Stage(p) for p in pools]
    return None


def _probe_stages(model: nn.Module) -> list[Stage]:
    """End a stage at the last body block before each change of spatial size.

    The body is the ``features`` (or ``trunk_output``, ``layers``) sequence when the model has one,
    otherwise its top-level children; their outputs are NCHW in every torchvision family.
    """
    body_name = next(
        (
            n
            for n in ("features", "trunk_output", "layers")
            if isinstance(getattr(model, n, None), nn.Module)
        ),
        "",
    )
    body = model.get_submodule(body_name) if body_name else model
    prefix = body_name + "." if body_name else ""
    size, runs = _probe(model, {prefix + n: m for n, m in body.named_children()})
    order = [(name, shape[-1], shape[1]) for name, shape in runs if len(shape) == 4]
    # Global pools emit 1 x 1 maps and some blocks upsample: keep only outputs no smaller
    # than anything after them.
    kept: list[tuple[str, int, int]] = []
    largest_after = 0
    for item in reversed(order):
        if item[1] > 1 and item[1] >= largest_after:
            kept.append(item)
            largest_after = item[1]
    kept.reverse()
    out = []
    for i, (name, width, ch) in enumerate(kept):
        if i + 1 == len(kept) or kept[i + 1][1] != width:
            out.append(Stage(name, ch, size // width))
    return out


def stages(model: nn.Module) -> list[Stage]:
    """The model's stages, shallow to deep.

    From timm's ``feature_info`` when present, from known torchvision layouts otherwise,
    and else from a probe forward pass on a 64 x 64 input.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of Stage
    """
    return _timm_stages(model) or _pattern_stages(model) or _probe_stages(model)


def _probe_sizes(model: nn.Module) -> list[int]:
    """Input sizes to probe a model with: 64, then its data config's size, then 224.

    Models with a fixed input size (a flatten + linear head) only run at their own size,
    which timm and the toolkit's cards record as ``pretrained_cfg["input_size"]``.
    """
    sizes = [64]  # cheap, and enough for every network that takes any size
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if isinstance(size, list | tuple) and len(size) == 3 and int(size[-1]) > 0:
            sizes.append(int(size[-1]))
    for size in (64, 224):
        if size not in sizes:
            sizes.append(size)
    return sizes


def _probe(
    model: nn.Module, modules: dict[str, nn.Module]
) -> tuple[int, list[tuple[str, tuple[int, ...]]]]:
    """Run a zero image through ``model`` and list the output shapes of ``modules``.

    The first size of :func:`_probe_sizes` that runs is used; the model is left as it was.

    Returns
    -------
    size : int
        The input size that ran (0 when none did).
    runs : list of (str, tuple of int)
        ``(name, shape)`` of every tensor output of a watched module, in call order.
    """
    from ._guard import model_guard

    runs: list[tuple[str, tuple[int, ...]]] = []

    def make(name: str):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                runs.append((name, tuple(out.shape)))

        return hook

    in_ch = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)
    with model_guard(model, eval_mode=True):
        handles = [m.register_forward_hook(make(n)) for n, m in modules.items()]
        try:
            for size in _probe_sizes(model):
                runs.clear()
                try:
                    with torch.no_grad():
                        model(torch.zeros(1, in_ch, size, size))
                    return size, runs
                except Exception:  # noqa: BLE001 - a failed probe: try the next size
                    continue
        finally:
            for h in handles:
                h.remove()
    return 0, []


def _nearest_stride(st: list[Stage], stride: int) -> Stage:
    """The deepest stage whose reduction is nearest ``stride`` (on a log scale)."""
    known = [s for s in st if s.reduction]
    if not known:
        return st[len(st) // 2]
    best = min(abs(math.log2(s.reduction) - math.log2(stride)) for s in known)  # type: ignore[arg-type]
    return [s for s in known if abs(math.log2(s.reduction) - math.log2(stride)) == best][-1]  # type: ignore[arg-type]


_MAIN_PATH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _main_path(model: nn.Module, name: str, taps: list[str]) -> str:
    """The block output that holds ``name`` when ``name`` is a tap inside a block.

    timm's ``feature_info`` sometimes names a module inside a residual block (xception's
    ``blocks.2.stack.act3``, before the shortcut is added): only part of the signal passes
    there. The outermost enclosing module with the tap's resolution that holds no other
    stage tap is the block's output on the main path; when the block itself downsamples
    (the tap is taken before its strided convolution), the previous block's output is.
    """
    parts = name.split(".")
    if len(parts) <= 2:
        return name
    cache = _MAIN_PATH.setdefault(model, {})
    if name in cache:
        return cache[name]

    modules = dict(model.named_modules())
    ancestors = [".".join(parts[:i]) for i in range(1, len(parts))]
    ancestors = [
        a
        for a in ancestors
        if a in modules and not any(t != name and t.startswith(a + ".") for t in taps)
    ]
    outer = ancestors[0] if ancestors else ""
    parent = outer.rpartition(".")[0]
    siblings = [f"{parent}.{n}" for n, _ in modules[parent].named_children()] if parent else []
    watched = dict.fromkeys([*ancestors, name, *siblings])
    shapes: dict[str, tuple] = {}
    for key, shape in _probe(model, {k: modules[k] for k in watched})[1]:
        shapes.setdefault(key, shape)
    chosen = name
    spatial = shapes[name][2:] if name in shapes else None
    if spatial is not None and ancestors:
        same = [a for a in ancestors if a in shapes and shapes[a][2:] == spatial]
        if same:
            chosen = same[0]  # the outermost block with the tap's resolution
        elif outer in siblings and siblings.index(outer) > 0:
            # the tap sits before the block's own downsampling: the main path at the tap's
            # resolution is the output of the block before it
            prev = siblings[siblings.index(outer) - 1]
            if shapes.get(prev, ())[2:] == spatial:
                chosen = prev
    cache[name] = chosen
    return chosen


def default_read_layer(model: nn.Module) -> str:
    """The layer where heatmaps are read by default.

    VGG-style nets: the fourth pooling layer (pool4); ResNets: the end of stage 3
    (``layer3``); otherwise the output of the stage whose stride is nearest 16 (the stride of
    pool4 and ResNet's ``layer3``, measured, so multi-branch nets such as HRNet are covered),
    taken on the main path: when timm names a tap inside a residual block, the block's
    output is used instead.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    str
        A dotted layer name.
    """
    names = {n for n, _ in model.named_modules()}
    if {"layer3", "layer4"} <= names:
        return "layer3"
    feats = getattr(model, "features", None)
    if isinstance(feats, nn.Sequential):
        pools = [f"features.{i}" for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
        if len(pools) >= 4:
            return pools[3]
    st = stages(model)
    if not st:
        raise LayerNotFoundError(
            f"could not find stages in {type(model).__name__}; pass layer= explicitly"
        )
    stage = _nearest_stride(st, 16)
    if stage.reduction != 16:
        found = _module_at_stride(model, 16)
        if found is not None:
            return found
    return _main_path(model, stage.name, [s.name for s in st])


def _module_at_stride(model: nn.Module, stride: int) -> str | None:
    """The last module to output a map at ``stride``, the shallowest of those (a probe).

    For multi-branch networks (HRNet) whose stages output lists of maps, so no stage
    output is a single map at the wanted stride.
    """
    size, shapes = _probe(model, {n: m for n, m in model.named_modules() if n})
    runs = [(n, size // sh[-1]) for n, sh in shapes if len(sh) == 4 and sh[-1] > 0]
    at = [(i, name) for i, (name, r) in enumerate(runs) if r == stride]
    if not at:
        return None
    depth = min(name.count(".") for _, name in at)
    return [name for _, name in at if name.count(".") == depth][-1]
