"""Snapshot and exact restoration of a model's mutable state.

Anything in the toolkit that touches a user's model (hooks, eval mode, ``requires_grad``,
rule swaps) happens inside :func:`model_guard`, which restores on exit — also when the body
raised — the training flag of every module, ``requires_grad`` and ``.grad`` of every
parameter, and every hook dictionary of every module (hooks added inside are removed,
removed ones come back, order kept).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["model_guard", "HOOK_DICTS"]

#: Per-module dictionaries that hold hooks (names as in ``torch.nn.Module.__init__``).
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


@contextmanager
def model_guard(
    model: nn.Module, *, eval_mode: bool = True, freeze: bool = False
) -> Iterator[nn.Module]:
    """Run a block with the model in a controlled state and restore it exactly afterwards.

    Parameters
    ----------
    model : nn.Module
        The user's model; it is modified only inside the block.
    eval_mode : bool
        Put every module in eval mode inside the block (BatchNorm statistics stay frozen).
    freeze : bool
        Set ``requires_grad=False`` on every parameter inside the block (gradients then flow
        to inputs and activations only, which is cheaper).

    Yields
    ------
    nn.Module
        The same model object.
    """
    modules = list(model.modules())
    modes = [m.training for m in modules]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    # only non-empty hook dicts are copied; an empty one must simply be empty afterwards
    hooks = [
        [
            (name, OrderedDict(d) if d else None)
            for name in HOOK_DICTS
            if (d := getattr(m, name, None)) is not None
        ]
        for m in modules
    ]
    try:
        # A backward inside the block accumulates into ``.grad`` in place; hand it fresh
        # slots so the user's gradients come back untouched.
        for p in params:
            p.grad = None
        if eval_mode and any(modes):
            model.eval()
        if freeze:
            for p in params:
                p.requires_grad_(False)
        yield model
    finally:
        with torch.no_grad():
            for m, mode in zip(modules, modes):
                if m.training != mode:  # nn.Module.__setattr__ is slow: only what changed
                    m.training = mode
            for p, flag, grad in zip(params, flags, grads):
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if p.grad is not grad:
                    p.grad = grad
        for m, saved in zip(modules, hooks):
            for name, content in saved:
                d = getattr(m, name)
                if content is None:
                    if d:
                        d.clear()
                elif list(d.items()) != list(content.items()):
                    d.clear()
                    d.update(content)
