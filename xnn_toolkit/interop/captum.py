"""Our methods as ``captum.attr.Attribution`` subclasses.

So Captum's tools accept them: ``captum.attr.visualization.visualize_image_attr``,
``captum.metrics.infidelity`` (pass the attribution tensor) and
``captum.metrics.sensitivity_max`` (pass ``.attribute``). ``attribute(inputs, target)``
returns a tensor shaped like ``inputs``: our ``N x H x W`` heatmap spread evenly over the
channels, so that its channel sum -- what Captum's visualisation and most metrics reduce
to -- is exactly the toolkit's heatmap.
"""

from __future__ import annotations

import torch
from captum.attr import Attribution as _CaptumAttribution
from torch import nn

from ..attribution.base import Attribution, get_method
from ..errors import InputError
from ..layers import LayerSpec

__all__ = ["CAMAttribution", "ExcitationBackpropAttribution", "XnnAttribution"]


class XnnAttribution(_CaptumAttribution):
    """Any registered toolkit method as a Captum ``Attribution``.

    Parameters
    ----------
    model : nn.Module
        The network (left unchanged: every call runs inside the model guard).
    method : str
        A registered method name.
    layer : layer spec, optional
        Read layer (the method's default when ``None``).
    **options
        Hyperparameters of the method's constructor.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "cmwp",
        layer: LayerSpec | None = None,
        **options: object,
    ) -> None:
        super().__init__(model)
        self.method = get_method(method)(model, layer=layer, **options)
        self.last: Attribution | None = None

    def attribute(self, inputs: torch.Tensor, target: object = None, **kwargs: object):
        """Attribute ``target`` on ``inputs``; a tensor shaped like ``inputs``.

        Parameters
        ----------
        inputs : Tensor or tuple of one Tensor
            ``N x C x H x W`` images (Captum's metrics pass a one-tensor tuple).
        target : int, sequence of int, Tensor, Target or None
            One class (or target) per image; ``None`` the predicted class.
        **kwargs
            Accepted for Captum's callers (``sensitivity_max`` forwards its own) and ignored.

        Returns
        -------
        Tensor or tuple of one Tensor
            ``N x C x H x W`` (a tuple when ``inputs`` was one); the full result of the
            call is kept in ``self.last``.
        """
        # Captum's metrics pass inputs as a one-tensor tuple and expect the same back
        as_tuple = isinstance(inputs, tuple)
        if as_tuple:
            if len(inputs) != 1:
                raise InputError(
                    f"{type(self).__name__} explains one image tensor, got a tuple of "
                    f"{len(inputs)} inputs; pass the N x C x H x W images alone"
                )
            inputs = inputs[0]
        if isinstance(target, torch.Tensor) and target.dim() == 0:
            target = int(target)
        out = self.method.attribute(inputs, target)
        self.last = out
        c = inputs.shape[1]
        maps = (out.heatmap[:, None] / c).expand(-1, c, -1, -1).to(inputs.dtype).contiguous()
        return (maps,) if as_tuple else maps

    def has_convergence_delta(self) -> bool:
        """Our methods report no convergence delta."""
        return False


class ExcitationBackpropAttribution(XnnAttribution):
    """Excitation Backprop as a Captum ``Attribution``: MWP, or c-MWP with ``contrastive``.

    Parameters
    ----------
    model : nn.Module
    layer : layer spec, optional
        Read layer (default as in :class:`~xnn_toolkit.attribution.ExcitationBackprop`).
    contrastive : bool
        c-MWP (default) or plain MWP.
    **options
        Constructor hyperparameters (``batchnorm``, ``stabilizer``, ``rules``).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | None = None,
        *,
        contrastive: bool = True,
        **options: object,
    ) -> None:
        super().__init__(model, "cmwp" if contrastive else "mwp", layer, **options)


class CAMAttribution(XnnAttribution):
    """A CAM-family method (``"gradcam"`` by default) as a Captum ``Attribution``.

    Parameters
    ----------
    model : nn.Module
    method : str
        ``cam``, ``gradcam``, ``gradcam++`` or a bridged one (``scorecam``, ``layercam``, ...).
    layer : layer spec, optional
    **options
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "gradcam",
        layer: LayerSpec | None = None,
        **options: object,
    ) -> None:
        super().__init__(model, method, layer, **options)
