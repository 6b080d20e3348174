"""Excitation Backprop rules: how one operation passes the winning probability down.

A rule is a small object (zennit style): :meth:`Rule.backward` receives the recorded call of
one operation (:class:`OpCall`: the torch function, its arguments, the saved inputs) and the
marginal winning probability ``P`` of its output, and returns ``P`` of each of its inputs.
The mechanism that records calls and wires rules into autograd is shared
(:mod:`xnn_toolkit.attribution.excitation`); the rules only say what METHODS §2.1 says:

=======================  ====================================================================
kind                     rule
=======================  ====================================================================
``linear`` (conv, fc)    :class:`ZPlus`: ``P(a_j) = sum_i a_j w+_ji / (sum_j' a_j' w+_j'i) P(a_i)``
``pool`` (avg, mean)     :class:`Proportional`: ``P(a_j) = a_j / (sum of the window) P(a_i)``
``add`` (``x + y``)      :class:`SplitSum`: each branch gets ``x_k / (sum_k x_k)`` of ``P(y)``
``maxpool``              :class:`WinnerTakesAll`: the plain gradient routes ``P`` to the winner
``activation``           :class:`PassThrough`: ``P(input) = P(output)``
``batchnorm``            :class:`FoldBatchNorm`: folded into the preceding conv, else identity
``norm`` (LayerNorm...)  :class:`PassThrough` with a recorded fallback (rule undefined)
``gate`` (``x * g``)     :class:`Gate`: ``P`` goes to the gated signal, the gate gets none
``route`` (cat, view)    :class:`Route`: the plain gradient routes ``P`` to the parts
=======================  ====================================================================

Divisions use a stabiliser added with the sign of the denominator (``0`` counts as
positive), so ``0 / 0`` gives ``0``; biases are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "OpCall",
    "Rule",
    "ZPlus",
    "Proportional",
    "SplitSum",
    "WinnerTakesAll",
    "PassThrough",
    "FoldBatchNorm",
    "Gate",
    "Route",
    "default_rules",
]


class _Log:
    """Collects the rules used and the fallbacks taken during one attribution."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.fallbacks: dict[str, list[str]] = {}

    def rule(self, key: str, text: str) -> None:
        self.rules.setdefault(key, text)

    def fallback(self, text: str, where: str) -> None:
        places = self.fallbacks.setdefault(text, [])
        if where not in places:
            places.append(where)

    def summary(self) -> tuple[str, ...]:
        out = []
        for text, places in self.fallbacks.items():
            shown = ", ".join(p or "<model>" for p in places[:4])
            more = f" and {len(places) - 4} more" if len(places) > 4 else ""
            out.append(f"{text} [at {shown}{more}]")
        return tuple(out)


@dataclass(eq=False)
class OpCall:
    """One recorded call of a torch function, as rules see it.

    Attributes
    ----------
    func : callable
        The torch function (``torch.conv2d``, ``F.linear``, ``Tensor.add``, ...).
    kind : str
        Its kind (``"linear"``, ``"pool"``, ``"add"``, ``"gate"``, ...).
    args : list
        Positional arguments as called (the signal tensors at ``slots``).
    kwargs : dict
        Keyword arguments as called.
    slots : tuple of int
        Positions in ``args`` of the signal tensors (the inputs that receive ``P``).
    coefs : tuple of float
        Sign and scale of each signal tensor in a sum (``x - y``: ``(1, -1)``).
    where : str
        Dotted name of the module that made the call (for metadata).
    log : _Log
        Where fallbacks are recorded.
    inputs : tuple of Tensor
        Signal tensors saved for the backward pass (clones for in-place ops).
    scale : Tensor or None
        Per-output-channel factor ``gamma / sigma`` of a BatchNorm folded into this layer.
    contrast : bool
        Set on the top layer of c-MWP: subtract the dual (negated weights) here.
    nonneg : bool
        The first signal input is known to be non-negative (the output of a ReLU, or of
        pooling / routing of such), so no sign check is needed.
    """

    func: Callable
    kind: str
    args: list
    kwargs: dict
    slots: tuple[int, ...]
    coefs: tuple[float, ...] = ()
    where: str = ""
    log: _Log = field(default_factory=_Log)
    inputs: tuple[torch.Tensor, ...] = ()
    scale: torch.Tensor | None = None
    contrast: bool = False
    nonneg: bool = False

    def run(self, *signal: torch.Tensor, **replace: object) -> torch.Tensor:
        """Call the function again with other signal tensors (and replaced positional args).

        ``replace`` maps ``"arg<i>"`` to a new value of positional argument ``i``.
        """
        args = list(self.args)
        for pos, t in zip(self.slots, signal):
            args[pos] = t
        for key, value in replace.items():
            args[int(key[3:])] = value
        return self.func(*args, **self.kwargs)


class Rule:
    """Base class of excitation rules.

    Attributes
    ----------
    description : str
        What the rule does, shown in :attr:`AttributionInfo.rules`.
    saves_inputs : bool
        Whether :meth:`backward` needs the values of the signal inputs.
    wraps : bool
        Whether the mechanism must wrap the call in an autograd Function (``False`` for
        rules that are the plain gradient, e.g. routing and winner-takes-all).
    """

    description = ""
    saves_inputs = True
    wraps = True

    def prepare(self, call: OpCall) -> None:
        """Forward-time hook (e.g. BatchNorm folding marks the preceding conv)."""

    def backward(
        self, call: OpCall, inputs: tuple[torch.Tensor, ...], grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """``P`` of each signal input given ``P`` of the output (``grad``).

        Parameters
        ----------
        call : OpCall
            The recorded call.
        inputs : tuple of Tensor
            The signal inputs' values (empty when ``saves_inputs`` is ``False``).
        grad : Tensor
            ``P`` of the output, same shape as the output.

        Returns
        -------
        tuple of Tensor or None
            One per signal input.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _eps(eps: float, dtype: torch.dtype) -> float:
    """The stabiliser, never below the dtype's smallest normal number (fp16 would flush it)."""
    return max(eps, torch.finfo(dtype).tiny) if dtype.is_floating_point else eps


def _stabilise(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1``: never zero, 0/0 gives 0 downstream."""
    e = _eps(eps, z.dtype)
    return z + torch.where(z >= 0, e, -e).to(z.dtype)


def _stabilise_(z: torch.Tensor, eps: float) -> torch.Tensor:
    """In-place :func:`_stabilise` for a tensor known to be non-negative."""
    return z.add_(_eps(eps, z.dtype))


def _excite_through(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grad: torch.Tensor,
    denominator: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``x * J^T(grad / denominator(fn(x)))``: the shared core of the z⁺ and pooling rules.

    ``J`` is the Jacobian of the linear map ``fn`` (one forward call and one transposed call;
    buffers are reused in place because these tensors are private to this function).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        z = denominator(y.detach())  # the output is not saved by its backward: reuse it
        s = torch.div(grad, z, out=z) if z.data_ptr() == y.data_ptr() else grad / z
        (g,) = torch.autograd.grad(y, xg, s)
    return g.mul_(x)


class ZPlus(Rule):
    """The z⁺ rule of Excitation Backprop for conv and linear layers (METHODS §2.1).

    ``P(a_j) = a_j sum_i w+_ji P(a_i) / (sum_j' a_j' w+_j'i + eps)``, biases ignored, ``w``
    replaced by the folded ``w gamma / sigma`` when a BatchNorm follows. Computed as
    ``a * J^T(P / (W+ a))`` with one forward and one transposed call of the same function.

    Fallback (recorded): an input with negative values (below the first ReLU, after SiLU,
    GELU or LayerNorm) is split over positive contributions, ``a+ w+`` and ``a- w-``
    (LRP alpha=1, beta=0, as zennit's ZPlus), which keeps ``P`` non-negative and conserved.

    On the top layer of c-MWP the dual (negated weights) is subtracted here, once.

    Parameters
    ----------
    stabilizer : float
        Added to the denominator.
    """

    description = "z+ (positive weights, biases ignored)"

    def __init__(self, stabilizer: float = 1e-9) -> None:
        self.stabilizer = stabilizer

    def backward(self, call, inputs, grad):
        (x,) = inputs
        w = call.args[1].detach()
        if call.scale is not None and not bool((call.scale > 0).all()):
            # The folded weights are w * s per output channel (s = gamma / sigma). In the
            # z+ ratio a positive s cancels (up to the stabiliser), so only its sign is
            # applied: a negative gamma selects the other half of the weights.
            w = w * torch.sign(call.scale).view(-1, *([1] * (w.dim() - 1))).to(w)
        signed = not call.nonneg and bool(x.min() < 0) if x.numel() else False
        if signed:
            call.log.fallback(
                f"{call.func.__name__}: input has negative values, z+ split over positive "
                "contributions a+w+ and a-w- (LRP alpha1-beta0)",
                call.where,
            )
        p = self._excite(call, x, w, grad, signed)
        if call.contrast:
            p = p - self._excite(call, x, -w, grad, signed)
        return (p,)

    def _excite(self, call, x, w, grad, signed):
        eps = self.stabilizer
        if getattr(call.func, "__name__", "") == "linear" and w.dim() == 2:
            return _linear_zplus(x, w, grad, eps, signed)

        def lin(weight):
            return lambda inp: call.run(inp, arg1=weight, arg2=None)

        if not signed:
            return _excite_through(lin(w.clamp(min=0)), x, grad, lambda z: _stabilise_(z, eps))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        with torch.enable_grad():
            xpg = xp.detach().requires_grad_(True)
            xng = xn.detach().requires_grad_(True)
            z = call.run(xpg, arg1=wp, arg2=None) + call.run(xng, arg1=wn, arg2=None)
            gp, gn = torch.autograd.grad(z, (xpg, xng), grad / _stabilise_(z.detach(), eps))
        return xp * gp + xn * gn


#: Elements of a weight block processed at once by :func:`_linear_zplus` (~8 MB float32).
_BLOCK = 1 << 21


def _linear_zplus(
    x: torch.Tensor, w: torch.Tensor, grad: torch.Tensor, eps: float, signed: bool
) -> torch.Tensor:
    """The z⁺ rule of a fully connected layer, blocked over output units.

    Same result as the generic path, but each block of rows of ``w`` is clamped, used for
    ``z+`` and for the transposed product while it is still in cache, so a large classifier
    matrix (VGG's 4096 x 25088) is read once instead of four times; blocks whose outputs
    carry no ``P`` (a one-hot top signal) are skipped.
    """
    x2 = x.reshape(-1, x.shape[-1])
    g2 = grad.reshape(-1, grad.shape[-1])
    live = (g2 != 0).any(0)
    step = max(1, _BLOCK // max(1, w.shape[1]))
    parts = (x2.clamp(min=0), x2.clamp(max=0)) if signed else (x2,)
    acc = [torch.zeros_like(x2) for _ in parts]
    for r in range(0, w.shape[0], step):
        if not bool(live[r : r + step].any()):
            continue
        wc = w[r : r + step]
        ws = (wc.clamp(min=0), wc.clamp(max=0)) if signed else (wc.clamp(min=0),)
        z = parts[0] @ ws[0].T
        for xp, wp in zip(parts[1:], ws[1:]):
            z.addmm_(xp, wp.T)
        s = torch.div(g2[:, r : r + step], _stabilise_(z, eps), out=z)
        for a, wp in zip(acc, ws):
            a.addmm_(s, wp)
    out = parts[0] * acc[0]
    for xp, a in zip(parts[1:], acc[1:]):
        out.addcmul_(xp, a)
    return out.view_as(x)


class Proportional(Rule):
    """Average / adaptive-average pooling and means: proportional split (METHODS §2.1).

    ``P(a_j) = sum_i a_j / (sum_{j' in window i} a_j') P(a_i)``, computed as
    ``a * J^T(P / f(a))`` for the pooling function ``f`` (the ``1/k`` of an average cancels).
    Signed inputs keep the raw proportion (zennit's Norm rule); the sum is stabilised.

    Parameters
    ----------
    stabilizer : float
        Added to the window sum with its sign.
    """

    description = "proportional split over the window"

    def __init__(self, stabilizer: float = 1e-9) -> None:
        self.stabilizer = stabilizer

    def backward(self, call, inputs, grad):
        (x,) = inputs
        eps = self.stabilizer
        if call.nonneg:
            return (_excite_through(call.run, x, grad, lambda y: _stabilise_(y, eps)),)
        return (_excite_through(call.run, x, grad, lambda y: _stabilise(y, eps)),)


class SplitSum(Rule):
    """Residual and functional additions ``y = sum_k c_k x_k``: split in proportion.

    ``P(x_k) = c_k x_k / stab(sum_k' c_k' x_k') P(y)`` (METHODS §2.1, guarded against
    ``y = 0``). Operands that are broadcast (fewer elements than the output), parameters or
    numbers are biases and get nothing, as biases everywhere in Excitation Backprop.

    Parameters
    ----------
    stabilizer : float
        Added to the sum with its sign.
    """

    description = "split in proportion to each branch"

    def __init__(self, stabilizer: float = 1e-9) -> None:
        self.stabilizer = stabilizer

    def backward(self, call, inputs, grad):
        if len(inputs) == 1:
            return (grad,)
        parts = [x if c == 1 else c * x for c, x in zip(call.coefs, inputs)]
        total = parts[0] + parts[1]
        for p in parts[2:]:
            total += p
        e = torch.tensor(_eps(self.stabilizer, total.dtype), dtype=total.dtype)
        total.add_(torch.copysign(e.to(total.device), total))  # sign(0) = +1
        s = torch.div(grad, total, out=total)
        return tuple(p * s for p in parts)


class WinnerTakesAll(Rule):
    """Max pooling: the winner of each window takes all (the plain gradient does this)."""

    description = "winner takes all"
    saves_inputs = False
    wraps = False


class Route(Rule):
    """Concatenation, views, slices: ``P`` routed to the parts (the plain gradient)."""

    description = "routed to its parts"
    saves_inputs = False
    wraps = False


class PassThrough(Rule):
    """Elementwise activations (and normalisations, as a fallback): ``P(in) = P(out)``.

    Parameters
    ----------
    description : str
        Shown in the metadata.
    fallback : str, optional
        When given, every use is recorded as a fallback with this text.
    """

    saves_inputs = False

    def __init__(self, description: str = "pass-through", fallback: str | None = None) -> None:
        self.description = description
        self.fallback = fallback

    def prepare(self, call):
        if self.fallback:
            call.log.fallback(f"{_name(call.func)}: {self.fallback}", call.where)

    def backward(self, call, inputs, grad):
        return (grad,) + (None,) * (len(call.slots) - 1)

    def __repr__(self) -> str:
        return f"PassThrough({self.description!r})"


class FoldBatchNorm(Rule):
    """BatchNorm folded into the preceding conv / linear layer (METHODS §2.1, default).

    At forward time, an eval-mode BatchNorm whose input is the output of a recorded conv or
    linear call sets that call's ``scale = gamma / sqrt(var + eps)``, so its z⁺ rule uses
    the folded weights ``w gamma / sigma`` (the folded bias is ignored like every bias); the
    BatchNorm itself then passes ``P`` through. A positive scale cancels in the z⁺ ratio, so
    only its sign is applied (a negative ``gamma`` selects the negative weights).
    Fallback (recorded): a BatchNorm after anything else (pre-activation nets, after a
    concatenation) or using batch statistics is the identity.

    Parameters
    ----------
    fold : bool
        ``False`` treats every BatchNorm as the identity (TorchRay and the Caffe reference).
    """

    saves_inputs = False

    def __init__(self, fold: bool = True) -> None:
        self.fold = fold
        self.description = (
            "folded into the preceding conv" if fold else "identity (not folded)"
        )

    def prepare(self, call):
        if not self.fold:
            return
        x = call.args[call.slots[0]]
        prev = getattr(x.grad_fn, "call", None)
        running_mean, running_var = call.args[1], call.args[2]
        weight, training, eps = call.args[3], call.args[5], call.args[7]
        ok = (
            isinstance(prev, OpCall)
            and prev.kind == "linear"
            and prev.scale is None
            and _name(prev.func) in _FOLDABLE
            and not training
            and running_mean is not None
            and running_var is not None
        )
        if not ok:
            call.log.fallback(
                "BatchNorm not right after a conv/linear layer (or using batch statistics): "
                "identity",
                call.where,
            )
            return
        scale = torch.rsqrt(running_var.detach().to(x.dtype) + eps)
        if weight is not None:
            scale = scale * weight.detach().to(x.dtype)
        prev.scale = scale

    def backward(self, call, inputs, grad):
        return (grad,)

    def __repr__(self) -> str:
        return f"FoldBatchNorm(fold={self.fold})"


_FOLDABLE = {"conv1d", "conv2d", "conv3d", "linear"}


class Gate(Rule):
    """Elementwise products and divisions ``x * g``, ``x / g``: treated as gating.

    ``P`` goes entirely to the gated signal ``x`` (the first operand with the output's
    shape); the gate (squeeze-excitation branch, layer scale, constant) gets none. When two
    operands have the output's shape the first is taken as the signal, recorded as a
    fallback.
    """

    description = "gated signal takes all, the gate none"
    saves_inputs = False

    def backward(self, call, inputs, grad):
        return (grad,) + (None,) * (len(call.slots) - 1)


def _name(func: Callable) -> str:
    return getattr(func, "__name__", type(func).__name__)


def default_rules(
    stabilizer: float = 1e-9, batchnorm: str = "fold"
) -> dict[str, Rule]:
    """The rule for each kind of operation (a composite, in zennit's terms).

    Parameters
    ----------
    stabilizer : float
        Denominator stabiliser of the z⁺, proportional and sum rules.
    batchnorm : {"fold", "identity"}
        BatchNorm treatment.

    Returns
    -------
    dict of str to Rule
        Keys: ``linear``, ``pool``, ``add``, ``maxpool``, ``route``, ``activation``,
        ``batchnorm``, ``norm``, ``gate``.
    """
    return {
        "linear": ZPlus(stabilizer),
        "pool": Proportional(stabilizer),
        "add": SplitSum(stabilizer),
        "maxpool": WinnerTakesAll(),
        "route": Route(),
        "activation": PassThrough("pass-through"),
        "batchnorm": FoldBatchNorm(fold=batchnorm == "fold"),
        "norm": PassThrough(
            "identity (fallback)",
            fallback="Excitation Backprop is undefined for data-dependent normalisation: "
            "identity",
        ),
        "gate": Gate(),
    }
