"""One exception family for the whole toolkit.

Every error raised at the toolkit's boundary is an :class:`XnnError`; the subclasses also
derive from the matching built-in exception so that ``except ValueError`` keeps working.
Messages say what was wrong, what was expected and what to try.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "ConservationWarning",
    "XnnError",
    "SpecError",
    "LayerNotFoundError",
    "InputError",
    "AssetError",
    "BankError",
    "MissingExtraError",
    "NotFittedError",
    "close_matches",
]


class XnnError(Exception):
    """Base class of every error raised by xnn_toolkit."""


class SpecError(XnnError, ValueError):
    """A model, dataset or method specification could not be understood or resolved."""


class LayerNotFoundError(XnnError, KeyError):
    """A layer name, module or stage does not exist in the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class InputError(XnnError, ValueError):
    """An argument has the wrong shape, dtype, range or value."""


class AssetError(XnnError, OSError):
    """A bundled or user file is missing, corrupt, truncated or could not be written."""


class BankError(XnnError, OSError):
    """An activation bank on disk is missing, corrupt or inconsistent."""


class NotFittedError(XnnError, RuntimeError):
    """An estimator was used before ``fit``."""


class MissingExtraError(XnnError, ImportError):
    """An optional peer library is not installed; the message names the extra to install."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """Format the candidates closest to ``name`` for an error message.

    Parameters
    ----------
    name : str
        What the user asked for.
    candidates : iterable of str
        What exists.
    n : int
        At most this many suggestions.

    Returns
    -------
    str
        ``"did you mean: a, b, c?"`` or a short list of what exists.
    """
    cands = list(candidates)
    hits = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    if not hits:
        hits = [c for c in cands if name.lower() in c.lower()][:n]
    if hits:
        return "did you mean: " + ", ".join(hits) + "?"
    shown = ", ".join(cands[:n])
    more = f" (and {len(cands) - n} more)" if len(cands) > n else ""
    return f"available: {shown}{more}" if cands else "nothing is available"


class ConservationWarning(RuntimeWarning):
    """Excitation Backprop lost more winning probability than its threshold on the way down
    (or part of it bypasses the read layer); ``Attribution.metadata.conservation`` has the
    books per image and layer."""
