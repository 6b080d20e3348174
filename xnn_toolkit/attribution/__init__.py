"""Attribution engine: Excitation Backprop (MWP, c-MWP), CAM family, filter maps, Captum.

Every method answers ``Method(model, layer=...).attribute(x, target) -> Attribution``;
:func:`explain` does the same by name (:func:`available_methods`). :doc:`/methods/excitation` and
:doc:`/methods/cam`.
"""

from .base import (
    Attribution,
    AttributionInfo,
    AttributionMethod,
    Conservation,
    available_methods,
    explain,
    get_method,
    register_method,
)
from .cam import CAM, GradCAM, GradCAMPlusPlus
from .captum_bridge import (
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    Occlusion,
    Saliency,
)
from .excitation import ContrastiveExcitationBackprop, ExcitationBackprop, excitation_mode
from .filters import (
    ActivMap,
    GradMap,
    activation_thresholds,
    activmap_masks,
    top_share_thresholds,
)
from .gradcam_bridge import (
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    FullGrad,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from .rules import (
    FoldBatchNorm,
    Gate,
    OpCall,
    PassThrough,
    Proportional,
    Route,
    Rule,
    SplitSum,
    WinnerTakesAll,
    ZPlus,
    default_rules,
)
from .targets import (
    Channel,
    Class,
    ClassHeadTarget,
    HeadOutput,
    Logits,
    Target,
    Unit,
    as_target,
)

__all__ = [
    "AblationCAM",
    "ActivMap",
    "EigenCAM",
    "EigenGradCAM",
    "FullGrad",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
    "Attribution",
    "AttributionInfo",
    "Conservation",
    "AttributionMethod",
    "CAM",
    "Channel",
    "Class",
    "ClassHeadTarget",
    "ContrastiveExcitationBackprop",
    "ExcitationBackprop",
    "FoldBatchNorm",
    "Gate",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradMap",
    "GuidedBackprop",
    "HeadOutput",
    "InputXGradient",
    "IntegratedGradients",
    "Logits",
    "Occlusion",
    "OpCall",
    "PassThrough",
    "Proportional",
    "Route",
    "Rule",
    "Saliency",
    "SplitSum",
    "Target",
    "Unit",
    "WinnerTakesAll",
    "ZPlus",
    "activation_thresholds",
    "activmap_masks",
    "top_share_thresholds",
    "as_target",
    "available_methods",
    "default_rules",
    "excitation_mode",
    "explain",
    "get_method",
    "register_method",
]
