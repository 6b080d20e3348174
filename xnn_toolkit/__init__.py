"""xnn_toolkit: post-hoc explanations of pretrained CNNs.

Model + data -> hooks -> activation bank -> heads -> attribution -> metrics -> report.

The names here are the notebook path: :func:`load_model`, :func:`extract`, :func:`explain`,
:func:`score_dataset` and :func:`save_figure`. Importing the package loads neither the report
stage nor matplotlib: the batch-scoring and figure names are imported on first use.
"""

import importlib
from typing import Any

from .attribution.base import available_methods, explain
from .attribution.targets import ClassHeadTarget
from .bank import ActivationBank, extract
from .errors import (
    AssetError,
    BankError,
    InputError,
    LayerNotFoundError,
    NotFittedError,
    SpecError,
    XnnError,
)
from .hooks import Recording, intervene, record
from .interop.maps import SavedMaps, load_maps
from .layers import default_read_layer, list_layers, resolve_layer, stages
from .models import LoadedModel, Preprocessing, load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "ActivationBank",
    "ClassHeadTarget",
    "LoadedModel",
    "Preprocessing",
    "available_methods",
    "explain",
    "extract",
    "load_maps",
    "load_model",
    "save_figure",
    "save_model",
    "score_dataset",
    "SavedMaps",
    "ScoreResult",
    "ScoringConfig",
    "AssetError",
    "BankError",
    "InputError",
    "LayerNotFoundError",
    "NotFittedError",
    "Recording",
    "SpecError",
    "XnnError",
    "default_read_layer",
    "list_layers",
    "intervene",
    "record",
    "resolve_layer",
    "stages",
]

# Imported on first use (PEP 562), so that ``import xnn_toolkit`` stays light.
_LAZY = {
    "ScoreResult": "xnn_toolkit.report.scoring",
    "ScoringConfig": "xnn_toolkit.report.scoring",
    "score_dataset": "xnn_toolkit.report.scoring",
    "save_figure": "xnn_toolkit.viz",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'xnn_toolkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
