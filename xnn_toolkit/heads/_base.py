"""One base for the explainer heads: scikit-learn's parameter protocol and a kept global RNG.

Every head (:class:`~xnn_toolkit.heads.XNN`, :class:`~xnn_toolkit.heads.LassoXNN`,
:class:`~xnn_toolkit.heads.NMFConcepts`, :class:`~xnn_toolkit.heads.PerClassNMF`,
:class:`~xnn_toolkit.heads.ClassPaths`, :class:`~xnn_toolkit.heads.InformationDropout`,
:class:`~xnn_toolkit.heads.ClassSpecificGates`) derives from :class:`Head`:

- its ``__init__`` only stores its parameters, unchanged and under their own names, so
  ``get_params(deep=...)``, ``set_params(**params)`` and :func:`sklearn.base.clone` come from
  the signature (scikit-learn's :class:`~sklearn.base.BaseEstimator`); validation happens in
  ``fit``; learned attributes end in ``_``;
- its ``fit`` draws random numbers only from generators seeded by ``random_state``: the
  caller's global torch, NumPy and Python random states are the same after ``fit`` as before
  (:func:`keeps_global_rng`), also when ``fit`` raises;
- :meth:`Head._saved_params` is the JSON form of the parameters that the heads' ``save``
  writes and ``load`` passes back to ``__init__``.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.base import BaseEstimator

__all__ = ["Head", "keeps_global_rng", "global_rng_kept"]

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Restore the global torch (CPU and initialised CUDA devices), NumPy and Python RNG states.

    Torch modules built inside (``nn.Linear`` initialises its weights from the global generator)
    and third-party code that seeds globally then leave the caller's random streams untouched.
    """
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what we keep
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


def keeps_global_rng(fn: F) -> F:
    """Decorate a ``fit`` so that it runs inside :func:`global_rng_kept`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with global_rng_kept():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _jsonable(v: Any) -> Any:
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor | np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    return str(v)  # a torch.device, a module path object: its name


class Head(BaseEstimator):
    """Base of the explainer heads (see the module docstring for the contract)."""

    def _saved_params(self) -> dict[str, Any]:
        """The parameters in JSON form (tuples as lists, devices and tensors as names / lists)."""
        return {k: _jsonable(v) for k, v in self.get_params(deep=False).items()}
