"""Quantus both ways: our methods as a Quantus ``explain_func``; Quantus metrics in the runner."""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from .._guard import model_guard
from ..attribution.base import get_method
from ..errors import InputError, MissingExtraError, SpecError, close_matches
from ..layers import LayerSpec

__all__ = ["quantus_explain_func", "quantus_metric_names", "quantus_metric_spec"]

#: keyword arguments Quantus itself hands every explain_func; not method options
_QUANTUS_KWARGS = ("device", "softmax", "channel_first", "method", "abs", "normalise")


def quantus_explain_func(
    method: str, layer: LayerSpec | None = None, **options: object
) -> Callable[..., np.ndarray]:
    """A Quantus ``explain_func`` that computes ``method``'s heatmaps.

    Parameters
    ----------
    method : str
        A registered method name (see :func:`xnn_toolkit.attribution.available_methods`).
    layer : layer spec, optional
        The method's read layer (its default when ``None``).
    **options
        Hyperparameters of the method's constructor.

    Returns
    -------
    callable
        ``explain_func(model, inputs, targets, **kwargs) -> np.ndarray`` of shape
        ``N x 1 x H x W`` (float32), the contract Quantus metrics call. ``inputs`` may be a
        NumPy array or a tensor; it is moved to the model's device. Every call runs inside
        the model guard, so Quantus's own model copies (randomisation metrics) work too.

    Raises
    ------
    SpecError
        For an unknown method, naming the closest ones (raised here, not at the first call).

    Examples
    --------
    >>> import quantus  # doctest: +SKIP
    >>> metric = quantus.MaxSensitivity(nr_samples=3)  # doctest: +SKIP
    >>> metric(model=model, x_batch=x, y_batch=y, explain_func=quantus_explain_func("cmwp"))
    ... # doctest: +SKIP
    """
    cls = get_method(method)

    def explain_func(
        model: nn.Module, inputs: np.ndarray | torch.Tensor, targets: object, **kwargs: object
    ) -> np.ndarray:
        if not isinstance(model, nn.Module):
            raise InputError(
                f"explain_func needs the torch model, got {type(model).__name__}; pass the "
                "nn.Module to the Quantus metric"
            )
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None else torch.float32
        x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
        x = x.to(device=device, dtype=dtype)
        if targets is not None:
            targets = torch.as_tensor(np.asarray(targets)).long().reshape(-1).to(device)
        opts = {**options, **{k: v for k, v in kwargs.items() if k not in _QUANTUS_KWARGS}}
        heat = cls(model, layer=layer, **opts).attribute(x, targets).heatmap
        return heat[:, None].detach().cpu().numpy().astype(np.float32)

    explain_func.__name__ = f"xnn_{cls.name}"
    explain_func.__qualname__ = explain_func.__name__
    return explain_func


def _quantus_catalogue() -> dict[str, tuple[str, type]]:
    try:
        from quantus.helpers.constants import AVAILABLE_METRICS
    except ImportError as err:
        raise MissingExtraError(
            "quantus: metrics need the Quantus package, which is not installed; install the "
            "extra with: pip install 'xnn_toolkit[quantus]'"
        ) from err
    return {cls.__name__: (cat, cls) for cat, d in AVAILABLE_METRICS.items() for cls in d.values()}


#: Quantus categories whose metrics score the heatmaps against the object masks
_NEEDS_MASK = ("Localisation",)
#: Quantus categories whose metrics randomise a deep copy of the model's layers
_PERTURBS_MODEL = ("Randomisation",)
#: Quantus categories whose metrics read the attributions only (no model, no random draws):
#: the runner computes them in its metrics thread
_PURE = ("Complexity",)


def _check_perturbable(metric: str, model: Any) -> None:
    """Refuse, before any work, a model that a model-randomisation metric cannot perturb.

    Quantus copies the model (``copy.deepcopy``) and re-initialises its layers one by one with
    their ``reset_parameters``; a model that cannot be copied, or has no layer that can be
    re-initialised, would fail deep inside Quantus or score nothing.
    """
    import copy

    try:
        copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - any failure to copy means the same to the user
        raise InputError(
            f"quantus:{metric} randomises a copy of the model, but the model cannot be copied "
            f"({type(exc).__name__}: {exc}); remove what holds a lock, file or device handle "
            "from the model, or drop this metric"
        ) from exc
    if not any(
        hasattr(m, "reset_parameters") and any(True for _ in m.parameters(recurse=False))
        for m in model.modules()
    ):
        raise InputError(
            f"quantus:{metric} randomises the model's layers, but no layer of this model can be "
            "re-initialised (none has parameters and reset_parameters); drop this metric"
        )


def quantus_metric_names() -> list[str]:
    """The Quantus metrics the scoring runner accepts, as ``quantus:NAME``, sorted.

    Returns
    -------
    list of str
    """
    return sorted(f"quantus:{n}" for n in _quantus_catalogue())


def quantus_metric_spec(name: str) -> Any:
    """The runner's :class:`~xnn_toolkit.report.score_metrics.MetricSpec` for ``quantus:NAME``.

    The metric gets the heatmaps the runner already holds as ``a_batch`` (no second pass for
    the heatmaps themselves), the object masks as ``s_batch`` for localisation metrics, and
    the run's method as ``explain_func`` for the metrics that re-explain perturbed inputs or
    randomised models. Quantus's own defaults apply otherwise; its random draws are seeded
    from the runner's per-shard seed, so results do not depend on the number of processes.

    Parameters
    ----------
    name : str
        ``"quantus:NAME"`` with ``NAME`` a Quantus metric class (``Sparseness``,
        ``MaxSensitivity``, ``RandomLogit``, ...).

    Raises
    ------
    SpecError
        Unknown name: lists the closest and every available one.
    MissingExtraError
        Quantus is not installed.
    """
    from ..report.score_metrics import MetricSpec

    metric = name.split(":", 1)[1].strip()
    catalogue = _quantus_catalogue()
    lower = {k.lower(): k for k in catalogue}
    key = lower.get(metric.lower().replace("_", "").replace("-", ""))
    if key is None:
        names = quantus_metric_names()
        raise SpecError(
            f"unknown Quantus metric {name!r}; "
            + close_matches(f"quantus:{metric}", names)
            + f" Available: {', '.join(names)}"
        )
    category, cls = catalogue[key]
    needs = ("object_mask", "class") if category in _NEEDS_MASK else ("class",)

    pure = category in _PURE

    def compute(inp: Any) -> list[torch.Tensor]:
        if category in _PERTURBS_MODEL:
            _check_perturbable(key, inp.model)
        return [_run_quantus(cls, inp, category in _NEEDS_MASK, pure)]

    # Quantus's own checks and metrics are interpreter-bound: pure ones go to the runner's
    # metrics process where it has one
    return MetricSpec(f"quantus:{key}", needs, compute, pure=pure, offloads=pure)


@functools.cache
def _init_parameters(cls: type) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(cls.__init__).parameters)


def _run_quantus(cls: type, inp: Any, with_mask: bool, pure: bool = False) -> torch.Tensor:
    """One batch of one Quantus metric. ``pure``: the metric reads the attributions only; it
    gets no model and no explain function and runs without touching any global state (the
    runner calls it from its metrics thread)."""
    if bool((inp.classes < 0).any()):
        raise InputError(
            f"quantus:{cls.__name__} scores the model's output for a class, but this target "
            "explains no class; use a class target ('label' / 'predicted') or drop the metric"
        )
    accepted = _init_parameters(cls)
    kwargs: dict[str, object] = {"disable_warnings": True, "display_progressbar": False}
    if "num_classes" in accepted and not pure:
        with torch.no_grad():
            kwargs["num_classes"] = int(inp.model(inp.images[:1]).shape[1])
    if "return_last_correlation" in accepted:  # one number per image (MPRT)
        kwargs["return_last_correlation"] = True
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    n = inp.maps.shape[0]
    x = inp.images.detach().cpu().numpy()
    a = inp.maps.detach().cpu().numpy()[:, None].astype(np.float32)
    s = None
    if with_mask:
        s = inp.parts.object_mask.cpu().numpy()[:, None].astype(np.float64)
    device = str(inp.images.device)
    call = {
        "x_batch": x,
        "y_batch": inp.classes.cpu().numpy(),
        "a_batch": a,
        "s_batch": s,
        "device": device,
    }
    if pure:
        # the runner's metrics thread, which hands the work to its metrics process where the
        # run has one: no model, no explain function, and no global state touched (stdout,
        # warning filters and NumPy's generator belong to the main thread; disable_warnings
        # keeps Quantus quiet)
        return _per_image(cls, inp.offload(_quantus_pure, cls, kwargs, call), n)
    metric = cls(**kwargs)
    explain = quantus_explain_func(inp.method, **inp.method_options) if inp.method else None
    state = np.random.get_state()  # noqa: NPY002 - Quantus draws from the global generator
    # Quantus draws from NumPy's global generator: seed it from the runner's per-shard torch
    # generator so a shard gives the same numbers in any process, then restore the user's.
    np.random.seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))  # noqa: NPY002
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with model_guard(inp.model):
                out = metric(model=inp.model, explain_func=explain, **call)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return _per_image(cls, out, n)


def _quantus_pure(cls: type, kwargs: dict[str, object], call: dict[str, object]) -> Any:
    """A pure Quantus metric on one batch (NumPy in and out; may run in the metrics process)."""
    return cls(**kwargs)(model=None, explain_func=None, **call)


def _per_image(cls: type, out: Any, n: int) -> torch.Tensor:
    if isinstance(out, dict):
        out = list(out.values())[-1]
    values = np.asarray(out, dtype=np.float64)
    if values.shape != (n,):
        raise InputError(
            f"quantus:{cls.__name__} gives {values.shape} values for {n} images, not one number "
            "per image; the runner tabulates per-image scores only (call it through "
            "quantus_explain_func instead)"
        )
    return torch.from_numpy(values)
