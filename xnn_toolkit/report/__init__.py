"""Reports: plain report documents rendered to HTML / Markdown / CSV / JSON, and figures."""

from .document import Card, Figure, Paragraph, Report, Section, Table

__all__ = ["Card", "Figure", "Paragraph", "Report", "Section", "Table"]
