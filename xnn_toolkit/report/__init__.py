"""Reports: plain report documents rendered to HTML / Markdown / CSV / JSON, figures, and the
batch scoring runner."""

from .document import Card, Figure, Paragraph, Report, Section, Table
from .score_metrics import available_metrics
from .scoring import ClassHeadTarget, ScoreResult, ScoringConfig, score_dataset

__all__ = [
    "Card",
    "ClassHeadTarget",
    "Figure",
    "Paragraph",
    "Report",
    "ScoreResult",
    "ScoringConfig",
    "Section",
    "Table",
    "available_metrics",
    "score_dataset",
]
