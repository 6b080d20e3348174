"""Data feeding and activation extraction of :class:`xnn_toolkit.heads.ClassSpecificGates`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._device import model_device
from ..datafit import as_labels
from ..errors import InputError
from ..hooks import record

__all__: list[str] = []


class _Source:
    """Batches of ``(images, labels)`` from tensors, a Dataset or an iterable of batches."""

    def __init__(self, data: Any, labels: Any, batch_size: int, fitting: bool = False) -> None:
        self.batch_size = batch_size
        self.tensors: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dataset = None
        self.iterable = None
        self.door: Any = None  # the model's check of every image batch (datafit)
        if isinstance(data, torch.Tensor):
            if labels is None:
                raise InputError(
                    "data: images were given as a tensor without their labels; pass "
                    + (
                        "fit(model, (images, labels))"
                        if fitting
                        else "(images, labels), or the images with labels="
                    )
                )
            self.tensors = (data, as_labels(labels))
        elif isinstance(data, tuple | list) and data and isinstance(data[0], torch.Tensor):
            if len(data) < 2:
                raise InputError("a tuple of data must be (images, labels, ...)")
            self._no_labels(labels)
            self.tensors = (data[0], as_labels(data[1]))
        elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
            self._no_labels(labels)
            self.dataset = data
        elif isinstance(data, Iterable):
            self._no_labels(labels)
            self.iterable = data
        else:
            raise InputError(
                f"data must be (images, labels) tensors, a Dataset of (image, label, ...) "
                f"samples or an iterable of (images, labels, ...) batches; got "
                f"{type(data).__name__}"
            )
        if self.tensors is not None:
            x, y = self.tensors
            if x.dim() != 4:
                raise InputError(f"images must be N x C x H x W, got shape {tuple(x.shape)}")
            y = y.reshape(-1)
            if y.shape[0] != x.shape[0]:
                raise InputError(f"labels must have N = {x.shape[0]} entries, got {y.shape[0]}")
            self.tensors = (x, y.long())

    @staticmethod
    def _no_labels(labels: Any) -> None:
        if labels is not None:
            raise InputError("labels= is only used when the images are given as a tensor")

    @property
    def reiterable(self) -> bool:
        return self.iterable is None or iter(self.iterable) is not self.iterable

    def batches(
        self, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        seen = 0
        for x, y in self._batches(shuffle, generator):
            yield (x if self.door is None else self.door(x, seen)), y
            seen += int(x.shape[0])

    def _batches(
        self, shuffle: bool, generator: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from ._training import _raw_batches  # the heads' one data adapter

        data = self.tensors or self.dataset or self.iterable
        for x, y in _raw_batches(data, self.batch_size, generator, shuffle=shuffle):
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or y.shape[0] != x.shape[0]:
                raise InputError(
                    "every batch must hold N x C x H x W images and N labels; got "
                    f"{getattr(x, 'shape', type(x).__name__)} and {tuple(y.shape)}"
                )
            yield x, y


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(f"the model returned {type(output).__name__}, not logits")


def _check_conv(name: str, a: torch.Tensor) -> None:
    if a.dim() != 4:
        raise InputError(
            f"layer {name!r} outputs shape {tuple(a.shape)}, which has no channels to gate: "
            "class-specific gates act on the K channels of a conv layer (N x K x H x W); "
            "pass layer= a conv stage, e.g. one of the names in xnn_toolkit.stages(model)"
        )


@dataclass
class _Extracted:
    features: torch.Tensor  # N x K pooled activations
    labels: torch.Tensor  # N
    model_pred: torch.Tensor | None  # N, argmax of the model's own logits
    n_logits: int = -1  # number of the network's outputs (-1: not N x C logits)


def _extract(network: nn.Module, layer: str, source: _Source, device: torch.device) -> _Extracted:
    """Pooled activations of ``layer`` (and the network's predictions) over all the data."""
    feats, labels, preds = [], [], []
    n_logits = -1
    net_dev = model_device(network)
    with record(network, layer) as rec, torch.no_grad():
        for x, y in source.batches():
            logits = _first_tensor(network(x.to(net_dev)))
            a = rec.activations[layer]
            _check_conv(layer, a)
            feats.append(a.float().mean((2, 3)).to(device))
            labels.append(y.to(device))
            preds.append(logits.argmax(1).to(device) if logits.dim() == 2 else None)
            n_logits = int(logits.shape[1]) if logits.dim() == 2 else -1
            rec.clear()
    if not feats:
        raise InputError("the data is empty: no batch was produced")
    pred = None if any(p is None for p in preds) else torch.cat(preds)
    return _Extracted(torch.cat(feats), torch.cat(labels), pred, n_logits)


def _num_logits(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[int, int]:
    """Probe one batch: ``(K, number of logits)`` (``-1`` when the output is not N x C)."""
    with record(model, layer) as rec, torch.no_grad():
        out = _first_tensor(model(x[:2].to(model_device(model))))
        a = rec.activations[layer]
    _check_conv(layer, a)
    n_out = int(out.shape[1]) if out.dim() == 2 else -1
    return int(a.shape[1]), n_out


def _check_images(images: Any) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InputError(
            f"images must be an N x C x H x W tensor, got {getattr(images, 'shape', type(images))}"
        )
    return images


def _layer_maps(
    network: nn.Module, layer: str, images: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Low-resolution activation maps ``N x K x h x w`` of ``layer`` (float32, CPU)."""
    out = []
    dev = model_device(network)
    with record(network, layer) as rec, torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            network(images[i : i + batch_size].to(dev))
            a = rec.activations[layer]
            _check_conv(layer, a)
            out.append(a.float().cpu())
            rec.clear()
    return torch.cat(out)
