"""Batched heatmaps for reports and figures: class logits by any method, XNN x-features.

``class_method`` checks a method name once, at the door (unknown names get the closest
registered ones); :func:`class_heatmaps` runs it over a batch in chunks; and
:func:`xfeature_heatmaps` explains every x-feature of each image's own class head with
contrastive Excitation Backprop (:doc:`/methods/excitation`), as the thesis's figures and metrics
do.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConservationWarning, InputError

__all__ = ["class_method", "class_heatmaps", "xfeature_heatmaps"]


def class_method(name: str) -> str:
    """The canonical name of an attribution method that explains class logits.

    Parameters
    ----------
    name : str
        A name or alias of :func:`xnn_toolkit.attribution.available_methods`.

    Returns
    -------
    str
        The canonical name (``"c_mwp"`` → ``"cmwp"``).

    Raises
    ------
    SpecError
        Unknown name (the message lists the closest ones).
    InputError
        A filter method (ActivMap, GradMap), which does not explain a class.
    """
    from ..attribution import get_method

    cls = get_method(name)
    canonical = cls.name
    if cls.explains != "class":
        raise InputError(
            f"method {name!r} maps one filter, not a class logit; choose a class method such "
            "as cmwp, mwp, gradcam, gradcam++, saliency or integrated_gradients"
        )
    return canonical


def class_heatmaps(
    model: nn.Module,
    x: torch.Tensor,
    classes: torch.Tensor,
    method: str,
    layer: str | None = None,
    *,
    batch_size: int = 64,
) -> torch.Tensor:
    """Heatmaps of one class logit per image, computed in chunks.

    Parameters
    ----------
    model : nn.Module
        The network (left unchanged).
    x : Tensor
        ``N x C x H x W`` model inputs.
    classes : Tensor
        ``N`` int64 class of each image to explain.
    method : str
        See ``class_method``.
    layer : str, optional
        Read layer of layer-based methods (c-MWP, MWP, Grad-CAM); ignored by methods that
        read at the input.
    batch_size : int

    Returns
    -------
    Tensor
        ``N x H x W`` float heatmaps (CPU).
    """
    from ..attribution import explain

    name = class_method(method)
    classes = torch.as_tensor(classes).long().reshape(-1)
    if classes.shape[0] != x.shape[0]:
        raise InputError(f"got {classes.shape[0]} classes for {x.shape[0]} images")
    from ..attribution import get_method

    read = None if get_method(name).reads_own_layer else layer
    dev = next(model.parameters()).device
    out = [
        explain(
            model,
            x[i : i + batch_size].to(dev),
            classes[i : i + batch_size],
            method=name,
            layer=read,
        )
        .heatmap.detach()
        .float()
        .cpu()
        for i in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(out)


def xfeature_heatmaps(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    head: object,
    fc_layer: str,
    conv_layer: str,
    *,
    features: Sequence[int] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """c-MWP heatmaps of the x-features of each image's own class head.

    Parameters
    ----------
    model : nn.Module
        The network the head is attached to (left unchanged).
    x : Tensor
        ``N x C x H x W`` model inputs.
    labels : Tensor
        ``N`` class of each image: its head (``head.as_target_module(c)``) is explained.
    head : XNN or LassoXNN
        A fitted head whose ``classes_`` include every label.
    fc_layer : str
        The layer the head reads (``head.layer``).
    conv_layer : str
        Where the c-MWP map is read (:doc:`/methods/excitation`: VGG pool4, ResNet stage 3).
    features : sequence of int, optional
        x-features to explain (default all ``n``).
    batch_size : int

    Returns
    -------
    Tensor
        ``N x n x H x W`` float (CPU), in the order of ``features``.
    """
    from ..attribution import ContrastiveExcitationBackprop, HeadOutput

    labels = torch.as_tensor(labels).long().reshape(-1)
    known = {int(c) for c in head.classes_}
    missing = sorted({int(c) for c in labels} - known)
    if missing:
        raise InputError(f"the head has no output for classes {missing}; fit it on them first")
    feats = list(range(head.n_features)) if features is None else [int(i) for i in features]
    method = ContrastiveExcitationBackprop(model, layer=conv_layer)
    dev = next(model.parameters()).device
    h, w = x.shape[-2:]
    out = torch.zeros(x.shape[0], len(feats), h, w)
    for c in labels.unique().tolist():
        rows = (labels == c).nonzero().flatten()
        module = head.as_target_module(c)
        for j, i in enumerate(feats):
            for s in range(0, len(rows), batch_size):
                r = rows[s : s + batch_size]
                with warnings.catch_warnings():
                    # a dead x-feature (E_i = 0 on these images) has no mass to conserve;
                    # the report counts dead x-features itself
                    warnings.simplefilter("ignore", ConservationWarning)
                    att = method.attribute(x[r].to(dev), HeadOutput(fc_layer, module, i))
                out[r, j] = att.heatmap.detach().float().cpu()
    return out
