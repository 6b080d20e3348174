"""Excitation Backprop: marginal winning probability (MWP) and contrastive MWP
(:doc:`/methods/excitation`).

Mechanism
---------
While a model runs its forward pass inside :class:`_ExcitationMode` (a
``torch.overrides.TorchFunctionMode``, active only inside the ``with`` block: nothing is
patched globally and the model is not edited), every call of a conv, linear, pooling,
addition, product, activation or normalisation function whose inputs require grad is
replaced by the same call wrapped in :class:`_Excite`, an autograd Function. Its forward
value is the original one, so the graph is the normal one; its backward applies the rule
for that kind of call (:mod:`xnn_toolkit.attribution.rules`). A backward pass from a one-hot
top signal then yields the MWP at any recorded tensor. Functional code (``F.relu``,
``x + shortcut``, ``out += identity``, ``torch.cat``) is covered because the mode sees
functions, not modules; in-place calls keep their in-place semantics (``mark_dirty``).

The forward below the read layer runs without autograd records (frozen parameters, an
input that does not require grad, the read layer's output turned into a leaf), so the
backward pass stops at the read layer.

c-MWP (Zhang et al. 2016): the top layer's excitation of the one-hot signal minus that of
the dual unit with negated weights, subtracted once at the top layer's input; below the top
layer propagation is linear in ``P``, so one backward pass yields
``MWP(target) - MWP(dual)`` at every layer.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import ConservationWarning, InputError
from ..layers import LayerSpec, default_read_layer
from ._capture import _SHARED, _backward_to_read, _run
from .base import (
    Attribution,
    AttributionInfo,
    AttributionMethod,
    Conservation,
    _heatmap,
    register_method,
)
from .rules import RESIDUAL_SPLITS, STABILIZER_MODES, OpCall, Rule, _Log, default_rules
from .targets import Target

__all__ = ["ExcitationBackprop", "ContrastiveExcitationBackprop", "excitation_mode"]

T = torch.Tensor


class _Excite(torch.autograd.Function):
    """The original call forward, the rule's excitation backward."""

    @staticmethod
    def forward(ctx: Any, call: OpCall, rule: Rule, clone: bool, *signal: T) -> T:
        # ``clone``: the call works in place on its first operand and the rule needs that
        # operand's value from before the call; the other operands are saved as usual.
        first = signal[0].detach().clone() if clone else None
        out = call.run(*signal)
        for t in signal:
            if out is t:  # an in-place call: tell autograd
                ctx.mark_dirty(t)
        for i in call.slots:  # the rule gets them back from ``inputs``; an in-place output
            call.args[i] = None  # referenced here would also make a reference cycle
        ctx.call = call
        ctx.rule = rule
        if first is not None:
            call.inputs = (first,)
            ctx.save_for_backward(*signal[1:])
        elif rule.saves_inputs:
            ctx.save_for_backward(*signal)
        return out

    @staticmethod
    def backward(ctx: Any, grad: T) -> tuple:
        call: OpCall = ctx.call
        inputs = call.inputs + tuple(ctx.saved_tensors)
        grads = ctx.rule.backward(call, inputs, grad)
        if ctx.rule.books:
            call.log.book(call, grad, grads)
        return (None, None, None, *grads)


# --- which torch functions are which kind -------------------------------------------------


def _objs(names: Iterable[str], *spaces: object) -> list[Callable]:
    out = []
    for space in spaces:
        for n in names:
            f = getattr(space, n, None)
            if f is not None and f not in out:
                out.append(f)
    return out


_TENSOR = torch.Tensor
_ACT_NAMES = [
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "hardtanh_",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "selu",
    "selu_",
    "celu",
    "celu_",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "hardsigmoid",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "softplus",
    "prelu",
    "rrelu",
    "threshold",
    "threshold_",
    "clamp",
    "clamp_",
    "clip",
    "clip_",
    "clamp_min",
    "clamp_min_",
    "logsigmoid",
    "softsign",
    "tanhshrink",
    "hardshrink",
    "softshrink",
]
_KINDS: dict[str, list[Callable]] = {
    "linear": _objs(["conv1d", "conv2d", "conv3d", "linear"], F),
    "pool": _objs(
        [
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
        ],
        F,
    )
    + _objs(["mean", "sum"], torch, _TENSOR),
    "maxpool": _objs(
        [
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "adaptive_max_pool1d",
            "adaptive_max_pool2d",
            "adaptive_max_pool3d",
            "max_pool1d_with_indices",
            "max_pool2d_with_indices",
            "max_pool3d_with_indices",
        ],
        F,
    )
    + _objs(["amax", "max"], torch, _TENSOR),
    "add": _objs(
        ["add", "add_", "__add__", "__iadd__", "__radd__", "sub", "sub_", "__sub__", "__isub__"],
        torch,
        _TENSOR,
    ),
    "gate": _objs(
        [
            "mul",
            "mul_",
            "__mul__",
            "__imul__",
            "__rmul__",
            "div",
            "div_",
            "__truediv__",
            "__itruediv__",
            "true_divide",
        ],
        torch,
        _TENSOR,
    ),
    "activation": _objs(_ACT_NAMES, F, torch, _TENSOR),
    "batchnorm": _objs(["batch_norm"], F),
    "norm": _objs(
        ["layer_norm", "group_norm", "instance_norm", "local_response_norm", "rms_norm"], F
    ),
    "route": _objs(["cat", "concat", "concatenate", "stack"], torch),
}
_KIND_OF: dict[Callable, str] = {}
for _kind, _funcs in _KINDS.items():
    for _f in _funcs:
        _KIND_OF.setdefault(_f, _kind)

#: Calls whose plain gradient is exact routing (no rule needed, nothing recorded).
_ROUTING = {
    "view",
    "view_as",
    "reshape",
    "reshape_as",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "chunk",
    "split",
    "split_with_sizes",
    "tensor_split",
    "unbind",
    "narrow",
    "select",
    "__getitem__",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "clone",
    "detach",
    "requires_grad_",
    "to",
    "type",
    "float",
    "double",
    "half",
    "bfloat16",
    "cpu",
    "cuda",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "pad",
    "movedim",
    "moveaxis",
    "swapaxes",
    "swapdims",
    "pixel_shuffle",
    "pixel_unshuffle",
    "channel_shuffle",
    "native_channel_shuffle",
    "identity",
    "__get__",
    "__set__",
    "roll",
}

#: Activations whose output is never negative.
_NONNEG_ACTS = {"relu", "relu_", "relu6", "sigmoid", "sigmoid_", "hardsigmoid", "softplus"}

_LINEAR_ARGS = {
    "linear": ("input", "weight", "bias"),
    "conv": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
}
_BN_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_BN_DEFAULTS = (None, None, None, None, None, False, 0.1, 1e-5)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _bind(args: list, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> list:
    """Positional arguments in ``names`` order (kwargs moved in, defaults filled)."""
    out = list(args) + [None] * (len(names) - len(args))
    for i, n in enumerate(names):
        if n in kwargs:
            out[i] = kwargs.pop(n)
        elif i >= len(args):
            out[i] = defaults[i] if i < len(defaults) else None
    return out


def _is_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor)


def _full(t: object, shape: torch.Size) -> bool:
    """A signal operand: a tensor of the output's full shape that is not a parameter."""
    return _is_tensor(t) and not isinstance(t, nn.Parameter) and t.shape == shape


def _any_requires_grad(args: tuple, kwargs: dict) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, list | tuple):
            if any(_is_tensor(t) and t.requires_grad for t in a):
                return True
        elif _is_tensor(a) and a.requires_grad:
            return True
    return False


def _inplace_by_name(func: Callable) -> bool:
    n = _name(func)
    return (n.endswith("_") and not n.startswith("__")) or n.startswith("__i")


class _ExcitationMode(TorchFunctionMode):
    """Swap conv / linear / pool / add / cat / norm calls for their excitation versions.

    Parameters
    ----------
    modules : list of (str, nn.Module)
        Roots whose submodules are tracked, so that recorded calls know their module (for
        metadata); e.g. the model and a head.
    rules : dict of str to Rule
        Rule per kind (see :func:`~xnn_toolkit.attribution.rules.default_rules`).
    log : _Log
        Collects rules used and fallbacks taken.
    """

    def __init__(self, modules: list[tuple[str, nn.Module]], rules: dict[str, Rule], log: _Log):
        super().__init__()
        self.roots = modules
        self.rules = rules
        self.log = log
        self._names: dict[int, tuple[str, nn.Module]] = {}
        # id -> weakref of tensors known to be >= 0 (saves a sign check per conv input)
        self._nonneg: dict[int, weakref.ref] = {}

    # module tracking -----------------------------------------------------------------
    # A recorded call is attributed to the innermost module of ``roots`` whose method is on
    # the Python stack (found by walking the frames of wrapped calls only), so no hook is
    # put on the user's modules: registering and removing a pair of hooks on every module
    # cost more than the whole excitation bookkeeping on deep networks.
    def __enter__(self):
        self.install()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.uninstall()

    def install(self) -> None:
        """Index the tracked modules by identity (without activating the mode yet)."""
        if self._names:
            return
        for prefix, root in self.roots:
            for name, mod in root.named_modules():
                full = ".".join(p for p in (prefix, name) if p)
                self._names.setdefault(id(mod), (full, mod))

    def uninstall(self) -> None:
        """Forget the module index and per-call state."""
        self._names.clear()
        self._nonneg.clear()

    def _module_on_stack(self) -> tuple[str, nn.Module] | None:
        frame = sys._getframe(2)
        names = self._names
        while frame is not None:
            code = frame.f_code
            if code.co_argcount and code.co_varnames[0] == "self":
                obj = frame.f_locals.get("self")
                entry = names.get(id(obj))
                if entry is not None and entry[1] is obj:
                    return entry
            frame = frame.f_back
        return None

    def _where(self, func: Callable) -> tuple[str, str]:
        """(dotted module name, metadata key) of the current call."""
        found = self._module_on_stack()
        if found is None:
            return "", f"functional.{_name(func)}"
        name, mod = found
        leaf = next(iter(mod.children()), None) is None
        key = type(mod).__name__ if leaf else f"{type(mod).__name__}.{_name(func)}"
        return name, key

    # non-negativity bookkeeping -----------------------------------------------------
    def _is_nonneg(self, t: object) -> bool:
        ref = self._nonneg.get(id(t))
        return ref is not None and ref() is t

    def _track(self, func: Callable, kind: str | None, args: tuple, out: object) -> None:
        if not _is_tensor(out):
            return
        name = _name(func)
        if kind == "activation":
            ok = name in _NONNEG_ACTS
        elif kind in ("pool", "maxpool", "route") or name in _ROUTING:
            seq = kind == "route" and args and isinstance(args[0], list | tuple)
            parts = args[0] if seq else args
            ok = all(self._is_nonneg(t) for t in parts if _is_tensor(t))
        else:
            ok = False
        if ok:
            self._nonneg[id(out)] = weakref.ref(out)
        else:  # also forgets a tensor changed in place
            self._nonneg.pop(id(out), None)

    # dispatch ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        kind = _KIND_OF.get(func)
        if kind is None or not torch.is_grad_enabled():
            out = func(*args, **kwargs)
            if kind is None:
                self._note(func, args, out)
            return out
        if not _any_requires_grad(args, kwargs):
            return func(*args, **kwargs)
        rule = self.rules[kind]
        where, key = self._where(func)
        self.log.rule(key, rule.description)
        if not rule.wraps:
            out = func(*args, **kwargs)
            self._track(func, kind, args, out)
            return out
        bound = self._bind(kind, func, list(args), kwargs, where)
        if bound is None:
            self.log.fallback(f"{_name(func)}: operands not understood, plain gradient", where)
            return func(*args, **kwargs)
        args_l, slots, coefs = bound
        call = OpCall(func, kind, args_l, kwargs, slots, coefs, where, self.log)
        call.nonneg = self._is_nonneg(args_l[slots[0]])
        rule.prepare(call)
        clone = rule.saves_inputs and _inplace_by_name(func)
        given = tuple(args_l)  # _Excite drops the signal tensors from call.args
        out = _Excite.apply(call, rule, clone, *[args_l[i] for i in slots])
        self._track(func, kind, given, out)
        return out

    def _bind(self, kind: str, func: Callable, args: list, kwargs: dict, where: str):
        if kind == "linear":
            names = _LINEAR_ARGS["linear" if _name(func) == "linear" else "conv"]
            args = _bind(args, kwargs, names, (None, None, None, 1, 0, 1, 1))
            return (args, (0,), ()) if _is_tensor(args[0]) and _is_tensor(args[1]) else None
        if kind == "batchnorm":
            return _bind(args, kwargs, _BN_ARGS, _BN_DEFAULTS), (0,), ()
        if kind in ("add", "gate"):
            if "other" in kwargs:
                args = [*args[:1], kwargs.pop("other"), *args[1:]]
            if len(args) < 2:
                return None
            a, b = args[0], args[1]
            shapes = [t.shape for t in (a, b) if _is_tensor(t)]
            shape = torch.broadcast_shapes(*shapes)
            full = [i for i in (0, 1) if _full(args[i], shape)]
            if kind == "gate":
                if _name(func) in ("div", "div_", "__truediv__", "__itruediv__", "true_divide"):
                    full = [i for i in full if i == 0]
                if not full:
                    return None
                if len(full) > 1:
                    self.log.fallback(
                        f"{_name(func)} of two full-size tensors: the first is taken as the "
                        "signal, the second as the gate",
                        where,
                    )
                return args, (full[0],), ()
            if not full:
                return None
            alpha = kwargs.get("alpha", 1)
            sign = -1.0 if _name(func).lstrip("_").startswith(("sub", "isub")) else 1.0
            coefs = tuple(1.0 if i == 0 else sign * alpha for i in full)
            return args, tuple(full), coefs
        # pool, activation, norm: the first argument is the signal
        if "input" in kwargs and not args:
            args = [kwargs.pop("input")]
        if not args or not _is_tensor(args[0]):
            return None
        return args, (0,), ()

    def _note(self, func: Callable, args: tuple, out: object) -> None:
        """Record numeric calls on recorded tensors that have no rule (plain gradient)."""
        if not (_is_tensor(out) and out.requires_grad):
            return
        self._track(func, None, args, out)
        name = _name(func)
        if name in _ROUTING:
            return
        if any(_is_tensor(a) and a.requires_grad for a in args):
            where, _ = self._where(func)
            self.log.fallback(f"{name}: no excitation rule, plain gradient", where)


def excitation_mode(
    model: nn.Module,
    *,
    rules: dict[str, Rule] | None = None,
    extra: Iterable[tuple[str, nn.Module]] = (),
) -> _ExcitationMode:
    """A context manager in which forward passes of ``model`` carry excitation backward rules.

    Low-level access to the mechanism (the methods below use it): run the forward inside
    the block, then call ``torch.autograd.grad(output, tensor, top_signal)`` after it.

    Parameters
    ----------
    model : nn.Module
        The network (only tracked for metadata; it is not modified).
    rules : dict of str to Rule, optional
        Override rules per kind (defaults: :func:`~xnn_toolkit.attribution.rules.default_rules`).
    extra : iterable of (str, nn.Module)
        Further modules to track (heads).

    Returns
    -------
    context manager
        Its ``log`` attribute holds the rules used and the fallbacks taken.
    """
    merged = default_rules()
    merged.update(rules or {})
    return _ExcitationMode([("", model), *extra], merged, _Log())


# --- c-MWP: find the top layer ------------------------------------------------------------

_PASS_KINDS = {"activation", "batchnorm", "norm", "pool", "gate"}
_ROUTE_NODES = (
    "View",
    "UnsafeView",
    "Reshape",
    "ReshapeAlias",
    "Select",
    "Index",
    "Slice",
    "Squeeze",
    "Unsqueeze",
    "Permute",
    "Transpose",
    "T",
    "Clone",
    "Expand",
    "AsStrided",
    "ToCopy",
    "Alias",
    "Flatten",
    "Narrow",
    "Unbind",
)


def _mark_contrast(top: torch.Tensor, on: bool = True) -> str:
    """Mark (``on``) or unmark the top linear / conv layer below ``top`` for the dual
    subtraction.

    Walks down from ``top`` through routing, activation, normalisation and pooling calls to
    the first recorded linear or conv call and sets its ``contrast`` flag.

    Returns
    -------
    str
        The module name of that layer.

    Raises
    ------
    InputError
        When no single linear / conv layer is found (e.g. the target is a residual sum).
    """
    node = top.grad_fn
    seen = []
    while node is not None and len(seen) < 64:
        call = getattr(node, "call", None)
        if isinstance(call, OpCall):
            seen.append(f"{_name(call.func)} ({call.where or 'top'})")
            if call.kind == "linear":
                call.contrast = on
                return call.where
            if call.kind not in _PASS_KINDS:
                break
            node = node.next_functions[0][0]  # the (first) signal input
            continue
        name = type(node).__name__
        base = name.split("Backward")[0]
        nexts = [n for n, _ in node.next_functions if n is not None]
        seen.append(name)
        if base in _ROUTE_NODES and len(nexts) == 1:
            node = nexts[0]
            continue
        break
    raise InputError(
        "c-MWP needs a conv or linear layer right below the target (its dual negates that "
        "layer's weights), but the path down from the target meets "
        f"{' -> '.join(seen) or 'nothing'}; "
        "target the output of a conv / linear layer, or use method='mwp'"
    )


# --- the methods ------------------------------------------------------------------------


@register_method("mwp", "excitation_backprop", "eb")
class ExcitationBackprop(AttributionMethod):
    """Excitation Backprop: the marginal winning probability (MWP) at a layer.

    Rules: conv / linear z⁺ (BatchNorm folded by default), average pooling proportional, max
    pooling winner-takes-all, activations pass-through, additions split over the branches'
    positive contributions, concatenations routed (:mod:`xnn_toolkit.attribution.rules`).

    Parameters
    ----------
    model : nn.Module
        Any timm / torchvision / custom CNN; it is not edited.
    layer : layer spec or "input", optional
        Where to read the MWP; default :func:`xnn_toolkit.layers.default_read_layer` (VGG
        pool4, ResNet end of stage 3, else the main-path stage output nearest stride 16).
    batchnorm : {"fold", "identity"}
        Fold BatchNorm into the preceding conv (default) or treat it as the identity.
    stabilizer : float
        Denominator stabiliser; ``0`` is allowed (a zero denominator gives a zero share).
    stabilizer_mode : {"relative", "absolute"}
        ``stabilizer`` times the largest denominator of the image in that layer (default: the
        map does not depend on the magnitude of the activations), or ``stabilizer`` itself
        (zennit's and TorchRay's form).
    residual : {"positive", "absolute", "proportional"}
        How additions ``y = a + b`` split ``P(y)``: over the branches' positive contributions
        (default; bounded and conserving, the z⁺ idea), over absolute values, or in
        proportion to the signed branches (TorchRay's form; unbounded when the branches
        cancel). See :class:`~xnn_toolkit.attribution.rules.SplitSum`.
    rules : dict of str to Rule, optional
        Override the rule of some kinds (see :func:`~xnn_toolkit.attribution.rules.default_rules`).
    warn_lost : float
        Warn when more than this share of the winning probability is lost on its way to the
        read layer (``metadata.conservation`` always says how much and where).

    Notes
    -----
    ``raw`` is ``N x C x h x w`` at the read layer; ``heatmap`` is its channel sum, upsampled
    bilinearly (not clamped). With a one-hot target the MWP is non-negative and sums to 1
    per image minus the booked losses (:class:`~xnn_toolkit.attribution.base.Conservation`).
    """

    contrastive = False

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | None = None,
        *,
        batchnorm: str = "fold",
        stabilizer: float = 1e-9,
        stabilizer_mode: str = "relative",
        residual: str = "positive",
        rules: dict[str, Rule] | None = None,
        warn_lost: float = 0.01,
    ) -> None:
        super().__init__(model, layer)
        if batchnorm not in ("fold", "identity"):
            raise InputError(f"batchnorm must be 'fold' or 'identity', got {batchnorm!r}")
        if not stabilizer >= 0:
            raise InputError(f"stabilizer must be >= 0, got {stabilizer!r}")
        if stabilizer_mode not in STABILIZER_MODES:
            raise InputError(
                f"stabilizer_mode must be one of {', '.join(STABILIZER_MODES)}, "
                f"got {stabilizer_mode!r}"
            )
        if residual not in RESIDUAL_SPLITS:
            raise InputError(
                f"residual must be one of {', '.join(RESIDUAL_SPLITS)}, got {residual!r}"
            )
        self.batchnorm = batchnorm
        self.stabilizer = stabilizer
        self.stabilizer_mode = stabilizer_mode
        self.residual = residual
        self.rules = rules
        self.warn_lost = warn_lost

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        read = self.layer if self.layer is not None else default_read_layer(self.model)
        rules = default_rules(
            self.stabilizer,
            self.batchnorm,
            stabilizer_mode=self.stabilizer_mode,
            residual=self.residual,
        )
        rules.update(self.rules or {})
        fwd, log = self._forward(x, target, read, rules)
        signal = target.excitation(fwd.top)
        params: dict[str, object] = {
            "stabilizer": self.stabilizer,
            "stabilizer_mode": self.stabilizer_mode,
            "residual": self.residual,
        }
        if self.contrastive:
            params["contrast_layer"] = _mark_contrast(fwd.top)
        elif fwd.shared:  # a forward shared with c-MWP: its top layer may be marked
            try:
                _mark_contrast(fwd.top, on=False)
            except InputError:
                pass  # nothing to unmark: no c-MWP can have run on this target
        raw = _backward_to_read(fwd, signal)
        if fwd.read_calls > 1:
            log.fallback(
                f"the read layer ran {fwd.read_calls} times; the first call is read",
                str(fwd.read_name),
            )
        books = _conservation(log, signal, raw)
        if books is not None:
            self._warn_lost(books, str(fwd.read_name))
        info = AttributionInfo(
            method=self.name,
            layer=str(fwd.read_name),
            target=target.describe(),
            rules=dict(log.rules),
            fallbacks=log.summary(),
            batchnorm=self.batchnorm,
            params=params,
            conservation=books,
        )
        heat = _heatmap(raw, tuple(x.shape[-2:]), clamp=self.contrastive)
        return Attribution(raw=raw, heatmap=heat, metadata=info)

    def _forward(self, x: torch.Tensor, target: Target, read: object, rules: dict) -> tuple:
        """The forward pass under the excitation rules, and its log.

        Inside :func:`~xnn_toolkit.attribution._capture.shared_passes`, MWP and c-MWP with the
        same rules on the same batch, layer and target layer share one forward: the graph is
        kept, and each backward pass starts from the log as the forward left it (its own
        conservation books, rules and fallbacks)."""
        shared = _SHARED.get()
        key = None
        if (
            shared is not None
            and self.rules is None
            and type(target).transform is Target.transform
            and shared.same(x)
        ):
            key = (
                "excitation",
                id(self.model),
                str(read),
                str(target.layer),
                self.batchnorm,
                self.stabilizer,
                self.stabilizer_mode,
                self.residual,
            )
            hit = shared.forwards.get(key)
            if hit is not None:
                fwd, log, state = hit
                log.rules, log.fallbacks = dict(state[0]), {k: list(v) for k, v in state[1].items()}
                log.lost, log.lost_zero, log.contrast = {}, None, None
                fwd.grads.clear()  # the same signal gives another map with c-MWP's mark
                return fwd, log
        log = _Log()
        log.batch = int(x.shape[0])
        head = getattr(target, "head", None)
        extra = [("head", head)] if isinstance(head, nn.Module) else []
        mode = _ExcitationMode([("", self.model), *extra], rules, log)
        fwd = _run(self.model, x, target, read, mode=mode)
        if key is not None:
            fwd.shared = True
            state = (dict(log.rules), {k: list(v) for k, v in log.fallbacks.items()})
            shared.forwards[key] = (fwd, log, state)
        return fwd, log

    def _warn_lost(self, books: Conservation, read: str) -> None:
        if not self.contrastive:
            top = books.top.where(books.top != 0, torch.ones_like(books.top))
            bypass = (books.top - books.lost - books.read_sum) / top
            if bypass.numel() and float(bypass.abs().max()) > self.warn_lost:
                warnings.warn(
                    f"{self.name}: {100 * float(bypass.mean()):.1f} % of the winning "
                    f"probability does not pass through the read layer {read!r} (mean over "
                    f"{bypass.numel()} images): other branches join the network above it, so "
                    "the map shows only part of the evidence; read at a layer every path "
                    "crosses (a stage output, or 'input')",
                    ConservationWarning,
                    stacklevel=4,
                )
        share = books.lost_share
        if not share.numel() or not float(share.abs().max()) > self.warn_lost:
            return
        worst = ", ".join(
            f"{100 * v:.1f} % at {k}" for k, v in list(books.by_layer.items())[:3] if v > 0
        )
        warnings.warn(
            f"{self.name}: {100 * float(share.mean()):.1f} % of the winning probability "
            f"(mean over {share.numel()} images, up to {100 * float(share.max()):.1f} %) is "
            f"lost between the target and the read layer {read!r} ({worst}): units with no "
            "positive contribution (z+ = 0, e.g. filters with no positive weight) pass "
            "nothing down. The map is the MWP of what arrives; metadata.conservation has "
            "the books per image and layer",
            ConservationWarning,
            stacklevel=4,
        )


def _conservation(log: _Log, signal: torch.Tensor, raw: torch.Tensor) -> Conservation | None:
    """The books of one call (``None`` when the batch dimension cannot be followed)."""
    n = log.batch
    if signal.dim() == 0 or signal.shape[0] != n or raw.shape[0] != n:
        return None
    top = signal.detach().reshape(n, -1).sum(1, dtype=torch.float64)
    flat = raw.detach().reshape(n, -1)
    zero = torch.zeros(n, dtype=torch.float64)
    lost = sum(log.lost.values(), zero)
    denom = top.abs().where(top != 0, torch.ones_like(top))
    by_layer = {k: float((v / denom).mean()) for k, v in log.lost.items() if bool((v != 0).any())}
    by_layer = dict(sorted(by_layer.items(), key=lambda kv: -abs(kv[1])))
    return Conservation(
        top=top,
        read_sum=flat.sum(1, dtype=torch.float64),
        read_abs=flat.abs().sum(1, dtype=torch.float64),
        lost=lost,
        lost_zero=log.lost_zero if log.lost_zero is not None else zero,
        by_layer=by_layer,
    )


@register_method("cmwp", "c_mwp", "contrastive_excitation_backprop", "ceb")
class ContrastiveExcitationBackprop(ExcitationBackprop):
    """Contrastive MWP: ``MWP(target) - MWP(dual)`` in one backward pass
    (:doc:`/methods/excitation`).

    The dual unit has the top layer's weights negated (the top layer is the conv / linear
    layer right below the target: the classifier for a class, the head's last layer for a
    head output). The difference is formed once at the top layer's input and propagated
    with the MWP rules. ``heatmap`` is the channel sum clamped at 0, upsampled.

    Parameters are those of :class:`ExcitationBackprop`.
    """

    contrastive = True
