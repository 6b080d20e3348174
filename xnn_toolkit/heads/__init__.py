"""Explainer heads fitted on a frozen network's activations.

XNN / SRAE and its baselines (:doc:`/methods/xnn`), NMF concepts (§3), information-bottleneck class
paths and information-dropout masks (§4), class-specific gates (§5). Each follows the
scikit-learn estimator conventions: hyperparameters in ``__init__``, ``fit`` returns
``self``, learned attributes end in ``_``, ``save`` / ``load`` without pickle.
"""

from .gates import ClassSpecificGates, GateScores
from .infodrop import InformationDropout
from .nmf import (
    NMFConcepts,
    NMFFaithfulness,
    PerClassNMF,
    RankTable,
    concept_importance,
    concept_maps,
    nmf_faithfulness,
    select_rank,
    top_images,
)
from .paths import ClassPaths, HitRates, Misclassification
from .xnn import XNN, LassoXNN

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
    "NMFFaithfulness",
    "PerClassNMF",
    "RankTable",
    "concept_importance",
    "concept_maps",
    "nmf_faithfulness",
    "select_rank",
    "top_images",
]
