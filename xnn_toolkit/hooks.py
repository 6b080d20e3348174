"""Record activations (and gradients) of named layers with forward hooks.

The recorder is a context manager built on :func:`xnn_toolkit._guard.model_guard`: on exit
every hook it registered is removed and the model's modes, ``requires_grad`` flags and
``.grad`` fields are restored, also when the forward pass raised.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ._guard import model_guard
from .errors import InputError
from .layers import LayerSpec, resolve_layer

__all__ = ["Recording", "intervene", "record"]


@dataclass
class Recording:
    """What a :func:`record` block captured.

    Attributes
    ----------
    layers : list of str
        Dotted names of the recorded layers, in the order asked for.
    activations : dict of str to Tensor
        Output of each layer at the last forward pass (``N x C x H x W`` for conv layers,
        ``N x D`` for linear ones). Detached clones unless ``detach=False``.
    gradients : dict of str to Tensor
        Gradient of the backward pass's objective w.r.t. each layer output (same shape),
        filled by ``backward`` when ``gradients=True``.
    """

    layers: list[str]
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        """Drop captured tensors (keeps the recorder usable for another forward)."""
        self.activations.clear()
        self.gradients.clear()


def _first_tensor(name: str, output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(
        f"layer {name!r} returns {type(output).__name__}, not a tensor; record one of its "
        "submodules or a layer that outputs a tensor"
    )


@contextmanager
def record(
    model: nn.Module,
    layers: LayerSpec | Sequence[LayerSpec],
    *,
    gradients: bool = False,
    detach: bool = True,
    eval_mode: bool = True,
    freeze: bool = False,
) -> Iterator[Recording]:
    """Record the outputs of some layers during forward passes inside the block.

    Parameters
    ----------
    model : nn.Module
        The network (left exactly as it was on exit).
    layers : layer spec or sequence of them
        See :func:`xnn_toolkit.layers.resolve_layer`.
    gradients : bool
        Also record the gradient w.r.t. each layer output during ``backward``. Tensor hooks
        are used (not module backward hooks). When an output does not require grad (frozen
        parameters, input without grad), it is made a leaf that does, so gradients at and
        above the shallowest recorded layer are available without a graph below it.
    detach : bool
        Store detached clones (default). With ``False`` the stored tensors stay in the
        autograd graph (still private clones, so in-place ops elsewhere cannot alter them),
        which lets callers define objectives on them.
    eval_mode : bool
        Run the block with the model in eval mode (the default; restored afterwards).
    freeze : bool
        Set ``requires_grad=False`` on the parameters inside the block.

    Yields
    ------
    Recording
        Filled by each forward (and backward) pass inside the block.

    Examples
    --------
    >>> with record(model, ["layer3", "fc"]) as rec:          # doctest: +SKIP
    ...     logits = model(x)
    >>> rec.activations["layer3"].shape                         # doctest: +SKIP
    torch.Size([8, 256, 14, 14])
    """
    specs = [layers] if isinstance(layers, str | int | nn.Module) else list(layers)
    resolved = [resolve_layer(model, s) for s in specs]
    rec = Recording([name for name, _ in resolved])
    with model_guard(model, eval_mode=eval_mode, freeze=freeze):
        handles = []
        try:
            for name, module in resolved:
                hook = _make_hook(rec, name, gradients, detach)
                handles.append(module.register_forward_hook(hook))
            yield rec
        finally:
            for h in handles:
                h.remove()


def _make_hook(rec: Recording, name: str, gradients: bool, detach: bool):
    def hook(_module: nn.Module, _inputs: object, output: object):
        out = _first_tensor(name, output)
        if not gradients:
            rec.activations[name] = out.detach().clone() if detach else out.clone()
            return None
        if not torch.is_grad_enabled():
            raise InputError(
                f"gradients were requested for layer {name!r} but autograd is disabled; "
                "do not wrap the forward in torch.no_grad()"
            )
        if not out.requires_grad:
            out = out.detach().requires_grad_(True)
        rec.activations[name] = out.detach().clone() if detach else out.clone()

        def grad_hook(g: torch.Tensor) -> None:
            rec.gradients[name] = g.detach().clone()

        out.register_hook(grad_hook)
        # Hand the rest of the network a private copy: an in-place op downstream (ReLU,
        # ``out += identity``) then changes the copy, never the tensor we hooked.
        new = out.clone()
        if isinstance(output, torch.Tensor):
            return new
        return type(output)([new, *list(output)[1:]])

    return hook


@contextmanager
def intervene(
    model: nn.Module,
    edits: dict[LayerSpec, object] | None = None,
    *,
    eval_mode: bool = True,
    freeze: bool = False,
) -> Iterator[nn.Module]:
    """Replace the outputs of layers by a function of them during forwards inside the block.

    Used to run a network with a reconstructed activation (NMF ``M S``), a masked one (class
    paths) or a gated one (CSG). The model is restored exactly on exit.

    Parameters
    ----------
    model : nn.Module
        The network.
    edits : dict
        Maps a layer spec to a callable ``fn(activation: Tensor) -> Tensor`` whose result
        (same shape) replaces the layer's output.
    eval_mode, freeze : bool
        As in :func:`record`.

    Yields
    ------
    nn.Module
        The same model, edited while the block runs.
    """
    resolved = [(resolve_layer(model, k), fn) for k, fn in (edits or {}).items()]
    for (name, _), fn in resolved:
        if not callable(fn):
            raise InputError(f"the edit for layer {name!r} must be callable, got {fn!r}")
    with model_guard(model, eval_mode=eval_mode, freeze=freeze):
        handles = []
        try:
            for (name, module), fn in resolved:
                handles.append(module.register_forward_hook(_make_edit(name, fn)))
            yield model
        finally:
            for h in handles:
                h.remove()


def _make_edit(name: str, fn):
    def hook(_module: nn.Module, _inputs: object, output: object):
        out = _first_tensor(name, output)
        new = fn(out)
        if not isinstance(new, torch.Tensor) or new.shape != out.shape:
            raise InputError(
                f"the edit of layer {name!r} must return a tensor of shape {tuple(out.shape)}, "
                f"got {getattr(new, 'shape', type(new).__name__)}"
            )
        if isinstance(output, torch.Tensor):
            return new
        return type(output)([new, *list(output)[1:]])

    return hook
