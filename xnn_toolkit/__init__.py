"""xnn_toolkit: post-hoc explanations of pretrained CNNs.

Model + data -> hooks -> activation bank -> heads -> attribution -> metrics -> report.
"""

from .errors import (
    AssetError,
    BankError,
    InputError,
    LayerNotFoundError,
    NotFittedError,
    SpecError,
    XnnError,
)
from .features import ActivationBank, extract
from .hooks import Recording, intervene, record
from .interop.maps import SavedMaps, load_maps
from .layers import default_read_layer, list_layers, resolve_layer, stages
from .models import LoadedModel, Preprocessing, load_model, save_model
from .report.scoring import ClassHeadTarget, ScoreResult, ScoringConfig, score_dataset

__version__ = "0.1.0"

__all__ = [
    "ActivationBank",
    "ClassHeadTarget",
    "LoadedModel",
    "Preprocessing",
    "extract",
    "load_maps",
    "load_model",
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
