"""Atomic file writes: a failure leaves the old file (or nothing), never half a file."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from .errors import AssetError, InputError, XnnError

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "checked_load",
    "load_estimator_files",
    "loaded_params",
    "save_estimator_files",
]


def _umask() -> int:
    """The process's umask, read without changing it where the system tells (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(old)
    return old


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
        # mkstemp creates 0600; the file gets the mode any new file of the user would get
        os.chmod(tmp, 0o666 & ~_umask())
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


def save_estimator_files(path: str | os.PathLike, tensors: dict, meta: dict) -> None:
    """Write a fitted estimator as ``<path>.safetensors`` plus ``<path>.json``, no pickle.

    Each file is written atomically (tensors first, so a failure never leaves a JSON that
    points at missing weights of the same save).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    atomic_write(path + ".safetensors", lambda f: save_file(tensors, f))
    atomic_write_text(path + ".json", json.dumps(meta, indent=1))


def load_estimator_files(
    path: str | os.PathLike, type_name: str, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what :func:`save_estimator_files` wrote: ``(meta, tensors)``.

    Parameters
    ----------
    path : str or PathLike
        The path given to the save, without suffix.
    type_name : str
        The ``"type"`` the JSON must declare.
    what : str
        How the error messages name the estimator ("the class paths", ...).

    Raises
    ------
    AssetError
        A file is missing or unreadable, or the JSON describes another type.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        with open(path + ".json", encoding="utf-8") as f:
            meta = json.load(f)
        tensors = load_file(path + ".safetensors")
    except (OSError, ValueError, SafetensorError) as exc:  # truncated or not safetensors
        raise AssetError(f"could not read {what} saved at {path!r}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("type") != type_name:
        raise AssetError(f"{path}.json does not describe {type_name}; it is not {what}")
    return meta, tensors


def checked_load(what: str) -> Callable:
    """Decorate an estimator's ``load(cls, path, ...)``: whatever a damaged or edited file
    makes it raise (a ``KeyError`` for a missing entry, a ``TypeError`` for a value of the
    wrong type, ...) becomes an :class:`AssetError` that names the files and ``what``."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def load(cls: Any, path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(cls, path, *args, **kwargs)
            except XnnError:
                raise
            except (
                KeyError,
                TypeError,
                ValueError,
                AttributeError,
                IndexError,
                RuntimeError,
            ) as exc:
                raise AssetError(
                    f"{os.fspath(path)}.json / .safetensors do not hold valid {what} "
                    f"({type(exc).__name__}: {exc}); save it again"
                ) from None

        return load

    return decorate


def loaded_params(cls: type, params: Any, path: str | os.PathLike, what: str) -> Any:
    """``cls(**params)`` from a file, its hyperparameters checked (``_check_params`` or
    ``_validate_params``); an invalid value is an :class:`AssetError` naming the file."""
    if not isinstance(params, dict):
        raise AssetError(f"{os.fspath(path)}.json: 'params' of {what} must be a JSON object")
    try:
        est = cls(**params)
        check = getattr(est, "_check_params", None) or getattr(est, "_validate_params", None)
        if check is not None:
            check()
    except (InputError, TypeError, ValueError) as exc:
        raise AssetError(
            f"{os.fspath(path)}.json holds invalid settings for {what}: {exc}; save it again"
        ) from None
    return est
