"""What an attribution explains: classes, logit mixtures, units, channels, head outputs.

Every target is the same idea (:doc:`/methods/excitation`, "top signal"): it picks a tensor ``O`` in
the
network (the model's output, or the output of a layer), optionally maps it through a head
``T`` (an XNN encoder, an NMF projection, a gate), and weights the result with ``G``::

    score_n = < G_n , T(O)_n >          one score per image n

Gradient methods (Grad-CAM, GradMap, Captum) differentiate ``score``; Excitation Backprop
starts its top-down pass with ``G`` as the top signal (one-hot on a class or a unit, the
weights of a logit mixture, the proportional split of a channel's average pool).

Writing a target for a new head
-------------------------------
Subclass :class:`Target` and implement :meth:`Target.weights` (``G`` from the *shape* of
``T(O)``; it may not depend on its values, so that Captum methods can batch it). Set
``layer`` to the layer the head reads (``None`` for the model output) and override
:meth:`Target.transform` to apply the head. Excitation Backprop then runs through the head's
own linear / conv / ReLU layers with the same rules as the network; c-MWP negates the
head's last linear or conv layer. :class:`HeadOutput` does all of this for any
``nn.Module`` head, so most heads need no subclass at all::

    HeadOutput("classifier.4", xnn.encoder_, index=2)   # x-feature 2 of a fitted XNN
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._guard import model_guard
from ..errors import InputError
from ..layers import LayerSpec

__all__ = [
    "Target",
    "Class",
    "Logits",
    "Unit",
    "Channel",
    "HeadOutput",
    "ClassHeadTarget",
    "as_target",
]

IndexLike = int | Sequence[int] | torch.Tensor


def _per_image(index: IndexLike, n: int, what: str) -> torch.Tensor:
    """``index`` as an ``N`` int64 tensor (an int is repeated over the batch)."""
    if isinstance(index, bool):
        raise InputError(f"{what} must be an int or one int per image, got a bool")
    if isinstance(index, numbers.Integral):
        return torch.full((n,), int(index), dtype=torch.long)
    t = torch.as_tensor(index)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1:
        raise InputError(
            f"{what} must be an int, a list of ints or a 1-d integer tensor, got "
            f"{t.dtype} of shape {tuple(t.shape)}"
        )
    t = t.reshape(-1).long().cpu()
    if t.numel() == 1:
        return t.expand(n).clone()
    if t.numel() != n:
        raise InputError(
            f"{what} gives {t.numel()} values for a batch of {n} images; pass one per image "
            "or a single int for all"
        )
    return t


class Target:
    """Base class of attribution targets (see the module docstring for the contract).

    Attributes
    ----------
    layer : str, nn.Module, int or None
        The layer whose output ``O`` is explained; ``None`` for the model's output.
    """

    layer: LayerSpec | None = None

    def validate(self, n: int) -> None:
        """Check the target against a batch of ``n`` images before any work is done.

        Parameters
        ----------
        n : int
            Batch size.

        Raises
        ------
        InputError
            When the target gives the wrong number of per-image values.
        """

    def transform(self, output: torch.Tensor) -> torch.Tensor:
        """Map ``O`` to the explained outputs ``T(O)`` (identity unless a head is attached).

        Parameters
        ----------
        output : Tensor
            ``N x ...``, the output of :attr:`layer` (or of the model).

        Returns
        -------
        Tensor
            ``N x ...``
        """
        return output

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        """The selection weights ``G`` (same shape as ``output = T(O)``).

        Parameters
        ----------
        output : Tensor
            ``N x ...``, the explained outputs.

        Returns
        -------
        Tensor
            ``G``, same shape, dtype and device as ``output``.
        """
        raise NotImplementedError

    def excitation(self, output: torch.Tensor) -> torch.Tensor:
        """The top signal of Excitation Backprop (:doc:`/methods/excitation`); ``G`` by default.

        Parameters
        ----------
        output : Tensor
            ``N x ...``, the explained outputs.

        Returns
        -------
        Tensor
            Same shape as ``output``.
        """
        return self.weights(output)

    def score(self, output: torch.Tensor) -> torch.Tensor:
        """``score_n = <G_n, T(O)_n>``, the scalar that gradient methods differentiate.

        Parameters
        ----------
        output : Tensor
            ``N x ...``, the explained outputs.

        Returns
        -------
        Tensor
            ``N``
        """
        return (self.weights(output) * output).flatten(1).sum(1)

    def describe(self) -> str:
        """A short human-readable description for metadata."""
        return type(self).__name__


def _check_index(idx: torch.Tensor, size: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        bad = idx[(idx < 0) | (idx >= size)][0].item()
        raise InputError(f"{what} {bad} is out of range: expected 0 <= index < {size}")


def _one_hot(output: torch.Tensor, flat_index: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros_like(output).flatten(1)
    flat.scatter_(1, flat_index.to(output.device).view(-1, 1), 1.0)
    return flat.view_as(output)


class Class(Target):
    """One class (logit) per image: a one-hot top signal on ``output[n, c_n]``.

    Parameters
    ----------
    index : int, sequence of int, 1-d int tensor or None
        One class for the whole batch or one per image; ``None`` takes each image's
        predicted class (argmax of the logits).
    """

    def __init__(self, index: IndexLike | None = None) -> None:
        self.index = index

    def validate(self, n: int) -> None:
        if self.index is not None:
            _per_image(self.index, n, "the class target")

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2:
            raise InputError(
                f"a class target needs N x K logits, but the explained output has shape "
                f"{tuple(output.shape)}; use Unit(...) or Channel(...) for other outputs"
            )
        n, k = output.shape
        if self.index is None:
            idx = output.detach().argmax(1).cpu()
        else:
            idx = _per_image(self.index, n, "the class target")
        _check_index(idx, k, "class")
        return _one_hot(output, idx)

    def describe(self) -> str:
        return "Class(predicted)" if self.index is None else f"Class({_short(self.index)})"


class Logits(Target):
    """A weighted combination of logits, ``score_n = sum_k W_nk y_nk``.

    Parameters
    ----------
    weights : Tensor
        ``K`` (same weights for every image) or ``N x K``.
    """

    def __init__(self, weights: torch.Tensor | Sequence[float]) -> None:
        w = torch.as_tensor(weights)
        if not w.is_floating_point() or w.dim() not in (1, 2):
            raise InputError(
                f"logit weights must be a float tensor of shape K or N x K, got {w.dtype} "
                f"of shape {tuple(w.shape)}"
            )
        self.w = w

    def validate(self, n: int) -> None:
        if self.w.dim() == 2 and self.w.shape[0] != n:
            raise InputError(
                f"logit weights have {self.w.shape[0]} rows for a batch of {n} images; "
                "pass N x K weights or a single K vector"
            )

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() != 2 or output.shape[1] != self.w.shape[-1]:
            raise InputError(
                f"logit weights of shape {tuple(self.w.shape)} do not match the model's "
                f"output of shape {tuple(output.shape)}; expected K = {output.shape[-1]}"
            )
        self.validate(output.shape[0])
        return self.w.to(output).expand_as(output).clone()

    def describe(self) -> str:
        return f"Logits({tuple(self.w.shape)})"


class Unit(Target):
    """One unit of a layer (or of the model output): a one-hot top signal.

    Parameters
    ----------
    layer : layer spec or None
        Where the unit lives; ``None`` for the model output.
    index : int, tuple of int, or sequence / 1-d tensor of int
        An int is a flat index into one image's output (``C*H*W`` or ``D`` values); a tuple
        is a multi-index ``(c, h, w)``; a list or tensor gives one flat index per image.
    """

    def __init__(self, layer: LayerSpec | None, index: IndexLike | tuple[int, ...]) -> None:
        self.layer = layer
        self.index = index

    def validate(self, n: int) -> None:
        if not isinstance(self.index, tuple):
            _per_image(self.index, n, "the unit index")

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        n = output.shape[0]
        shape = tuple(output.shape[1:])
        size = math.prod(shape)
        if isinstance(self.index, tuple):
            if len(self.index) != len(shape):
                raise InputError(
                    f"unit index {self.index} has {len(self.index)} entries but one image's "
                    f"output at {self.layer!r} has shape {shape}"
                )
            for i, (j, s) in enumerate(zip(self.index, shape)):
                if not 0 <= j < s:
                    raise InputError(
                        f"unit index {self.index} is out of range in dimension {i + 1}: "
                        f"expected 0 <= index < {s} (output shape {shape})"
                    )
            flat = 0
            for j, s in zip(self.index, shape):
                flat = flat * s + j
            idx = torch.full((n,), flat, dtype=torch.long)
        else:
            idx = _per_image(self.index, n, "the unit index")
            _check_index(idx, size, f"unit (output shape {shape}): flat index")
        return _one_hot(output, idx)

    def describe(self) -> str:
        return f"Unit({self.layer!r}, {_short(self.index)})"


class Channel(Target):
    """One channel of a conv layer, scored by its average-pooled activation.

    ``score_n = mean_{h,w} O[n, c_n, h, w]``. Its Excitation Backprop top signal is the
    proportional split of that average pool (:doc:`/methods/excitation`):
    ``O[n,c,h,w] / sum_hw O[n,c]``
    (stabilised, 0 for an all-zero channel).

    Parameters
    ----------
    layer : layer spec
        The conv layer (its output is ``N x C x H x W``).
    channel : int, sequence of int or 1-d int tensor
        One channel for all images or one per image.
    stabilizer : float
        Added to the channel sum (with its sign) in the excitation split.
    """

    def __init__(self, layer: LayerSpec, channel: IndexLike, stabilizer: float = 1e-9) -> None:
        self.layer = layer
        self.channel = channel
        self.stabilizer = stabilizer

    def validate(self, n: int) -> None:
        _per_image(self.channel, n, "the channel target")

    def _mask(self, output: torch.Tensor) -> torch.Tensor:
        if output.dim() < 3:
            raise InputError(
                f"a channel target needs an N x C x ... output, but {self.layer!r} gives "
                f"shape {tuple(output.shape)}; use Unit(...) for vector layers"
            )
        idx = _per_image(self.channel, output.shape[0], "the channel target")
        _check_index(idx, output.shape[1], f"channel of {self.layer!r}")
        mask = torch.zeros(output.shape[:2], dtype=output.dtype, device=output.device)
        mask.scatter_(1, idx.to(output.device).view(-1, 1), 1.0)
        return mask.view(*output.shape[:2], *([1] * (output.dim() - 2))).expand_as(output)

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        spatial = output[0, 0].numel()
        return self._mask(output) / spatial

    def excitation(self, output: torch.Tensor) -> torch.Tensor:
        sel = self._mask(output) * output.detach()
        total = sel.flatten(1).sum(1).view(-1, *([1] * (output.dim() - 1)))
        sign = torch.where(total >= 0, 1.0, -1.0).to(total)
        return sel / (total + self.stabilizer * sign)

    def describe(self) -> str:
        return f"Channel({self.layer!r}, {_short(self.channel)})"


class HeadOutput(Target):
    """An output of a head attached at a layer (XNN encoder, NMF projection, gate, ...).

    The head maps that layer's activation to outputs ``N x K`` (or ``N x ...``); the target
    is output ``index`` of the head. Excitation Backprop runs through the head's own layers;
    its contrastive dual negates the head's last linear or conv layer. The head is run in
    eval mode with frozen parameters and restored exactly afterwards.

    Parameters
    ----------
    layer : layer spec
        The layer the head reads.
    head : nn.Module
        Maps the layer's activation to outputs.
    index : int, tuple of int or per-image ints
        Which output (flat index, multi-index or one flat index per image).
    """

    def __init__(
        self, layer: LayerSpec, head: nn.Module, index: IndexLike | tuple[int, ...]
    ) -> None:
        if not isinstance(head, nn.Module):
            raise InputError(f"head must be an nn.Module, got {type(head).__name__}")
        self.layer = layer
        self.head = head
        self.index = index
        self._unit = Unit(layer, index)

    def validate(self, n: int) -> None:
        self._unit.validate(n)

    def transform(self, output: torch.Tensor) -> torch.Tensor:
        with model_guard(self.head, eval_mode=True, freeze=True):
            out = self.head(output)
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"the head {type(self.head).__name__} returned {type(out).__name__}; "
                "a head target needs a tensor of outputs"
            )
        return out

    def weights(self, output: torch.Tensor) -> torch.Tensor:
        return self._unit.weights(output)

    def describe(self) -> str:
        return f"HeadOutput({self.layer!r}, {type(self.head).__name__}, {_short(self.index)})"


def _short(index: object) -> str:
    if isinstance(index, torch.Tensor):
        index = index.tolist()
    text = repr(index)
    return text if len(text) <= 40 else text[:37] + "..."


def as_target(target: object, n: int) -> Target:
    """Normalise what a user passes as ``target`` into a :class:`Target` for ``n`` images.

    Parameters
    ----------
    target : Target, int, sequence of int, Tensor or None
        ``None``: each image's predicted class. An int, a list of ints or a 1-d integer
        tensor: a class per image (:class:`Class`). A float tensor ``K`` or ``N x K``: a
        weighted combination of logits (:class:`Logits`). A :class:`Target`: itself.
    n : int
        Batch size.

    Returns
    -------
    Target

    Raises
    ------
    InputError
        When the target cannot be understood or has the wrong length.
    """
    if isinstance(target, Target):
        out = target
    elif target is None:
        out = Class(None)
    elif isinstance(target, bool):
        raise InputError("target must be a class index, not a bool")
    elif isinstance(target, numbers.Integral):
        out = Class(int(target))
    elif isinstance(target, torch.Tensor) and target.is_floating_point():
        out = Logits(target)
    elif isinstance(target, torch.Tensor | list | tuple):
        if isinstance(target, list | tuple) and not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in target
        ):
            raise InputError(
                "a list target must hold one int class per image; use Logits(weights) for "
                "logit weights"
            )
        out = Class(target)
    else:
        raise InputError(
            f"cannot use {type(target).__name__} as a target; expected an int class, one int "
            "per image, logit weights (float tensor) or a Target (Unit, Channel, HeadOutput)"
        )
    out.validate(n)
    return out


@dataclass(frozen=True)
class ClassHeadTarget:
    """Output ``index`` of the head of each image's own class (e.g. x-feature ``index``).

    For heads with one module per class, such as :class:`xnn_toolkit.heads.XNN`: image ``m``
    of class ``c`` is explained through ``head.as_target_module(c)`` read at ``layer``
    (a :class:`~xnn_toolkit.attribution.HeadOutput` per class). The explained class is the
    image's label, which the deletion / insertion metrics score.

    Attributes
    ----------
    layer : str
        The layer the head reads (e.g. ``"fc6"``).
    head : object
        A fitted head with ``as_target_module(class_index) -> nn.Module``.
    index : int
        Which output of the class's module.
    """

    layer: str
    head: Any
    index: int
