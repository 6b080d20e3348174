"""Run a model from the input up to a target, with the read layer's output made a leaf.

Shared by every backward-pass method. The read layer's output is replaced by a fresh leaf
that requires grad (the network above it sees a private clone, so in-place ops cannot touch
it); with frozen parameters and an input that does not require grad, autograd then records
nothing below the read layer and a backward pass stops there. When the target lives at a
layer, the forward pass stops as soon as that layer has run.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

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
    """

    read: torch.Tensor | None
    read_name: str | None
    top: torch.Tensor
    read_calls: int = 0


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
    return _Forward(
        read=leaf,  # type: ignore[arg-type]
        read_name=resolved[0] if resolved is not None else None,
        top=top,
        read_calls=int(state["calls"]),  # type: ignore[call-overload]
    )


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
    (grad,) = torch.autograd.grad(fwd.top, fwd.read, signal, allow_unused=True)
    if grad is None:
        raise _not_between(fwd.read_name)
    return grad


def _not_between(name: str | None) -> InputError:
    return InputError(
        f"the target does not depend on the read layer {name!r}: the layer is not between the "
        "input and the target; read at an earlier layer"
    )
