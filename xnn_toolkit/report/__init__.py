"""Reports: plain report documents rendered to HTML / Markdown / CSV / JSON, figures, the
end-to-end explanation run (``xnn demo`` / ``xnn explain``), heatmap figure export
(``xnn figures``) and the batch scoring runner."""

from ..attribution.targets import ClassHeadTarget
from .document import Card, Figure, Paragraph, Report, Section, Table
from .export import figure_report
from .heatmaps import class_heatmaps, xfeature_heatmaps
from .pipeline import ExplainConfig, build_report, run_explain
from .score_metrics import available_metrics
from .scoring import ScoreResult, ScoringConfig, score_dataset

__all__ = [
    "Card",
    "ClassHeadTarget",
    "ExplainConfig",
    "Figure",
    "Paragraph",
    "Report",
    "ScoreResult",
    "ScoringConfig",
    "Section",
    "Table",
    "available_metrics",
    "build_report",
    "class_heatmaps",
    "figure_report",
    "run_explain",
    "score_dataset",
    "xfeature_heatmaps",
]
