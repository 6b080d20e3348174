"""Class activation maps: CAM, Grad-CAM and Grad-CAM++ (:doc:`/methods/cam`).

All three weight the activation maps ``A_k`` (``N x K x h x w``) of one layer and sum them:

- CAM (Zhou et al. 2016): ``sum_k W_ck A_k`` with the weights of the final linear layer of a
  network that ends in global average pooling + one linear layer;
- Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k alpha_k A_k)``, ``alpha_k`` the spatial mean
  of ``d score / d A_k``;
- Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): ``alpha_k = sum_ij relu(g_ij) a_ij`` with
  ``a_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3)`` (the exponential-score form, as the
  ``grad-cam`` package computes it).

Maps are batched with one target per image; heatmaps are upsampled bilinearly.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import InputError, SpecError
from ..layers import LayerSpec, resolve_layer, stages
from ._capture import _backward_to_read, _note_output, _run
from .base import Attribution, AttributionInfo, AttributionMethod, _upsample, register_method
from .targets import Class, Logits, Target

__all__ = ["CAM", "GradCAM", "GradCAMPlusPlus"]


def _last_stage(model: nn.Module) -> str:
    st = stages(model)
    if not st:
        raise SpecError(
            f"could not find the stages of {type(model).__name__}; pass layer= explicitly"
        )
    return st[-1].name


class _GradientCAM(AttributionMethod):
    """Shared forward/backward of the gradient-weighted CAMs."""

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None) -> None:
        super().__init__(model, layer)

    def _weights(self, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        read = self.layer if self.layer is not None else _last_stage(self.model)
        fwd = _run(self.model, x, target, read)
        assert fwd.read is not None
        acts = fwd.read.detach()
        if acts.dim() != 4:
            raise InputError(
                f"{self.name} needs a conv layer (N x K x h x w), but {fwd.read_name!r} gives "
                f"shape {tuple(acts.shape)}"
            )
        grads = _backward_to_read(fwd, target.weights(fwd.top).detach())
        alpha = self._weights(acts, grads)  # N x K
        cam = torch.einsum("nk,nkhw->nhw", alpha, acts).clamp(min=0)
        info = AttributionInfo(method=self.name, layer=str(fwd.read_name), target=target.describe())
        return Attribution(cam, _upsample(cam, tuple(x.shape[-2:])), info)


@register_method("gradcam", "grad_cam")
class GradCAM(_GradientCAM):
    """Grad-CAM: ``ReLU(sum_k mean_ij(d score / d A_k) A_k)`` (:doc:`/methods/cam`).

    Parameters
    ----------
    model : nn.Module
        The network.
    layer : layer spec, optional
        The conv layer ``A``; default the last stage of the backbone.

    Notes
    -----
    ``raw`` is the ``N x h x w`` map (after the ReLU); ``heatmap`` its bilinear upsampling.
    Targets may be classes, logit mixtures, units, channels or head outputs above ``layer``.
    """

    def _weights(self, acts, grads):
        return grads.mean((2, 3))


@register_method("gradcam++", "gradcampp", "grad_cam_plus_plus", "gradcamplusplus")
class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19), the ``grad-cam`` package's form.

    ``alpha_k = sum_ij relu(g_kij) a_kij``,
    ``a_kij = g^2 / (2 g^2 + (sum_ab A_kab) g^3 + 1e-6)`` where ``g != 0``, else 0.

    Parameters
    ----------
    model : nn.Module
        The network.
    layer : layer spec, optional
        The conv layer; default the last stage.
    """

    def _weights(self, acts, grads):
        g2 = grads * grads
        g3 = g2 * grads
        total = acts.sum((2, 3), keepdim=True)
        a = g2 / (2 * g2 + total * g3 + 1e-6)
        a = torch.where(grads != 0, a, torch.zeros_like(a))
        return (grads.clamp(min=0) * a).sum((2, 3))


class _HeadTrace(TorchFunctionMode):
    """Record the calls that can make a GAP + linear head (no autograd needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.linears: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.pools: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "linear" and args:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            self.linears.append((args[0], weight, out))
        elif (
            name == "conv2d"
            and len(args) > 1
            and args[0].dim() == 4
            and args[0].shape[-2:] == (1, 1)
            and args[1].shape[-2:] == (1, 1)
            and (len(args) < 7 or args[6] == 1)
        ):  # a 1 x 1 conv on a pooled 1 x 1 map is a linear layer (DLA, some timm heads)
            self.linears.append((args[0].flatten(1), args[1].flatten(1), out.flatten(1)))
        elif (
            name in ("adaptive_avg_pool2d", "avg_pool2d", "mean")
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() == 4
            and isinstance(out, torch.Tensor)
        ):
            self.pools.append((args[0], out))
        return out


@register_method("cam")
class CAM(AttributionMethod):
    """Class activation map ``sum_k W_ck A_k`` (Zhou et al. 2016; :doc:`/methods/cam`).

    For networks that end in global average pooling + one linear layer: the final linear
    layer and the map it pools are found automatically by tracing the forward pass (the
    pooled map of a functional ``F.relu`` before the pool, as in DenseNet, is found too).
    The bias is not part of the map. The segmentation keeps the top ``top`` share of each
    upsampled map (default 30 %).

    Parameters
    ----------
    model : nn.Module
        A GAP + linear network.
    layer : layer spec, optional
        Must be ``None`` (found automatically) or a layer whose output is the pooled map.
    top : float
        Share of pixels kept by ``mask``.

    Notes
    -----
    Targets: classes or logit mixtures (CAM is linear in the logits). ``raw`` is ``N x h x w``
    (not clamped: negative evidence stays visible), ``heatmap`` its upsampling, and
    ``metadata.layer`` reads ``"<final linear>.input_map"`` (the map that is pooled).
    """

    reads_own_layer = True  # the map the pooled classifier reads, found by tracing the head

    def __init__(self, model: nn.Module, layer: LayerSpec | None = None, *, top: float = 0.3):
        super().__init__(model, layer)
        if not 0 < top <= 1:
            raise InputError(f"top must be in (0, 1], got {top!r}")
        self.top = top

    def _as_target(self, target, n):
        tgt = super()._as_target(target, n)
        if not isinstance(tgt, Class | Logits):
            raise InputError(
                f"CAM explains classes (logits) of a GAP + linear network, not {tgt.describe()}; "
                "use GradCAM for units, channels or head outputs"
            )
        return tgt

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        trace = _HeadTrace()
        handles = []
        layer_out: dict[str, torch.Tensor] = {}
        if self.layer is not None:
            name, module = resolve_layer(self.model, self.layer)

            def hook(_m, _i, out):
                if isinstance(out, torch.Tensor) and "a" not in layer_out:
                    layer_out["a"] = out.detach().clone()

            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad(), trace:
                out = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"{type(self.model).__name__} returned {type(out).__name__}, not a tensor of "
                "logits; wrap it so that it returns one tensor"
            )
        _note_output(x, out)
        acts, weight, where = self._find_head(trace, out)
        if self.layer is not None:
            got = layer_out.get("a")
            if got is None or got.shape != acts.shape or not torch.allclose(got, acts):
                raise InputError(
                    f"CAM reads the map pooled before the final linear layer; layer "
                    f"{self.layer!r} does not output it (leave layer=None)"
                )
        sel = target.weights(out)  # N x classes
        cam = torch.einsum("nc,ck,nkhw->nhw", sel, weight.detach().to(acts), acts)
        heat = _upsample(cam, tuple(x.shape[-2:]))
        flat = heat.flatten(1)
        k = max(1, int(round(self.top * flat.shape[1])))
        thr = flat.topk(k, dim=1).values[:, -1:]
        mask = (flat >= thr).view_as(heat)
        info = AttributionInfo(
            method=self.name,
            layer=where,
            target=target.describe(),
            params={"top": self.top},
        )
        return Attribution(cam, heat, info, mask=mask)

    def _find_head(
        self, trace: _HeadTrace, out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """The pooled map ``A`` (``N x K x h x w``), the final weights ``W`` and a name."""
        model = type(self.model).__name__
        hint = "use GradCAM, which works on any network"
        if not trace.linears:
            raise SpecError(f"CAM needs a final linear layer, but {model} has none; {hint}")
        feat, weight, lin_out = trace.linears[-1]
        if not (
            lin_out is out
            or (lin_out.numel() == out.numel() and torch.equal(lin_out.reshape(out.shape), out))
        ):
            raise SpecError(
                f"CAM needs the logits to be the output of the last linear layer, but {model} "
                f"transforms them further; {hint}"
            )
        n = out.shape[0]
        for inp, pooled in reversed(trace.pools):
            if pooled.numel() != feat.numel() or inp.shape[:2] != (n, feat.shape[-1]):
                continue
            flat = pooled.reshape(n, -1)
            if torch.equal(flat, feat.reshape(n, -1)) and torch.allclose(
                flat, inp.mean((2, 3)), rtol=1e-4, atol=1e-6
            ):
                fc = next(
                    (
                        name
                        for name, m in self.model.named_modules()
                        if isinstance(getattr(m, "weight", None), torch.Tensor)
                        and m.weight.data_ptr() == weight.data_ptr()
                    ),
                    "linear",
                )
                return inp.detach(), weight, f"{fc}.input_map"
        raise SpecError(
            f"CAM needs global average pooling right before the final linear layer, but the "
            f"input of {model}'s last linear layer is not a global average of a conv map "
            f"(e.g. an MLP classifier or a norm after the pool); {hint}"
        )
