"""Explanation metrics (:doc:`/methods/metrics` and §8): pure, vectorised functions on tensors.

Every function works on the device of its inputs and accepts batches; dataset-level scores
have an accumulator class with ``update(batch)`` / ``result()`` so that a runner can stream
a dataset. Heatmaps are ``N x H x W`` or ``N x K x H x W`` float tensors; ground truth is a
:class:`xnn_toolkit.data.types.PartBatch` or plain tensors.

=========================  ===========================================================
module                     what
=========================  ===========================================================
``faithfulness``           ``F_reg``, ``F_cls``
``orthogonality``          ``O₁``, ``O₂`` (+ streaming covariance)
``locality``               pixel / keypoint / Voronoi (Alg. 3) / mask part probabilities,
                           locality entropy
``localization``           IoU, APn tables, pointing game, energy pointing game, top-k,
                           the localization of class-specific gated filters
``curves``                 deletion / insertion curves and areas, masking test
``sanity``                 cascading randomisation, Spearman / Pearson similarity
``information``            Gaussian total correlation, channel–class mutual information
``concepts``               NMF faithfulness (reconstruction in the forward pass), concept
                           importance
``invariance``             SHADE entropies, binned entropy split, BinAct test, probes
=========================  ===========================================================
"""

from ._inputs import resize_heatmaps
from .concepts import NMFFaithfulness, concept_importance, nmf_faithfulness
from .covariance import CovarianceAccumulator
from .curves import Curve, MaskingResult, deletion_curve, insertion_curve, masking_test
from .faithfulness import f_cls, f_reg
from .information import (
    MutualInformationScore,
    gaussian_total_correlation,
    mutual_information_score,
)
from .invariance import (
    BinarizationResult,
    ClassConditionalAccumulator,
    EntropySplit,
    EntropySplitAccumulator,
    ProbeReport,
    ShadeAccumulator,
    UnitInvariance,
    binarized_activation_test,
    class_conditional_entropy,
    decodability_probes,
    entropy_split,
    shade_surrogate,
)
from .locality import (
    Locality,
    LocalityAccumulator,
    VoronoiCells,
    keypoint_probabilities,
    locality,
    mask_part_probabilities,
    pixel_probabilities,
    voronoi_cells,
    voronoi_part_probabilities,
)
from .localization import (
    ClassLocalization,
    FilterLocalization,
    GateLocalization,
    LocalizationAccumulator,
    box_masks,
    class_localization,
    energy_pointing_game,
    filter_localization,
    gate_localization,
    iou,
    pointing_game,
    top_k_intersection,
)
from .orthogonality import (
    Orthogonality,
    OrthogonalityAccumulator,
    orthogonality,
    orthogonality_scores,
)
from .ranking import pixel_ranks, top_pixels
from .sanity import SanityResult, cascading_randomization, pearson_correlation, spearman_correlation

__all__ = [
    "BinarizationResult",
    "ClassConditionalAccumulator",
    "ClassLocalization",
    "CovarianceAccumulator",
    "Curve",
    "EntropySplit",
    "EntropySplitAccumulator",
    "FilterLocalization",
    "GateLocalization",
    "Locality",
    "LocalityAccumulator",
    "LocalizationAccumulator",
    "MaskingResult",
    "MutualInformationScore",
    "NMFFaithfulness",
    "Orthogonality",
    "OrthogonalityAccumulator",
    "ProbeReport",
    "SanityResult",
    "ShadeAccumulator",
    "UnitInvariance",
    "VoronoiCells",
    "binarized_activation_test",
    "box_masks",
    "cascading_randomization",
    "class_conditional_entropy",
    "class_localization",
    "concept_importance",
    "decodability_probes",
    "deletion_curve",
    "energy_pointing_game",
    "entropy_split",
    "f_cls",
    "f_reg",
    "filter_localization",
    "gate_localization",
    "gaussian_total_correlation",
    "insertion_curve",
    "iou",
    "keypoint_probabilities",
    "locality",
    "mask_part_probabilities",
    "masking_test",
    "mutual_information_score",
    "nmf_faithfulness",
    "orthogonality",
    "orthogonality_scores",
    "pearson_correlation",
    "pixel_probabilities",
    "pixel_ranks",
    "pointing_game",
    "resize_heatmaps",
    "shade_surrogate",
    "spearman_correlation",
    "top_k_intersection",
    "top_pixels",
    "voronoi_cells",
    "voronoi_part_probabilities",
]
