"""Run a model from the input up to a target, with the read layer's output made a leaf.

Shared by every backward-pass method. The read layer's output is replaced by a fresh leaf
that requires grad (the network above it sees a private clone, so in-place ops cannot touch
it); with frozen parameters and an input that does not require grad, autograd then records
nothing below the read layer and a backward pass stops there. When the target lives at a
layer, the forward pass stops as soon as that layer has run.

Inside :func:`shared_passes` (the scoring runner opens one per batch, the gates' localization
one per batch of filter maps) the plain forward passes of that batch are kept: a second
method reading the same layer of the same model up to the same target layer (Grad-CAM and
Grad-CAM++ for a class; GradMap for every filter of a layer) reuses the forward, and the same
backward signal as the previous one reuses the gradient; the model's output of the first
complete forward is kept as the batch's prediction. Outside the context nothing is cached.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..layers import resolve_layer
from .targets import Target

__all__: list[str] = []

INPUT = "input"


class _StopForward(Exception):
    """Raised by the target layer's hook: everything needed has been computed."""


@dataclass
class _Forward:
    """What :func:`_run` produced.

    Attributes
    ----------
    read : Tensor or None
        Leaf at the read layer (``N x C x h x w``), requires grad; ``None`` if not asked.
    read_name : str or None
        Dotted name of the read layer, or ``"input"``.
    top : Tensor
        The explained outputs ``T(O)`` (attached to the graph).
    read_calls : int
        How often the read layer ran before the target (the first call is the one read).
    shared : bool
        Kept by :func:`shared_passes` for other methods: backward passes keep its graph.
    """

    read: torch.Tensor | None
    read_name: str | None
    top: torch.Tensor
    read_calls: int = 0
    shared: bool = False
    grads: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


def _batch_key(x: torch.Tensor) -> tuple:
    """Identity of a batch's values: same storage, view and version (``detach`` keeps it)."""
    return (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version)


class _SharedPasses:
    """Forward passes of one batch kept for reuse (see :func:`shared_passes`)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x  # kept alive, so that its storage cannot be reused by another tensor
        self.key = _batch_key(x)
        self.output: torch.Tensor | None = None
        self.forwards: dict[tuple, Any] = {}  # key -> _Forward (or a method's own record)

    def same(self, x: torch.Tensor) -> bool:
        return _batch_key(x) == self.key


_SHARED: ContextVar[_SharedPasses | None] = ContextVar("xnn_shared_passes", default=None)


@contextmanager
def shared_passes(x: torch.Tensor) -> Iterator[_SharedPasses]:
    """Share forward passes (and equal backward passes) of the batch ``x`` inside the block.

    Parameters
    ----------
    x : Tensor
        The batch every method of the block is called on (as passed to ``attribute``).

    Yields
    ------
    _SharedPasses
        ``output`` is the model's output (logits, detached) of the first forward that ran
        to the end on ``x``, or ``None`` when no method ran one.
    """
    state = _SharedPasses(x.detach())
    token = _SHARED.set(state)
    try:
        yield state
    finally:
        _SHARED.reset(token)
        state.forwards.clear()


def _note_output(x: torch.Tensor, out: object) -> None:
    """Keep ``out`` as the prediction of the shared batch ``x`` (first complete forward)."""
    shared = _SHARED.get()
    if (
        shared is not None
        and shared.output is None
        and isinstance(out, torch.Tensor)
        and shared.same(x)
    ):
        shared.output = out.detach()


def _first_tensor(output: object, what: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, list | tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputError(
        f"{what} returns {type(output).__name__}, not a tensor; pick a layer (or model) "
        "that outputs a tensor"
    )


def _replace_first(output: object, new: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return new
    return type(output)([new, *list(output)[1:]])


def _resolve_read(model: nn.Module, read: object) -> tuple[str, nn.Module | None] | None:
    if read is None:
        return None
    if isinstance(read, str) and read == INPUT:
        return INPUT, None
    return resolve_layer(model, read)  # type: ignore[arg-type]


def _run(
    model: nn.Module,
    x: torch.Tensor,
    target: Target,
    read: object,
    *,
    mode: AbstractContextManager | None = None,
) -> _Forward:
    """Forward ``x`` up to ``target`` (inside ``mode``), capturing the read layer as a leaf.

    Parameters
    ----------
    model : nn.Module
        The network (already guarded and frozen by the caller).
    x : Tensor
        ``N x C x H x W`` input.
    target : Target
        Where to stop and what to explain.
    read : layer spec, "input" or None
        Where to read the map (``None``: nothing).
    mode : context manager, optional
        Active during the forward pass and the target's transform (Excitation Backprop
        rules). A mode with ``install`` / ``uninstall`` methods (module tracking) is
        installed before the forward but only activated once the read layer has run:
        nothing below the read layer is recorded, so it need not be intercepted either.

    Returns
    -------
    _Forward
    """
    resolved = _resolve_read(model, read)
    tgt = resolve_layer(model, target.layer) if target.layer is not None else None
    shared = _SHARED.get()
    key = None
    if (
        shared is not None
        and mode is None
        and type(target).transform is Target.transform
        and (resolved is not None or not torch.is_grad_enabled())
        and shared.same(x)
    ):  # the forward to the target's layer does not depend on which unit is explained
        key = (
            id(model),
            None if resolved is None else resolved[0],
            None if tgt is None else tgt[0],
            torch.is_grad_enabled(),
        )
        if key in shared.forwards:
            return shared.forwards[key]
    state: dict[str, object] = {"calls": 0}
    handles = []

    if resolved is not None and resolved[0] == INPUT:
        leaf = x.detach().clone().requires_grad_(True)
        state["leaf"] = leaf
        x_in = leaf.clone()  # a private copy: an in-place op on the input cannot hit the leaf
    elif resolved is None:
        x_in = x  # no read layer: keep the caller's graph (Captum differentiates w.r.t. x)
    else:
        x_in = x.detach()

    late = mode is not None and hasattr(mode, "install") and resolved is not None
    late = late and resolved[1] is not None  # type: ignore[index]

    def activate() -> None:
        if mode is not None and "active" not in state:
            mode.__enter__()
            state["active"] = True

    def read_hook(_m: nn.Module, _i: object, output: object) -> object:
        state["calls"] = int(state["calls"]) + 1  # type: ignore[call-overload]
        if "leaf" in state:
            return None
        out = _first_tensor(output, f"the read layer {resolved[0]!r}")  # type: ignore[index]
        leaf = out.detach().requires_grad_(True)
        state["leaf"] = leaf
        if late:
            activate()
        return _replace_first(output, leaf.clone())

    def target_hook(_m: nn.Module, _i: object, output: object) -> None:
        state["top"] = _first_tensor(output, f"the target layer {tgt[0]!r}")  # type: ignore[index]
        raise _StopForward

    try:
        if late:
            mode.install()  # type: ignore[union-attr]
        if resolved is not None and resolved[1] is not None:
            handles.append(resolved[1].register_forward_hook(read_hook))
        if tgt is not None:
            handles.append(tgt[1].register_forward_hook(target_hook))
        if not late:
            activate()
        with torch.enable_grad():
            try:
                out = model(x_in)
            except _StopForward:
                out = None
            if tgt is None:
                if not isinstance(out, torch.Tensor):
                    raise InputError(
                        f"{type(model).__name__} returned {type(out).__name__}, not a tensor "
                        "of logits; wrap the model so that it returns one tensor, or target a "
                        "layer with Unit(...) / Channel(...)"
                    )
                top = out
                _note_output(x, out)
            elif "top" not in state:
                raise InputError(
                    f"the target layer {tgt[0]!r} did not run in the forward pass of "
                    f"{type(model).__name__}"
                )
            else:
                top = state["top"]  # type: ignore[assignment]
            top = target.transform(top)
    finally:
        if "active" in state:
            mode.__exit__(None, None, None)  # type: ignore[union-attr]
        if late:
            mode.uninstall()  # type: ignore[union-attr]
        for h in handles:
            h.remove()
    leaf = state.get("leaf")
    if resolved is not None and leaf is None:
        where = f"before the target layer {tgt[0]!r}" if tgt is not None else "at all"
        raise InputError(
            f"the read layer {resolved[0]!r} did not run {where}; pick a layer between the "
            "input and the target"
        )
    fwd = _Forward(
        read=leaf,  # type: ignore[arg-type]
        read_name=resolved[0] if resolved is not None else None,
        top=top,
        read_calls=int(state["calls"]),  # type: ignore[call-overload]
        shared=key is not None,
    )
    if key is not None:
        shared.forwards[key] = fwd  # type: ignore[union-attr]
    return fwd


def _backward_to_read(fwd: _Forward, signal: torch.Tensor) -> torch.Tensor:
    """Backpropagate ``signal`` from ``fwd.top`` and return the gradient at the read leaf.

    Raises
    ------
    InputError
        When the target does not depend on the read layer.
    """
    assert fwd.read is not None
    if not fwd.top.requires_grad:
        raise _not_between(fwd.read_name)
    for seen, grad in fwd.grads:  # a shared forward: the same signal has the same gradient
        if seen.shape == signal.shape and torch.equal(seen, signal):
            return grad
    (grad,) = torch.autograd.grad(
        fwd.top, fwd.read, signal, allow_unused=True, retain_graph=fwd.shared
    )
    if grad is None:
        raise _not_between(fwd.read_name)
    if fwd.shared:  # the last one only: consecutive methods with the same target share it
        fwd.grads[:] = [(signal.detach(), grad)]
    return grad


def _not_between(name: str | None) -> InputError:
    return InputError(
        f"the target does not depend on the read layer {name!r}: the layer is not between the "
        "input and the target; read at an earlier layer"
    )
