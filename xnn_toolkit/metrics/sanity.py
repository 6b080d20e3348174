"""Cascading model-parameter randomisation (Adebayo et al. 2018; :doc:`/methods/metrics` "Sanity
check").

Starting from the top of the network, the parameters of one layer after another are
re-initialised (cumulatively, or one layer at a time with ``cascade=False``) on a deep copy of
the model — the user's model is never modified — and the explanation of the same inputs is
recomputed after each step. An explanation method that depends on the learned weights gives
heatmaps that drift away from the original ones: their rank correlation with the original
maps should fall towards 0.

Re-initialisation: a module with ``reset_parameters()`` (Conv, Linear, BatchNorm, ...) calls
it — the framework's own random initialisation, as in the paper; any other module that owns
parameters gets ``N(0, σ²)`` entries with ``σ`` the original tensor's standard deviation (1
when it is 0). Step ``i`` draws from a private generator seeded with ``seed + i`` (the global
random state is saved and restored), so results are reproducible.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..layers import LayerSpec, resolve_layer
from ._inputs import _as_maps

__all__ = ["SanityResult", "cascading_randomization", "pearson_correlation", "spearman_correlation"]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..D along the last axis, ties given their average rank (as scipy.stats.rankdata)."""
    d = x.shape[-1]
    srt, order = torch.sort(x, dim=-1, stable=True)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[..., 1:] = srt[..., 1:] != srt[..., :-1]
    pos = torch.arange(d, device=x.device).expand_as(srt)
    # first and last position of each run of equal values, spread over the run
    first = torch.where(new, pos, 0).cummax(-1).values
    end = torch.ones_like(new)
    end[..., :-1] = new[..., 1:]
    last = torch.where(end, pos, d - 1).flip(-1).cummin(-1).values.flip(-1)
    avg = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(avg)
    ranks.scatter_(-1, order, avg)
    return ranks


def pearson_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps (flattened).

    Parameters
    ----------
    a, b : Tensor
        ``N x H x W`` (or ``N x D``), same shape.

    Returns
    -------
    Tensor
        ``N`` float64 in [-1, 1]; 0 where either map is constant (no variation to compare).
    """
    x, y = _pair(a, b)
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    den = (x.square().sum(-1) * y.square().sum(-1)).sqrt()
    num = (x * y).sum(-1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1), 0).clamp(-1, 1)


def spearman_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps (ties get average ranks).

    Parameters
    ----------
    a, b : Tensor
        ``N x H x W`` (or ``N x D``), same shape.

    Returns
    -------
    Tensor
        ``N`` float64 in [-1, 1], equal to ``scipy.stats.spearmanr`` per row; 0 where either
        map is constant.
    """
    x, y = _pair(a, b)
    return pearson_correlation(_ranks(x), _ranks(y))


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_maps(a, "a", ndims=(2, 3, 4))
    y = _as_maps(b, "b", ndims=(2, 3, 4))
    if x.shape != y.shape:
        raise InputError(
            f"maps to compare must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    return x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double().to(x.device)


@dataclass
class SanityResult:
    """Similarity of heatmaps to the original ones as layers are randomised top-down.

    Attributes
    ----------
    layers : list of str
        The layer randomised at each step (``L`` steps), top first.
    original : Tensor
        ``N x H x W`` heatmaps of the unmodified model.
    spearman : Tensor
        ``L x N`` Spearman rank correlation with the original maps at each step.
    pearson : Tensor
        ``L x N`` Pearson correlation with the original maps.
    maps : Tensor or None
        ``L x N x H x W`` randomised heatmaps when ``keep_maps=True``.
    """

    layers: list[str]
    original: torch.Tensor
    spearman: torch.Tensor
    pearson: torch.Tensor
    maps: torch.Tensor | None = None


def _default_layers(model: nn.Module) -> list[str]:
    names = [
        name
        for name, module in model.named_modules()
        if name and any(True for _ in module.parameters(recurse=False))
    ]
    return names[::-1]


def _randomize(module: nn.Module, seed: int) -> None:
    devices = sorted(
        {p.device.index or 0 for p in module.parameters(recurse=False) if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        with torch.no_grad():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    std = float(p.float().std()) if p.numel() > 1 else 0.0
                    p.normal_(0.0, std if std > 0 else 1.0)


def _explain(explain_fn, model, x, shape=None) -> torch.Tensor:
    out = explain_fn(model, x)
    maps = _as_maps(out, "explain_fn(model, x)", ndims=(3,), expected="N x H x W")
    if maps.shape[0] != x.shape[0]:
        raise InputError(f"explain_fn returned {maps.shape[0]} maps for {x.shape[0]} inputs")
    if shape is not None and maps.shape != shape:
        raise InputError(
            f"explain_fn returned {tuple(maps.shape)} after randomisation, {tuple(shape)} before"
        )
    return maps.detach()


def cascading_randomization(
    model: nn.Module,
    inputs: torch.Tensor,
    explain_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    *,
    layers: Sequence[LayerSpec] | None = None,
    cascade: bool = True,
    seed: int = 0,
    absolute: bool = False,
    keep_maps: bool = False,
) -> SanityResult:
    """Cascading randomisation sanity check of an explanation method (Adebayo et al. 2018).

    Parameters
    ----------
    model : nn.Module
        The trained network; it is deep-copied and the copy (in eval mode) is randomised.
    inputs : Tensor
        ``N x C x H x W`` images on the model's device.
    explain_fn : callable
        ``explain_fn(model, inputs) -> N x H x W`` heatmaps; it receives the copy.
    layers : sequence of layer specs, optional
        Layers to randomise, in the order given (top first). Default: every module that owns
        parameters, in reverse definition order.
    cascade : bool
        Randomise cumulatively (default); with False each step randomises only its layer on
        a fresh copy (independent randomisation).
    seed : int
        Seed of the re-initialisation (step ``i`` uses ``seed + i``).
    absolute : bool
        Compare absolute values of the maps (Adebayo et al. report both).
    keep_maps : bool
        Also return every randomised map.

    Returns
    -------
    SanityResult
        ``L x N`` Spearman and Pearson correlations with the original maps.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(explain_fn):
        raise InputError("explain_fn must be a callable explain_fn(model, inputs) -> N x H x W")
    x = _as_maps(inputs, "inputs", ndims=(4,), expected="N x C x H x W")
    names = (
        _default_layers(model)
        if layers is None
        else [resolve_layer(model, spec)[0] for spec in layers]
    )
    if not names:
        raise InputError("the model has no layer with parameters to randomise")
    work = copy.deepcopy(model).eval()
    original = _explain(explain_fn, work, x)
    ref = original.abs() if absolute else original
    spear, pear, kept = [], [], []
    for i, name in enumerate(names):
        if not cascade:
            work = copy.deepcopy(model).eval()
        _randomize(work.get_submodule(name), seed + i)
        maps = _explain(explain_fn, work, x, original.shape)
        cmp = maps.abs() if absolute else maps
        spear.append(spearman_correlation(ref, cmp))
        pear.append(pearson_correlation(ref, cmp))
        if keep_maps:
            kept.append(maps)
    return SanityResult(
        layers=names,
        original=original,
        spearman=torch.stack(spear),
        pearson=torch.stack(pear),
        maps=torch.stack(kept) if keep_maps else None,
    )
