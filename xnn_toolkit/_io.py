"""Atomic file writes: a failure leaves the old file (or nothing), never half a file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

from .errors import AssetError

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` on a temporary file next to ``path``, then move it into place.

    Parameters
    ----------
    path : str or PathLike
        Final location.
    writer : callable
        Writes the whole content to the path it is given.

    Raises
    ------
    AssetError
        When the write or the move fails (the temporary file is removed).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    except OSError as exc:
        raise AssetError(
            f"could not write {path!r}: {exc}; check that the folder exists and is writable"
        ) from exc
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, AssetError):
            raise AssetError(f"could not write {path!r}: {exc}") from exc
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)
