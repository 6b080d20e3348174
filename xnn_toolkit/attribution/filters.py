"""Maps of single filters: GradMap and ActivMap (:doc:`/methods/cam`, Liang et al. 2020 appendix G).

- GradMap of filter ``k``: the gradient of its average-pooled activation w.r.t. the input,
  reduced over colour channels (``sum_c |g_c|``), divided by the root of its second moment
  (``sqrt(mean g^2)`` over the image), blurred with a Gaussian (``sigma = 5`` px); the
  segmentation keeps values above 1.0.
- ActivMap of filter ``k``: its activation map upsampled bilinearly; the segmentation keeps
  values above the filter's top-30 % threshold over a dataset
  (:func:`activation_thresholds`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._guard import model_guard
from ..errors import InputError
from ..layers import LayerSpec, default_read_layer, resolve_layer
from ._capture import _backward_to_read, _run
from .base import Attribution, AttributionInfo, AttributionMethod, _upsample, register_method
from .targets import Channel, Class, Target, _per_image, as_target

__all__ = ["GradMap", "ActivMap", "activation_thresholds", "activmap_masks", "top_share_thresholds"]


def _gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur ``N x H x W`` maps with a Gaussian of std ``sigma`` px.

    Separable kernel truncated at ``int(4 sigma + 0.5)`` px and edges replicated, as
    ``scipy.ndimage.gaussian_filter(mode="nearest")``.
    """
    if sigma <= 0:
        return maps.clone()
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = maps[:, None]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return x[:, 0]


def _filter_target(target: object, n: int, layer: LayerSpec) -> Target:
    """Ints are filter indices of ``layer``; a Target is used as given."""
    if isinstance(target, Target):
        tgt = target
    elif target is None:
        raise InputError("target: a filter map needs the filter index (an int or one per image)")
    else:
        tgt = as_target(target, n)
        if not isinstance(tgt, Class) or tgt.index is None:
            raise InputError(
                "a filter map target is a filter index (int, one int per image) or a Target"
            )
        tgt = Channel(layer, tgt.index)
    tgt.validate(n)
    return tgt


@register_method("gradmap", "grad_map")
class GradMap(AttributionMethod):
    """GradMap of a filter: normalised, blurred input gradient of its average pool.

    :doc:`/methods/cam`. ``heatmap = blur_sigma(m / sqrt(mean(m^2)))`` with
    ``m = sum_c |d mean_hw A_k / d x_c|``; ``mask = heatmap > threshold``.

    Parameters
    ----------
    model : nn.Module
        The network.
    layer : layer spec, optional
        The layer of the filter; default :func:`~xnn_toolkit.layers.default_read_layer`.
    sigma : float
        Gaussian blur std in pixels (5 in the paper).
    threshold : float
        Segmentation threshold on the normalised map (1.0 in the paper).

    Notes
    -----
    ``target``: a filter index (int, or one per image) of ``layer``, or any
    :class:`~xnn_toolkit.attribution.targets.Target` (the gradient of its score is used).
    ``raw`` is the input gradient ``N x C x H x W``.
    """

    explains = "filter"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | None = None,
        *,
        sigma: float = 5.0,
        threshold: float = 1.0,
    ) -> None:
        super().__init__(model, layer)
        if not sigma >= 0:
            raise InputError(f"sigma must be >= 0 pixels, got {sigma!r}")
        self.sigma = float(sigma)
        self.threshold = float(threshold)

    def _as_target(self, target, n):
        layer = self.layer if self.layer is not None else default_read_layer(self.model)
        return _filter_target(target, n, layer)

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        fwd = _run(self.model, x, target, "input")
        grad = _backward_to_read(fwd, target.weights(fwd.top).detach())
        m = grad.abs().sum(1)
        rms = m.pow(2).mean((1, 2), keepdim=True).sqrt()
        m = torch.where(rms > 0, m / rms.clamp(min=torch.finfo(m.dtype).tiny), 0.0)
        heat = _gaussian_blur(m, self.sigma)
        info = AttributionInfo(
            method=self.name,
            layer="input",
            target=target.describe(),
            params={"sigma": self.sigma, "threshold": self.threshold},
        )
        return Attribution(grad, heat, info, mask=heat > self.threshold)


@register_method("activmap", "activ_map", "activation_map")
class ActivMap(AttributionMethod):
    """ActivMap of a filter: its activation map, upsampled bilinearly (:doc:`/methods/cam`).

    Parameters
    ----------
    model : nn.Module
        The network.
    layer : layer spec, optional
        The conv layer of the filter; default :func:`~xnn_toolkit.layers.default_read_layer`.
    thresholds : Tensor, optional
        ``K`` per-filter thresholds (:func:`activation_thresholds`); when given, ``mask`` is
        the upsampled map above its filter's threshold.

    Notes
    -----
    ``target``: a filter index (int, or one per image) or a
    :class:`~xnn_toolkit.attribution.targets.Channel` of ``layer``. ``raw`` is ``N x h x w``.
    """

    explains = "filter"

    def __init__(
        self,
        model: nn.Module,
        layer: LayerSpec | None = None,
        *,
        thresholds: torch.Tensor | None = None,
    ) -> None:
        super().__init__(model, layer)
        if thresholds is not None:
            thresholds = torch.as_tensor(thresholds)
            if thresholds.dim() != 1:
                raise InputError(
                    f"thresholds must be a K vector, got shape {tuple(thresholds.shape)}"
                )
        self.thresholds = thresholds

    def _as_target(self, target, n):
        layer = self.layer if self.layer is not None else default_read_layer(self.model)
        tgt = _filter_target(target, n, layer)
        if not isinstance(tgt, Channel):
            raise InputError(f"ActivMap needs a filter index or a Channel, not {tgt.describe()}")
        return tgt

    def _attribute(self, x: torch.Tensor, target: Target) -> Attribution:
        assert isinstance(target, Channel)
        with torch.no_grad():
            fwd = _run(self.model, x, target, None)
        acts = fwd.top.detach()
        if acts.dim() != 4:
            raise InputError(
                f"ActivMap needs a conv layer (N x K x h x w), got shape {tuple(acts.shape)}"
            )
        idx = _per_image(target.channel, acts.shape[0], "the filter index")
        if int(idx.max()) >= acts.shape[1] or int(idx.min()) < 0:
            raise InputError(f"filter index out of range: the layer has {acts.shape[1]} filters")
        raw = acts[torch.arange(acts.shape[0]), idx.to(acts.device)]
        heat = _upsample(raw, tuple(x.shape[-2:]))
        mask = None
        if self.thresholds is not None:
            if self.thresholds.numel() != acts.shape[1]:
                raise InputError(
                    f"{self.thresholds.numel()} thresholds for a layer with {acts.shape[1]} "
                    "filters; compute them with activation_thresholds on this layer"
                )
            mask = activmap_masks(heat, self.thresholds.to(heat)[idx.to(heat.device)])
        name = resolve_layer(self.model, target.layer)[0] if target.layer is not None else ""
        info = AttributionInfo(method=self.name, layer=name, target=target.describe())
        return Attribution(raw, heat, info, mask=mask)


def _images(batch: object) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise InputError(
        f"data must yield image tensors or (images, ...) tuples, got {type(batch).__name__}"
    )


def activation_thresholds(
    model: nn.Module,
    data: Iterable[object],
    layer: LayerSpec | None = None,
    *,
    top: float = 0.3,
    max_values: int = 100_000,
    random_state: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-filter thresholds that keep the top ``top`` share of activations over a dataset.

    ``thr_k`` is the ``ceil((1 - top) M)``-th smallest of the ``M`` activation values of
    filter ``k`` (all images, all positions, at the layer's resolution) — the ActivMap
    segmentation threshold of :doc:`/methods/cam`. Exact while the dataset has at most
    ``max_values`` positions; beyond, a uniform reservoir sample of ``max_values`` positions
    (the same positions for every filter) is used.

    Parameters
    ----------
    model : nn.Module
        The network (left unchanged).
    data : Tensor or iterable
        One ``N x C x H x W`` batch, or an iterable (e.g. a DataLoader) yielding such
        tensors or tuples whose first item is one.
    layer : layer spec, optional
        Default :func:`~xnn_toolkit.layers.default_read_layer`.
    top : float
        Share of activations above the threshold (0.3 in the paper).
    max_values : int
        Positions kept per filter (memory ``K x max_values`` floats).
    random_state : int
        Seed of the reservoir sample.
    device : torch.device or str, optional
        Where to run the model; default the device of its parameters.

    Returns
    -------
    Tensor
        ``K`` thresholds (CPU, float32).
    """
    if not 0 < top < 1:
        raise InputError(f"top must be in (0, 1), got {top!r}")
    if max_values < 1:
        raise InputError(f"max_values must be >= 1, got {max_values!r}")
    layer = layer if layer is not None else default_read_layer(model)
    name, module = resolve_layer(model, layer)
    if isinstance(data, torch.Tensor):
        data = [data]
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(random_state)
    buf: torch.Tensor | None = None
    seen = 0
    grabbed: dict[str, torch.Tensor] = {}

    def hook(_m, _i, out):
        grabbed["a"] = out if isinstance(out, torch.Tensor) else out[0]

    with model_guard(model, eval_mode=True, freeze=True), torch.no_grad():
        handle = module.register_forward_hook(hook)
        try:
            for batch in data:
                x = _images(batch).to(device)
                model(x)
                a = grabbed.pop("a", None)
                if a is None or a.dim() < 2:
                    raise InputError(f"layer {name!r} produced no N x K x ... activation")
                cols = a.detach().transpose(0, 1).reshape(a.shape[1], -1).float().cpu()
                buf, seen = _reservoir(buf, seen, cols, max_values, gen)
        finally:
            handle.remove()
    if buf is None:
        raise InputError("data yielded no batches")
    return top_share_thresholds(buf, top)


def top_share_thresholds(values: torch.Tensor, top: float) -> torch.Tensor:
    """The ActivMap threshold of each row: the ``ceil((1 - top) M)``-th smallest of its ``M``
    values, so that the top ``top`` share lies above it (``>``: a filter that is zero on most
    positions segments only where it fires, never the whole image).

    Parameters
    ----------
    values : Tensor
        ``K x M``: the activations of each filter over positions (all images).
    top : float
        Share above the threshold, in (0, 1).

    Returns
    -------
    Tensor
        ``K`` thresholds.
    """
    if not 0 < top < 1:
        raise InputError(f"top must be in (0, 1), got {top!r}")
    k = max(1, math.ceil((1.0 - top) * values.shape[1]))
    return values.kthvalue(k, dim=1).values


def activmap_masks(heat: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """ActivMap segmentations: the upsampled maps above their filter's threshold.

    Parameters
    ----------
    heat : Tensor
        ``... x H x W`` upsampled activation maps.
    thresholds : Tensor
        Thresholds broadcast over the leading dimensions of ``heat`` (one per map).

    Returns
    -------
    Tensor
        Bool, the shape of ``heat``.
    """
    return heat > thresholds.to(heat)[..., None, None]


def _reservoir(
    buf: torch.Tensor | None, seen: int, cols: torch.Tensor, cap: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    """Algorithm R over columns (positions), vectorised per batch; returns (buffer, seen)."""
    b = cols.shape[1]
    if buf is None:
        buf = cols[:, :cap].clone()
        taken = buf.shape[1]
    else:
        taken = 0
        if buf.shape[1] < cap:
            taken = min(cap - buf.shape[1], b)
            buf = torch.cat([buf, cols[:, :taken]], 1)
    rest = b - taken
    if rest > 0:
        t = torch.arange(seen + taken, seen + b, dtype=torch.float64)
        r = torch.floor(torch.rand(rest, generator=gen, dtype=torch.float64) * (t + 1)).long()
        keep = r < cap
        if keep.any():
            slots = r[keep]
            src = torch.arange(taken, b)[keep]
            # sequential semantics: of several replacements of one slot, the last one wins
            last = torch.full((cap,), -1, dtype=torch.long)
            last.scatter_reduce_(0, slots, src, reduce="amax")
            hit = last >= 0
            buf[:, hit] = cols[:, last[hit]]
    return buf, seen + b
