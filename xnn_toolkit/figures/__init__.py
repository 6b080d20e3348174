"""Matplotlib figures (PNG/SVG/PDF, written atomically)."""

from .concepts import concept_gallery, concept_overlay

__all__ = ["concept_gallery", "concept_overlay"]
