"""Excitation Backprop rules: how one operation passes the winning probability down.

A rule is a small object (zennit style): :meth:`Rule.backward` receives the recorded call of
one operation (:class:`OpCall`: the torch function, its arguments, the saved inputs) and the
marginal winning probability ``P`` of its output, and returns ``P`` of each of its inputs.
The mechanism that records calls and wires rules into autograd is shared
(:mod:`xnn_toolkit.attribution.excitation`); the rules only say what :doc:`/methods/excitation`
says:

=======================  ====================================================================
kind                     rule
=======================  ====================================================================
``linear`` (conv, fc)    :class:`ZPlus`: ``P(a_j) = sum_i a_j w+_ji / (sum_j' a_j' w+_j'i) P(a_i)``
``pool`` (avg, mean)     :class:`Proportional`: ``P(a_j) = a_j / (sum of the window) P(a_i)``
``add`` (``x + y``)      :class:`SplitSum`: each branch gets its share of the positive contributions
``maxpool``              :class:`WinnerTakesAll`: the plain gradient routes ``P`` to the winner
``activation``           :class:`PassThrough`: ``P(input) = P(output)``
``batchnorm``            :class:`FoldBatchNorm`: folded into the preceding conv, else identity
``norm`` (LayerNorm...)  :class:`PassThrough` with a recorded fallback (rule undefined)
``gate`` (``x * g``)     :class:`Gate`: ``P`` goes to the gated signal, the gate gets none
``route`` (cat, view)    :class:`Route`: the plain gradient routes ``P`` to the parts
=======================  ====================================================================

Divisions use a stabiliser added with the sign of the denominator. By default it is
*relative*: ``stabilizer`` times the largest ``|z|`` of the same image in that layer, so a map
does not depend on the magnitude of the activations (a network whose weights are all scaled
by ``1e-3`` gives the same map); ``stabilizer_mode="absolute"`` adds ``stabilizer`` itself
(zennit's and TorchRay's form). An exactly zero denominator always gives a zero share, so
``0 / 0`` is ``0`` and ``stabilizer=0`` never yields NaN. Biases are ignored.

Every wrapped call also books how much ``P`` it did not pass down (``P`` that reached units
with no positive contribution, ``z+ = 0``, or the stabiliser's share), so each attribution
reports where mass was lost (:class:`Conservation`).
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
        #: batch size of the attribution (per-image mass books need it); 0: no books
        self.batch = 0
        #: where -> per-image mass that a call did not pass down
        self.lost: dict[str, torch.Tensor] = {}
        #: the part of ``lost`` at conv / linear / pooling calls (units with z+ = 0)
        self.lost_zero: torch.Tensor | None = None
        #: per-image (target, dual) mass formed at the c-MWP top layer
        self.contrast: tuple[torch.Tensor, torch.Tensor] | None = None

    def _per_image(self, t: torch.Tensor) -> torch.Tensor | None:
        if t.dim() == 0 or t.shape[0] != self.batch:
            return None
        return t.detach().reshape(self.batch, -1).sum(1, dtype=torch.float64)

    def book(self, call: OpCall, grad: torch.Tensor, grads: tuple) -> None:
        """Book the mass ``call`` received (``grad``) and did not pass down (``grads``)."""
        if not self.batch:
            return
        into = self._per_image(grad)
        if into is None:
            return
        out = torch.zeros_like(into)
        for g in grads:
            if g is None:
                continue
            m = self._per_image(g)
            if m is None:
                return
            out += m
        if call.contrast and self.contrast is not None:
            out = self.contrast[0]  # the target half's books; the difference flows on
        lost = into - out
        key = call.where or f"functional.{_name(call.func)}"
        self.lost[key] = self.lost[key] + lost if key in self.lost else lost
        if call.kind in ("linear", "pool"):
            self.lost_zero = lost if self.lost_zero is None else self.lost_zero + lost

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
    books : bool
        Whether the mechanism books the mass the rule does not pass down (rules that can
        lose mass: z⁺, pooling, sums).
    """

    description = ""
    saves_inputs = True
    wraps = True
    books = False

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


STABILIZER_MODES = ("relative", "absolute")


def _scale(z: torch.Tensor, eps: float, relative: bool, nonneg: bool) -> torch.Tensor | float:
    """The stabiliser for denominators ``z``: ``eps`` or ``eps * max |z|`` per image."""
    if not relative or eps == 0:
        return _eps(eps, z.dtype) if eps else 0.0
    if z.dim() < 2 or z.numel() == 0:
        m = z.abs().amax() if z.numel() else z.new_zeros(())
        return m * eps
    m = z.reshape(z.shape[0], -1)
    m = (m if nonneg else m.abs()).amax(1)
    return (m * eps).view(-1, *([1] * (z.dim() - 1)))


def _stabilise(z: torch.Tensor, eps: float, relative: bool = False) -> torch.Tensor:
    """``z + e * sign(z)`` with ``sign(0) = +1`` (``e`` from :func:`_scale`)."""
    e = _scale(z, eps, relative, nonneg=False)
    return (
        z + torch.where(z >= 0, e, -e)
        if torch.is_tensor(e)
        else z + torch.where(z >= 0, e, -e).to(z.dtype)
    )


def _stabilise_(z: torch.Tensor, eps: float, relative: bool = False) -> tuple[torch.Tensor, bool]:
    """In-place :func:`_stabilise` for a tensor known to be non-negative.

    Returns the tensor and whether it may still hold zeros (only where the stabiliser is
    zero: ``eps = 0``, or an image whose denominators are all zero), so the zero mask of
    :func:`_divide` is only paid for when it can matter.
    """
    e = _scale(z, eps, relative, nonneg=True)
    z.add_(e)
    zeros = bool((e == 0).any()) if torch.is_tensor(e) else e == 0
    return z, zeros


def _divide(
    grad: torch.Tensor, z: torch.Tensor, inplace: bool = False, zeros: bool = True
) -> torch.Tensor:
    """``grad / z`` where ``z != 0``, else ``0`` (a unit with no contribution passes nothing).

    With ``inplace`` the result is written into ``z``; ``zeros=False`` says ``z`` has none.
    """
    if not zeros:
        return torch.div(grad, z, out=z) if inplace else grad / z
    zero = z == 0
    s = torch.div(grad, z, out=z) if inplace else grad / z
    return s.masked_fill_(zero, 0)


def _excite_through(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grad: torch.Tensor,
    denominator: Callable[[torch.Tensor], tuple[torch.Tensor, bool]],
) -> torch.Tensor:
    """``x * J^T(grad / denominator(fn(x)))``: the shared core of the z⁺ and pooling rules.

    ``J`` is the Jacobian of the linear map ``fn`` (one forward call and one transposed call;
    buffers are reused in place because these tensors are private to this function). A zero
    denominator gives a zero share (:func:`_divide`).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        y = fn(xg)
        z, zeros = denominator(y.detach())  # the output is not saved by its backward: reuse it
        s = _divide(grad, z, inplace=z.data_ptr() == y.data_ptr(), zeros=zeros)
        (g,) = torch.autograd.grad(y, xg, s)
    return g.mul_(x)


class _Stabilised(Rule):
    """A rule with a denominator stabiliser (relative by default, see the module notes)."""

    books = True

    def __init__(self, stabilizer: float = 1e-9, mode: str = "relative") -> None:
        if mode not in STABILIZER_MODES:
            raise ValueError(f"stabilizer mode must be one of {STABILIZER_MODES}, got {mode!r}")
        self.stabilizer = stabilizer
        self.mode = mode

    @property
    def relative(self) -> bool:
        return self.mode == "relative"

    def _stab_(self, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return _stabilise_(z, self.stabilizer, self.relative)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(stabilizer={self.stabilizer!r}, mode={self.mode!r})"


class ZPlus(_Stabilised):
    """The z⁺ rule of Excitation Backprop for conv and linear layers.

    ``P(a_j) = a_j sum_i w+_ji P(a_i) / stab(sum_j' a_j' w+_j'i)``, biases ignored, ``w``
    replaced by the folded ``w gamma / sigma`` when a BatchNorm follows. Computed as
    ``a * J^T(P / (W+ a))`` with one forward and one transposed call of the same function.
    A unit whose denominator is zero (no positive contribution, e.g. a depthwise filter with
    no positive weight) passes nothing down; the lost mass is booked per layer.

    Fallback (recorded): an input with negative values (below the first ReLU, after SiLU,
    GELU or LayerNorm) is split over positive contributions, ``a+ w+`` and ``a- w-``
    (LRP alpha=1, beta=0, as zennit's ZPlus), which keeps ``P`` non-negative and conserved.

    On the top layer of c-MWP the dual (negated weights) is subtracted here, once.

    Parameters
    ----------
    stabilizer : float
        Stabiliser of the denominator.
    mode : {"relative", "absolute"}
        ``stabilizer`` times the largest denominator of the image, or ``stabilizer`` itself.
    """

    description = "z+ (positive weights, biases ignored)"

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
            dual = self._excite(call, x, -w, grad, signed)
            log = call.log
            if log.batch and p.shape[0] == log.batch:
                log.contrast = (log._per_image(p), log._per_image(dual))
            p = p - dual
        return (p,)

    def _excite(self, call, x, w, grad, signed):
        eps = self.stabilizer
        if getattr(call.func, "__name__", "") == "linear" and w.dim() == 2:
            return _linear_zplus(x, w, grad, eps, signed, self.relative)

        def lin(weight):
            return lambda inp: call.run(inp, arg1=weight, arg2=None)

        if not signed:
            return _excite_through(lin(w.clamp(min=0)), x, grad, self._stab_)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        with torch.enable_grad():
            xpg = xp.detach().requires_grad_(True)
            xng = xn.detach().requires_grad_(True)
            z = call.run(xpg, arg1=wp, arg2=None) + call.run(xng, arg1=wn, arg2=None)
            zs, zeros = self._stab_(z.detach())
            s = _divide(grad, zs, inplace=True, zeros=zeros)
            gp, gn = torch.autograd.grad(z, (xpg, xng), s)
        return xp * gp + xn * gn


#: Elements of a weight block processed at once by :func:`_linear_zplus` (~8 MB float32).
_BLOCK = 1 << 21


def _linear_zplus(
    x: torch.Tensor,
    w: torch.Tensor,
    grad: torch.Tensor,
    eps: float,
    signed: bool,
    relative: bool = True,
) -> torch.Tensor:
    """The z⁺ rule of a fully connected layer, blocked over output units.

    Same result as the generic path, but each block of rows of ``w`` is clamped, used for
    ``z+`` and for the transposed product while it is still in cache, so a large classifier
    matrix (VGG's 4096 x 25088) is read once instead of four times; blocks whose outputs
    carry no ``P`` (a one-hot top signal) are skipped. The relative stabiliser is scaled by
    the largest denominator of the image among the units that carry ``P``.
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
        gb = g2[:, r : r + step]
        if relative and eps:
            m = (z * (gb != 0)).amax(1, keepdim=True)
            z.add_(m * eps)
            zeros = bool((m == 0).any())
        else:
            z, zeros = _stabilise_(z, eps)
        s = _divide(gb, z, inplace=True, zeros=zeros)
        for a, wp in zip(acc, ws):
            a.addmm_(s, wp)
    out = parts[0] * acc[0]
    for xp, a in zip(parts[1:], acc[1:]):
        out.addcmul_(xp, a)
    return out.view_as(x)


class Proportional(_Stabilised):
    """Average / adaptive-average pooling and means: proportional split.

    ``P(a_j) = sum_i a_j / stab(sum_{j' in window i} a_j') P(a_i)``, computed as
    ``a * J^T(P / f(a))`` for the pooling function ``f`` (the ``1/k`` of an average cancels).
    Signed inputs are split over their positive values (the z⁺ rule with the window's
    weights, which are positive), so ``P`` stays non-negative and bounded; a window with no
    positive value passes nothing (booked as lost).

    Parameters
    ----------
    stabilizer : float
        Stabiliser of the window sum.
    mode : {"relative", "absolute"}
        As for :class:`ZPlus`.
    """

    description = "proportional split over the window"

    def backward(self, call, inputs, grad):
        (x,) = inputs
        if call.nonneg:
            return (_excite_through(call.run, x, grad, self._stab_),)
        if x.numel() and bool(x.min() < 0):
            call.log.fallback(
                f"{_name(call.func)}: input has negative values, split over the positive ones",
                call.where,
            )
            return (_excite_through(call.run, x.clamp(min=0), grad, self._stab_),)
        return (_excite_through(call.run, x, grad, self._stab_),)


#: How :class:`SplitSum` shares ``P(y)`` among the branches of a sum.
RESIDUAL_SPLITS = ("positive", "absolute", "proportional")


class SplitSum(_Stabilised):
    """Residual and functional additions ``y = sum_k c_k x_k``: a bounded, conserving split.

    With ``t_k = c_k x_k`` the contribution of branch ``k``:

    - ``"positive"`` (default): ``P(x_k) = t_k+ / (sum_k' t_k'+) P(y)``, the z⁺ idea applied to
      a sum: only branches that push ``y`` up share ``P``; where no branch is positive the
      negative ones share it, ``t_k- / sum_k' t_k'-``.
    - ``"absolute"``: ``P(x_k) = |t_k| / (sum_k' |t_k'|) P(y)``.
    - ``"proportional"``: ``P(x_k) = t_k / stab(sum_k' t_k') P(y)`` (TorchRay's form; shares
      are unbounded and negative when the branches have opposite signs).

    The first two keep each share in ``[0, 1]`` and the shares sum to 1, so ``P`` is
    conserved and keeps its sign; where every branch is exactly zero the branches share
    ``P(y)`` equally. With non-negative branches all three are the same split. Operands that
    are broadcast (fewer elements than the output), parameters or numbers are biases and get
    nothing, as biases everywhere in Excitation Backprop.

    Parameters
    ----------
    stabilizer : float
        Stabiliser of the ``"proportional"`` split's denominator.
    mode : {"relative", "absolute"}
        Stabiliser mode, as for :class:`ZPlus`.
    split : {"positive", "absolute", "proportional"}
        The split.
    """

    description = "split in proportion to each branch"

    def __init__(
        self, stabilizer: float = 1e-9, mode: str = "relative", split: str = "positive"
    ) -> None:
        super().__init__(stabilizer, mode)
        if split not in RESIDUAL_SPLITS:
            raise ValueError(f"residual split must be one of {RESIDUAL_SPLITS}, got {split!r}")
        self.split = split
        self.description = f"{split} split over the branches"

    def backward(self, call, inputs, grad):
        if len(inputs) == 1:
            return (grad,)
        parts = [x if c == 1 else c * x for c, x in zip(call.coefs, inputs)]
        if self.split == "proportional":
            total = _stabilise(sum(parts[1:], parts[0]), self.stabilizer, self.relative)
            s = _divide(grad, total, inplace=True)
            return tuple(p * s for p in parts)
        if self.split == "absolute":
            shares = [p.abs() for p in parts]
        else:
            pos = [p.clamp(min=0) for p in parts]
            neg = [p.clamp(max=0) for p in parts]
            any_pos = sum(pos[1:], pos[0]) > 0
            shares = [torch.where(any_pos, a, b) for a, b in zip(pos, neg)]
        total = sum(shares[1:], shares[0])
        empty = total == 0
        equal = torch.full_like(total, 1.0 / len(parts))
        s = torch.where(empty, 0.0, grad / total.masked_fill(empty, 1.0))
        return tuple(torch.where(empty, equal * grad, sh * s) for sh in shares)

    def __repr__(self) -> str:
        return f"SplitSum(split={self.split!r}, mode={self.mode!r})"


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
    """BatchNorm folded into the preceding conv / linear layer (:doc:`/methods/excitation`,
    default).

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
        self.description = "folded into the preceding conv" if fold else "identity (not folded)"

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
    stabilizer: float = 1e-9,
    batchnorm: str = "fold",
    *,
    stabilizer_mode: str = "relative",
    residual: str = "positive",
) -> dict[str, Rule]:
    """The rule for each kind of operation (a composite, in zennit's terms).

    Parameters
    ----------
    stabilizer : float
        Denominator stabiliser of the z⁺, proportional and sum rules.
    batchnorm : {"fold", "identity"}
        BatchNorm treatment.
    stabilizer_mode : {"relative", "absolute"}
        The stabiliser is ``stabilizer`` times the largest denominator of the image (default)
        or ``stabilizer`` itself.
    residual : {"positive", "absolute", "proportional"}
        How additions split ``P`` among their branches (:class:`SplitSum`).

    Returns
    -------
    dict of str to Rule
        Keys: ``linear``, ``pool``, ``add``, ``maxpool``, ``route``, ``activation``,
        ``batchnorm``, ``norm``, ``gate``.
    """
    return {
        "linear": ZPlus(stabilizer, stabilizer_mode),
        "pool": Proportional(stabilizer, stabilizer_mode),
        "add": SplitSum(stabilizer, stabilizer_mode, residual),
        "maxpool": WinnerTakesAll(),
        "route": Route(),
        "activation": PassThrough("pass-through"),
        "batchnorm": FoldBatchNorm(fold=batchnorm == "fold"),
        "norm": PassThrough(
            "identity (fallback)",
            fallback="Excitation Backprop is undefined for data-dependent normalisation: identity",
        ),
        "gate": Gate(),
    }
