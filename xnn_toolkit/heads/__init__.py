"""Explainer heads fitted on a frozen network's activations.

XNN / SRAE and its baselines (:doc:`/methods/xnn`), NMF concepts (§3), information-bottleneck class
paths and information-dropout masks (§4), class-specific gates (§5). Each follows the
scikit-learn estimator conventions: hyperparameters in ``__init__``, ``fit`` returns
``self``, learned attributes end in ``_``, ``save`` / ``load`` without pickle. Two fit
shapes: heads fitted on activations take ``fit(X, y=None, *, layer=None)`` (``XNN`` and
``LassoXNN`` with ``y`` the logits they mimic, ``labels=`` the positives; ``NMFConcepts``),
heads fitted through the model take ``fit(model, data)`` with ``data`` an ``(images,
labels)`` pair, a Dataset or a DataLoader (``ClassPaths``, ``InformationDropout``,
``ClassSpecificGates``). What the
fitted heads do to the model (NMF faithfulness and concept importance, the gates'
localization) are metrics (:mod:`xnn_toolkit.metrics`).
"""

from .gates import ClassSpecificGates, GateScores
from .infodrop import InformationDropout
from .lasso_xnn import LassoXNN
from .nmf import NMFConcepts
from .nmf_tools import PerClassNMF, RankTable, concept_maps, select_rank, top_images
from .path_analysis import HitRates, Misclassification
from .paths import ClassPaths
from .xnn import XNN

__all__ = [
    "XNN",
    "ClassPaths",
    "ClassSpecificGates",
    "GateScores",
    "HitRates",
    "InformationDropout",
    "LassoXNN",
    "Misclassification",
    "NMFConcepts",
    "PerClassNMF",
    "RankTable",
    "concept_maps",
    "select_rank",
    "top_images",
]
