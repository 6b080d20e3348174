"""Our attribution methods with Quantus's ``explain_func`` contract."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..attribution.base import get_method
from ..errors import InputError
from ..layers import LayerSpec

__all__ = ["quantus_explain_func"]

#: keyword arguments Quantus itself hands every explain_func; not method options
_QUANTUS_KWARGS = ("device", "softmax", "channel_first", "method", "abs", "normalise")


def quantus_explain_func(
    method: str, layer: LayerSpec | None = None, **options: object
) -> Callable[..., np.ndarray]:
    """A Quantus ``explain_func`` that computes ``method``'s heatmaps.

    Parameters
    ----------
    method : str
        A registered method name (see :func:`xnn_toolkit.attribution.available_methods`).
    layer : layer spec, optional
        The method's read layer (its default when ``None``).
    **options
        Hyperparameters of the method's constructor.

    Returns
    -------
    callable
        ``explain_func(model, inputs, targets, **kwargs) -> np.ndarray`` of shape
        ``N x 1 x H x W`` (float32), the contract Quantus metrics call. ``inputs`` may be a
        NumPy array or a tensor; it is moved to the model's device. Every call runs inside
        the model guard, so Quantus's own model copies (randomisation metrics) work too.

    Raises
    ------
    SpecError
        For an unknown method, naming the closest ones (raised here, not at the first call).

    Examples
    --------
    >>> import quantus  # doctest: +SKIP
    >>> metric = quantus.MaxSensitivity(nr_samples=3)  # doctest: +SKIP
    >>> metric(model=model, x_batch=x, y_batch=y, explain_func=quantus_explain_func("cmwp"))
    ... # doctest: +SKIP
    """
    cls = get_method(method)

    def explain_func(
        model: nn.Module, inputs: np.ndarray | torch.Tensor, targets: object, **kwargs: object
    ) -> np.ndarray:
        if not isinstance(model, nn.Module):
            raise InputError(
                f"explain_func needs the torch model, got {type(model).__name__}; pass the "
                "nn.Module to the Quantus metric"
            )
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
        x = x.to(device=device, dtype=dtype)
        if targets is not None:
            targets = torch.as_tensor(np.asarray(targets)).long().reshape(-1).to(device)
        opts = {**options, **{k: v for k, v in kwargs.items() if k not in _QUANTUS_KWARGS}}
        heat = cls(model, layer=layer, **opts).attribute(x, targets).heatmap
        return heat[:, None].detach().cpu().numpy().astype(np.float32)

    explain_func.__name__ = f"xnn_{cls.name}"
    explain_func.__qualname__ = explain_func.__name__
    return explain_func
