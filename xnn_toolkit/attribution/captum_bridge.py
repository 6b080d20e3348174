"""Standard gradient baselines from Captum behind the toolkit's call shape (:doc:`/methods/cam`).

Saliency, InputXGradient, IntegratedGradients, GuidedBackprop and Occlusion are Captum's
own implementations (not re-implemented here). The bridge turns any
:class:`~xnn_toolkit.attribution.targets.Target` into the scalar Captum explains:
``score_n = <G_n, T(O)_n>``, with the selection ``G`` computed once from a forward pass and
handed to Captum as an additional forward argument, so that Captum's own batch expansion
(integration steps, occlusion windows) keeps one target per image.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..layers import LayerSpec
from ._capture import _run
from .base import Attribution, AttributionInfo, AttributionMethod, _heatmap, register_method
from .targets import Target

__all__ = ["Saliency", "InputXGradient", "IntegratedGradients", "GuidedBackprop", "Occlusion"]


class _ScoreModel(nn.Module):
    """``forward(x, G) -> N scores`` of a target; a Module so Captum can hook its ReLUs."""

    def __init__(self, model: nn.Module, target: Target) -> None:
        super().__init__()
        self.model = model
        self._target = target

    def forward(self, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        top = _run(self.model, x, self._target, None).top
        return (sel.to(top) * top).flatten(1).sum(1)


class _CaptumMethod(AttributionMethod):
    """Shared bridge: build the score model, call Captum, wrap the result."""

    captum_name: ClassVar[str] = ""
    reads_own_layer = True  # attributions at the input
    needs_module: ClassVar[bool] = False

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None, **kwargs: object):
        super().__init__(model, layer)
        if layer not in (None, "input"):
            raise InputError(
                f"{type(self).__name__} attributes to the input; got layer={layer!r} "
                "(leave it None)"
            )
        self.kwargs = kwargs

    def _captum(self, forward: nn.Module):
        import captum.attr as ca

        cls = getattr(ca, self.captum_name)
        return cls(forward)

    def _call_kwargs(self, x: torch.Tensor) -> dict[str, object]:
        return dict(self.kwargs)

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        with torch.no_grad():
            top = _run(self.model, x, target, None).top
        sel = target.weights(top).detach()
        forward = _ScoreModel(self.model, target)
        method = self._captum(forward)
        kwargs = self._call_kwargs(x)
        with warnings.catch_warnings():
            # Captum announces its temporary ReLU hooks; they are removed by Captum and the
            # model guard alike.
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            inputs = x.clone().requires_grad_(True)
            raw = method.attribute(inputs, additional_forward_args=(sel,), **kwargs).detach()
        info = AttributionInfo(
            method=self.name,
            layer="input",
            target=target.describe(),
            params={"captum": self.captum_name, **{k: _plain(v) for k, v in kwargs.items()}},
        )
        return Attribution(raw, _heatmap(raw, tuple(x.shape[-2:]), clamp=False), info)


def _plain(v: object) -> object:
    return v.tolist() if isinstance(v, torch.Tensor) and v.numel() <= 16 else v


@register_method("saliency", "gradient")
class Saliency(_CaptumMethod):
    """Captum's Saliency: ``|d score / d x|`` (``abs=True`` by default).

    Parameters
    ----------
    model : nn.Module
    layer : None
        Always the input.
    **kwargs
        Passed to ``captum.attr.Saliency.attribute`` (e.g. ``abs=False``).

    Notes
    -----
    ``raw`` is ``N x C x H x W``; ``heatmap`` its channel sum.
    """

    captum_name = "Saliency"


@register_method("input_x_gradient", "inputxgradient", "ixg")
class InputXGradient(_CaptumMethod):
    """Captum's InputXGradient: ``x * d score / d x``; ``heatmap`` its channel sum."""

    captum_name = "InputXGradient"


@register_method("integrated_gradients", "ig", "integratedgradients")
class IntegratedGradients(_CaptumMethod):
    """Captum's IntegratedGradients; ``heatmap`` its channel sum.

    Parameters
    ----------
    model : nn.Module
    layer : None
    **kwargs
        Passed to ``attribute``: ``baselines`` (default 0), ``n_steps`` (default 50),
        ``method``, ``internal_batch_size``.
    """

    captum_name = "IntegratedGradients"


@register_method("guided_backprop", "guidedbackprop", "gbp")
class GuidedBackprop(_CaptumMethod):
    """Captum's GuidedBackprop; ``heatmap`` its channel sum.

    Captum overrides the gradient of ``nn.ReLU`` modules only; functional ReLUs keep their
    plain gradient (recorded in the metadata when the model has none).
    """

    captum_name = "GuidedBackprop"

    def _attribute(self, x, target):
        out = super()._attribute(x, target)
        if not any(isinstance(m, nn.ReLU) for m in self.model.modules()):
            info = out.metadata
            out.metadata = AttributionInfo(
                info.method,
                info.layer,
                info.target,
                info.rules,
                info.fallbacks
                + (
                    "no nn.ReLU modules: Captum's guided ReLU gradient not "
                    "applied (functional activations keep the plain gradient)",
                ),
                info.batchnorm,
                info.params,
            )
        return out


@register_method("occlusion")
class Occlusion(_CaptumMethod):
    """Captum's Occlusion with square windows; ``heatmap`` its channel sum.

    Parameters
    ----------
    model : nn.Module
    layer : None
    window : int, optional
        Side of the occluding square in pixels; default ``max(1, min(H, W) // 8)``.
    stride : int, optional
        Default half the window.
    **kwargs
        Further ``attribute`` arguments (``baselines``, ``perturbations_per_eval``).
    """

    captum_name = "Occlusion"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | None = None,
        *,
        window: int | None = None,
        stride: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(model, layer, **kwargs)
        self.window = window
        self.stride = stride

    def _call_kwargs(self, x):
        c, h, w = x.shape[1:]
        win = self.window or max(1, min(h, w) // 8)
        stride = self.stride or max(1, win // 2)
        return {
            "sliding_window_shapes": (c, win, win),
            "strides": (c, stride, stride),
            **self.kwargs,
        }
