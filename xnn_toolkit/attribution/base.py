"""One call shape for every attribution method, its result type, and the method registry.

``Method(model, layer=...).attribute(x, target) -> Attribution`` (captum style), and the
functional :func:`explain`. Every call runs inside :func:`xnn_toolkit._guard.model_guard`
with the parameters frozen, so the user's model is left exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._guard import model_guard
from ..errors import InputError, SpecError, close_matches
from ..layers import LayerSpec
from .targets import Target, as_target

__all__ = [
    "Attribution",
    "Conservation",
    "AttributionInfo",
    "AttributionMethod",
    "available_methods",
    "explain",
    "get_method",
    "register_method",
]


@dataclass(frozen=True)
class Conservation:
    """Where the winning probability of an Excitation Backprop call went, per image.

    The top signal carries ``top`` (1 for a one-hot class); the rules pass it down layer by
    layer; what reaches the read layer sums to ``read_sum``. The difference is ``lost``:
    ``P`` that arrived at units with no positive contribution (``z+ = 0``; a depthwise filter
    with no positive weight, a pooling window with no positive value) and the stabiliser's
    share, booked where it happened. ``top - lost - read_sum`` is what operations without a
    rule (plain-gradient fallbacks) changed.

    Attributes
    ----------
    top : Tensor
        ``N`` float64: mass of the top signal.
    read_sum : Tensor
        ``N``: sum of the map at the read layer (MWP: ``top - lost``; c-MWP: near 0).
    read_abs : Tensor
        ``N``: sum of its absolute values.
    lost : Tensor
        ``N``: mass not passed down, all layers together (c-MWP: that of the target half at
        the top layer, then that of the difference below it).
    lost_zero : Tensor
        ``N``: the part of ``lost`` at conv, linear and pooling calls.
    by_layer : dict of str to float
        Share of ``top`` lost at each layer (mean over images), largest first.
    """

    top: torch.Tensor
    read_sum: torch.Tensor
    read_abs: torch.Tensor
    lost: torch.Tensor
    lost_zero: torch.Tensor
    by_layer: dict[str, float] = field(default_factory=dict)

    @property
    def lost_share(self) -> torch.Tensor:
        """``N``: ``lost / top`` (0 where ``top`` is 0)."""
        return torch.where(self.top != 0, self.lost / self.top.where(self.top != 0, 1.0), 0.0)


@dataclass(frozen=True)
class AttributionInfo:
    """How an attribution was computed.

    Attributes
    ----------
    method : str
        Registry name of the method (``"mwp"``, ``"cmwp"``, ``"gradcam"``, ...).
    layer : str
        Where the raw map was read: a dotted layer name or ``"input"``.
    target : str
        Description of the target.
    rules : dict of str to str
        Rule applied per module type (or ``"Container.op"`` for functional calls).
    fallbacks : tuple of str
        Every place a rule was undefined and the documented fallback taken, with where.
    batchnorm : str
        BatchNorm treatment (``"fold"``, ``"identity"``, or ``"n/a"``).
    params : dict of str to object
        Hyperparameters of the call (stabiliser, blur sigma, steps, ...).
    conservation : Conservation or None
        Excitation Backprop: where the winning probability went (``None`` for other
        methods).
    """

    method: str
    layer: str
    target: str
    rules: dict[str, str] = field(default_factory=dict)
    fallbacks: tuple[str, ...] = ()
    batchnorm: str = "n/a"
    params: dict[str, object] = field(default_factory=dict)
    conservation: Conservation | None = None


@dataclass
class Attribution:
    """The result of one attribution call.

    Attributes
    ----------
    raw : Tensor
        The map where the method reads it: ``N x C x h x w`` at the read layer or the input
        (Excitation Backprop, Captum methods, GradMap), or ``N x h x w`` (CAM, Grad-CAM,
        ActivMap).
    heatmap : Tensor
        ``N x H x W`` float at input resolution: ``raw`` summed over channels, clamped at 0
        where the method says so, bilinearly upsampled.
    metadata : AttributionInfo
        Method, layer, rules, fallbacks, BatchNorm treatment, parameters.
    mask : Tensor or None
        ``N x H x W`` bool segmentation where the method defines one (CAM: top 30 %,
        GradMap: > 1.0, ActivMap: above the filter's dataset threshold), else ``None``.
    """

    raw: torch.Tensor
    heatmap: torch.Tensor
    metadata: AttributionInfo
    mask: torch.Tensor | None = None


_REGISTRY: dict[str, type[AttributionMethod]] = {}


def register_method(*names: str) -> Callable[[type[AttributionMethod]], type[AttributionMethod]]:
    """Class decorator: make a method available to :func:`explain` under ``names``.

    Parameters
    ----------
    *names : str
        The first is the canonical name (stored as ``cls.name``); the rest are aliases.
    """

    def deco(cls: type[AttributionMethod]) -> type[AttributionMethod]:
        cls.name = names[0]
        for n in names:
            _REGISTRY[n] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    """Names accepted by :func:`explain` (canonical names and aliases), sorted.

    Returns
    -------
    list of str
    """
    return sorted(_REGISTRY)


def get_method(name: str) -> type[AttributionMethod]:
    """The method class registered under ``name``.

    Raises
    ------
    SpecError
        For an unknown name, with the closest registered names.
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if not isinstance(key, str) or key not in _REGISTRY:
        raise SpecError(
            f"unknown attribution method {name!r}; " + close_matches(str(name), _REGISTRY)
        )
    return _REGISTRY[key]


def explain(
    model: nn.Module,
    x: torch.Tensor,
    target: object = None,
    method: str = "cmwp",
    layer: LayerSpec | None = None,
    **kw: object,
) -> Attribution:
    """Explain ``target`` on the images ``x`` with a named method.

    Parameters
    ----------
    model : nn.Module
        The network (left exactly unchanged).
    x : Tensor
        ``N x C x H x W`` images.
    target : Target, int, sequence of int, Tensor or None
        See :func:`xnn_toolkit.attribution.targets.as_target`.
    method : str
        One of :func:`available_methods`.
    layer : layer spec, optional
        Read layer (method-specific default).
    **kw
        Hyperparameters of the method's constructor.

    Returns
    -------
    Attribution
    """
    return get_method(method)(model, layer=layer, **kw).attribute(x, target)


class AttributionMethod:
    """Base class: validation, guarding and the shared call shape.

    Subclasses implement :meth:`_attribute` (called inside the model guard, parameters
    frozen, with a validated ``N x C x H x W`` tensor and a :class:`Target`).

    Parameters
    ----------
    model : nn.Module
        The network to explain.
    layer : layer spec, optional
        Where to read the map; method-specific default when ``None``.
    """

    name: ClassVar[str] = ""
    #: The method picks its own read layer (the input, or CAM's pooled feature map): callers
    #: that have a read layer for every method (reports, the scoring runner) leave it ``None``.
    reads_own_layer: ClassVar[bool] = False
    #: What a target of the method is: ``"class"`` (a logit, a head output) or ``"filter"``
    #: (one channel of a layer: GradMap, ActivMap).
    explains: ClassVar[str] = "class"

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer = layer

    def attribute(self, inputs: torch.Tensor, target: object = None) -> Attribution:
        """Attribute ``target`` to the input (or read layer) for a batch of images.

        Parameters
        ----------
        inputs : Tensor
            ``N x C x H x W`` float images.
        target : Target, int, sequence of int, Tensor or None
            One target per image (see :func:`~xnn_toolkit.attribution.targets.as_target`).

        Returns
        -------
        Attribution
        """
        x = _check_inputs(inputs, self.model)
        tgt = self._as_target(target, x.shape[0])
        with model_guard(self.model, eval_mode=True, freeze=True):
            return self._attribute(x, tgt)

    def _as_target(self, target: object, n: int) -> Target:
        return as_target(target, n)

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r})"


def _check_inputs(inputs: object, model: nn.Module | None = None) -> torch.Tensor:
    """The batch a method may use: 4-D, float, finite, the model's channels, dtype and
    device (a float64 batch for a float32 model is converted; NaN is refused, since it
    would come back as a NaN heatmap that looks like a result)."""
    from ..preprocessing import _first_conv_channels, check_input

    if not isinstance(inputs, torch.Tensor):
        raise InputError(f"inputs must be a tensor N x C x H x W, got {type(inputs).__name__}")
    if inputs.dim() != 4 or not inputs.is_floating_point() or inputs.shape[0] == 0:
        raise InputError(
            f"inputs must be a non-empty float tensor N x C x H x W, got {inputs.dtype} of "
            f"shape {tuple(inputs.shape)}; add a batch dimension with x[None] for one image"
        )
    chans = _first_conv_channels(model) if model is not None else None
    try:
        check_input(inputs, in_chans=chans)
    except InputError as exc:
        raise InputError(f"inputs: {exc}") from None
    param = (
        next((p for p in model.parameters() if p.is_floating_point()), None)
        if (model is not None)
        else None
    )
    if param is not None:
        if inputs.device != param.device:
            raise InputError(
                f"inputs are on {inputs.device}, the model on {param.device}: move them with "
                f"inputs.to({str(param.device)!r})"
            )
        if inputs.dtype != param.dtype:
            inputs = inputs.to(param.dtype)
    return inputs.detach()


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``N x h x w`` maps to ``N x H x W`` by bilinear interpolation (align_corners=False)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.clone()
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _heatmap(raw: torch.Tensor, size: tuple[int, int], clamp: bool) -> torch.Tensor:
    """Sum ``N x C x h x w`` over channels, clamp at 0 if asked, upsample to ``size``."""
    if raw.dim() != 4:
        raise InputError(
            f"the map has shape {tuple(raw.shape)}; heatmaps need a spatial N x C x h x w "
            "layer: read at a conv layer or the input"
        )
    m = raw.sum(1)
    if clamp:
        m = m.clamp(min=0)
    return _upsample(m, size)
