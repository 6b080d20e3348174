"""The rest of the CAM family from the ``grad-cam`` package, behind the toolkit's call shape.

Score-CAM, Layer-CAM, XGrad-CAM, HiRes-CAM, Eigen-CAM, Eigen-Grad-CAM, Ablation-CAM and
FullGrad are pytorch-grad-cam's own implementations (``pip install xnn_toolkit[cam]``); the
bridge only resolves the read layer (the toolkit's default: the last stage), turns a
class or logit-mixture target into pytorch-grad-cam's per-image target callables, and runs
the call inside the model guard, so the model comes back unchanged and hook-free, also
when pytorch-grad-cam raises.

pytorch-grad-cam returns, per image, the ReLU of the map rescaled to ``[0, 1]`` and resized
to the input; that is both ``raw`` and ``heatmap`` here (``raw`` is ``N x H x W``), so the
numbers equal the package's own output.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch
from torch import nn

from ..errors import InputError, MissingExtraError
from ..layers import LayerSpec, resolve_layer
from ._capture import _note_output
from .base import Attribution, AttributionInfo, AttributionMethod, register_method
from .cam import _last_stage
from .targets import Class, Logits, Target

__all__ = [
    "AblationCAM",
    "EigenCAM",
    "EigenGradCAM",
    "FullGrad",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
]


def _grad_cam_module():
    try:
        return importlib.import_module("pytorch_grad_cam")
    except ImportError as err:
        raise MissingExtraError(
            "this CAM method is pytorch-grad-cam's implementation, which is not installed; "
            "install the extra with: pip install 'xnn_toolkit[cam]'"
        ) from err


class _SelectionTarget:
    """pytorch-grad-cam target callable: ``score = <g, output>`` for one image."""

    def __init__(self, g: torch.Tensor) -> None:
        self.g = g

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return (self.g.to(output) * output).sum()


class _GradCamPackageMethod(AttributionMethod):
    """Shared bridge to one ``pytorch_grad_cam`` class."""

    package_class: ClassVar[str] = ""
    #: constructor options of the package class that the bridge accepts
    options: ClassVar[tuple[str, ...]] = ()
    #: options the package reads as instance attributes instead of constructor arguments
    attributes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None, **kwargs: object):
        super().__init__(model, layer)
        accepted = self.options + self.attributes
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise InputError(
                f"{type(self).__name__} got unknown option(s) {unknown}; it accepts "
                f"{list(accepted) or 'none'}"
            )
        self.kwargs = kwargs
        _grad_cam_module()  # fail at construction, naming the extra

    def _as_target(self, target: object, n: int) -> Target:
        tgt = super()._as_target(target, n)
        if not isinstance(tgt, Class | Logits):
            raise InputError(
                f"{self.name} (pytorch-grad-cam) explains classes or logit mixtures, not "
                f"{tgt.describe()}; use gradcam or cmwp for units, channels or head outputs"
            )
        return tgt

    def _target_layers(self) -> tuple[str, list[nn.Module]]:
        read = self.layer if self.layer is not None else _last_stage(self.model)
        name, module = resolve_layer(self.model, read)
        return name, [module]

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        cls = getattr(_grad_cam_module(), self.package_class)
        name, layers = self._target_layers()
        shapes: list[tuple[int, ...]] = []
        handles = [
            m.register_forward_hook(lambda _m, _i, o: shapes.append(tuple(o.shape))) for m in layers
        ]
        try:
            with torch.no_grad():
                logits = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if any(len(s) != 4 for s in shapes):
            raise InputError(
                f"{self.name} needs a conv layer (N x K x h x w), but {name!r} gives shape "
                f"{shapes[0]}; pass a conv layer or layer=None (the last stage)"
            )
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise InputError(
                f"{self.name} needs a model that returns N x K logits, got "
                f"{getattr(logits, 'shape', type(logits).__name__)}"
            )
        _note_output(x, logits)
        sel = target.weights(logits).detach()
        targets = [_SelectionTarget(g) for g in sel]
        # Frozen parameters: the input carries the graph so activations still get gradients.
        inputs = x.clone().requires_grad_(True)
        ctor = {k: v for k, v in self.kwargs.items() if k in self.options}
        try:
            with cls(model=self.model, target_layers=layers, **ctor) as cam:
                for k in self.attributes:
                    if k in self.kwargs:
                        setattr(cam, k, self.kwargs[k])
                out = cam(input_tensor=inputs, targets=targets)
        except (ValueError, RuntimeError, IndexError) as err:
            raise InputError(
                f"pytorch-grad-cam's {self.package_class} failed at layer {name!r}: {err}; "
                "read at a conv layer whose output is N x K x h x w (or pass layer=None)"
            ) from err
        maps = torch.as_tensor(out, dtype=torch.float32).to(x.device)
        info = AttributionInfo(
            method=self.name,
            layer=name,
            target=target.describe(),
            params={"package": f"pytorch_grad_cam.{self.package_class}", **self.kwargs},
        )
        return Attribution(maps, maps.clone(), info)


@register_method("scorecam", "score_cam")
class ScoreCAM(_GradCamPackageMethod):
    """Score-CAM (Wang et al. 2020), pytorch-grad-cam's implementation.

    Parameters
    ----------
    model : nn.Module
        The network (returns ``N x K`` logits).
    layer : layer spec, optional
        The conv layer; default the last stage.
    **kwargs
        ``reshape_transform``, ``batch_size`` (masked copies per forward, default 16).
    """

    package_class = "ScoreCAM"
    options = ("reshape_transform",)
    attributes = ("batch_size",)


@register_method("layercam", "layer_cam")
class LayerCAM(_GradCamPackageMethod):
    """Layer-CAM (Jiang et al. 2021): ``ReLU(sum_k relu(g_k) * A_k)``, pytorch-grad-cam's."""

    package_class = "LayerCAM"
    options = ("reshape_transform",)


@register_method("xgradcam", "xgrad_cam")
class XGradCAM(_GradCamPackageMethod):
    """XGrad-CAM (Fu et al. 2020), pytorch-grad-cam's implementation."""

    package_class = "XGradCAM"
    options = ("reshape_transform",)


@register_method("hirescam", "hires_cam")
class HiResCAM(_GradCamPackageMethod):
    """HiRes-CAM (Draelos & Carin 2020): element-wise gradient times activation."""

    package_class = "HiResCAM"
    options = ("reshape_transform",)


@register_method("eigencam", "eigen_cam")
class EigenCAM(_GradCamPackageMethod):
    """Eigen-CAM (Muhammad & Yeasin 2020): first principal component of the activations.

    Class-agnostic: the target is validated but does not change the map.
    """

    package_class = "EigenCAM"
    options = ("reshape_transform",)


@register_method("eigengradcam", "eigen_grad_cam")
class EigenGradCAM(_GradCamPackageMethod):
    """Eigen-Grad-CAM: first principal component of gradient times activation."""

    package_class = "EigenGradCAM"
    options = ("reshape_transform",)


@register_method("ablationcam", "ablation_cam")
class AblationCAM(_GradCamPackageMethod):
    """Ablation-CAM (Desai & Ramaswamy 2020), pytorch-grad-cam's implementation.

    Parameters
    ----------
    model : nn.Module
    layer : layer spec, optional
    **kwargs
        ``batch_size`` (ablated copies per forward, default 32), ``ratio_channels_to_ablate``,
        ``reshape_transform``.
    """

    package_class = "AblationCAM"
    options = ("reshape_transform", "batch_size", "ratio_channels_to_ablate")


@register_method("fullgrad", "full_grad")
class FullGrad(_GradCamPackageMethod):
    """FullGrad (Srinivas & Fleuret 2019): input gradient plus every bias gradient.

    Reads every conv and BatchNorm layer itself, so ``layer`` must be ``None``; ``raw`` and
    ``heatmap`` are its ``N x H x W`` input-resolution map.
    """

    package_class = "FullGrad"
    options = ("reshape_transform",)

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None, **kwargs: object):
        if layer is not None:
            raise InputError(
                f"fullgrad reads all conv and BatchNorm layers itself; got layer={layer!r} "
                "(leave it None)"
            )
        super().__init__(model, layer, **kwargs)

    def _target_layers(self) -> tuple[str, list[nn.Module]]:
        return "all conv and BatchNorm layers", []
