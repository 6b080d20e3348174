"""The output folder of a scoring run: finished shards, a manifest, and the final tables.

Layout (the same scheme as the activation bank of :mod:`xnn_toolkit.bank`)::

    manifest.json           what was asked and what is done (written last, atomically)
    shards/s00000.json      shard 0: the per-image values of its images (plain JSON)
    shards/s00001.json      ...
    per_image.csv / .json   the final tables, written once every shard is done
    aggregate.csv / .json

Every file is written to a temporary name and moved into place (``os.replace``); the
manifest lists only finished shards (with their CRC-32), so a run that is killed continues
from its last finished shard. Floats are written with ``repr`` (the shortest text that reads
back to the same double), so a shard read back from disk holds exactly the numbers that were
computed. Everything that depends on how a run was executed (wall times, number of processes,
which shards each invocation computed) lives in the manifest's ``runs`` list and nowhere
else: the tables of an interrupted and resumed run are byte-identical to those of an
uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text
from ..bank.store import _same_model
from ..errors import AssetError, InputError

FORMAT = "xnn-score-run"
VERSION = 1
MANIFEST = "manifest.json"
SHARDS = "shards"
MAPS = "maps"  # heatmaps saved with save_maps (xnn_toolkit.interop.maps)
TABLES = ("per_image.csv", "per_image.json", "aggregate.csv", "aggregate.json")
_SHARD_FILE = re.compile(r"^s\d{5}\.json$")
_TMP = re.compile(r"^\.tmp-")


def _shard_name(k: int) -> str:
    return f"s{k:05d}.json"


def plain(value: Any) -> Any:
    """A value for the JSON / CSV tables: non-finite floats become ``None`` (null / empty)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV with ``repr`` floats (exact round trip) and empty cells for ``None``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(
            [
                "" if r.get(c) is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                for c in columns
            ]
        )
    return buf.getvalue()


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, allow_nan=False) + "\n"


def rows_json_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """A JSON list of table rows, one row per line (C-speed encoding; ``json.load`` gives
    the same list as :func:`json_text` would)."""
    if not rows:
        return "[]\n"
    body = ",\n".join(json.dumps(r, allow_nan=False) for r in rows)
    return "[\n" + body + "\n]\n"


class RunFolder:
    """Reads and writes one scoring run's folder (rank 0 only).

    Parameters
    ----------
    root : Path
    header : dict
        What the run computes (configuration, model, heads, data set, columns, versions);
        a resumed run must have the same header.
    """

    def __init__(self, root: Path, header: dict[str, Any]) -> None:
        self.root = root
        self.header = header
        self.manifest: dict[str, Any] = {}
        self._fresh = False  # this invocation started the run (not a resume)
        self._made_root = False  # ... and created its folder

    # ----------------------------------------------------------------- opening

    def open(
        self, *, overwrite: bool, resume: bool, ncols: int, rows_of: Sequence[int]
    ) -> dict[int, torch.Tensor]:
        """Prepare the folder; return the finished shards (shard index -> ``R x ncols``).

        Parameters
        ----------
        overwrite : bool
            Delete a previous run in the folder and start over.
        resume : bool
            Continue (or return) a previous run with the same header.
        ncols : int
            Values per row.
        rows_of : sequence of int
            Expected rows of each shard.

        Raises
        ------
        InputError
            The folder is a file, holds other files, holds a run that was configured
            differently, or holds a run and neither ``resume`` nor ``overwrite`` is set.
        AssetError
            A listed shard is missing or damaged, or the folder cannot be written.
        """
        root = self.root
        if root.exists() and not root.is_dir():
            raise InputError(f"the output folder {root} is a file; give a folder")
        names = os.listdir(root) if root.is_dir() else []
        ours = {MANIFEST, SHARDS, MAPS, *TABLES}
        others = sorted(n for n in names if n not in ours and not _TMP.match(n))
        if others:
            raise InputError(
                f"the output folder {root} holds files that are not part of a scoring run "
                f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); use an empty "
                "or new folder"
            )
        if names and MANIFEST not in names and not overwrite:
            raise InputError(
                f"the output folder {root} is not empty and holds no finished shard; pass "
                "overwrite=True (--overwrite) or choose another folder"
            )
        if MANIFEST in names and not overwrite:
            if not resume:
                raise InputError(
                    f"the output folder {root} holds a scoring run; pass resume=True "
                    "(--resume) to continue it, overwrite=True (--overwrite) to start over, "
                    "or choose another folder"
                )
            return self._resume(ncols, rows_of)
        self._made_root = not root.exists()
        self._clear(names)
        self._fresh = True
        self.manifest = {**self.header, "complete": False, "shards": [], "runs": []}
        self._write_manifest()
        return {}

    def discard_if_empty(self) -> None:
        """After a failure: remove what this invocation started if no shard was finished
        (a run with finished shards stays, to be resumed)."""
        if not self._fresh or self.manifest.get("shards"):
            return
        try:
            (self.root / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self.root / SHARDS, ignore_errors=True)
            shutil.rmtree(self.root / MAPS, ignore_errors=True)
            for n in os.listdir(self.root):
                if _TMP.match(n):
                    (self.root / n).unlink()
            if self._made_root and not os.listdir(self.root):
                self.root.rmdir()
        except OSError:
            pass  # the original error matters more than a failed clean-up

    def _clear(self, names: Sequence[str]) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # the manifest first: an interrupted clean-up leaves no run, never a damaged one
            for n in sorted(names, key=lambda n: n != MANIFEST):
                p = self.root / n
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            (self.root / SHARDS).mkdir()
        except OSError as exc:
            raise AssetError(f"cannot prepare the output folder {self.root}: {exc}") from exc

    def _resume(self, ncols: int, rows_of: Sequence[int]) -> dict[int, torch.Tensor]:
        file = self.root / MANIFEST
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
            assert manifest.get("format") == FORMAT, f"format {manifest.get('format')!r}"
            assert isinstance(manifest["shards"], list) and isinstance(manifest["runs"], list)
        except (OSError, ValueError, KeyError, AssertionError) as exc:
            raise AssetError(
                f"{file} is not a scoring manifest or is damaged ({exc}); pass overwrite=True "
                "(--overwrite) to start over"
            ) from exc
        diffs = []
        for key, want in self.header.items():
            have = manifest.get(key)
            if key == "model":  # the same weights, however the model was passed in
                same = isinstance(have, dict) and _same_model(have.get("weights"), want["weights"])
            else:
                same = have == want
            if not same:
                diffs.append(key)
        if diffs:
            raise InputError(
                f"the run in {self.root} was configured differently ({', '.join(diffs)} "
                "differ); rerun with the same arguments to resume it, pass overwrite=True "
                "(--overwrite) to start over, or choose another folder"
            )
        self.manifest = manifest
        done: dict[int, torch.Tensor] = {}
        for entry in manifest["shards"]:
            k = int(entry["shard"])
            done[k] = self._read_shard(k, entry, ncols, rows_of[k])
        listed = {_shard_name(k) for k in done}
        shard_dir = self.root / SHARDS
        try:
            shard_dir.mkdir(exist_ok=True)
            for n in os.listdir(shard_dir):
                # leftovers of the killed run: temporary files and unlisted shards
                if _TMP.match(n) or (_SHARD_FILE.match(n) and n not in listed):
                    (shard_dir / n).unlink()
            for n in os.listdir(self.root):
                if _TMP.match(n):
                    (self.root / n).unlink()
        except OSError as exc:
            raise AssetError(f"cannot clean up {self.root}: {exc}") from exc
        return done

    def _read_shard(self, k: int, entry: Mapping, ncols: int, rows: int) -> torch.Tensor:
        file = self.root / SHARDS / _shard_name(k)
        try:
            raw = file.read_bytes()
            if zlib.crc32(raw) != entry["crc32"]:
                raise ValueError("its CRC-32 does not match the manifest")
            values = json.loads(raw)["values"]
            mat = torch.tensor(values, dtype=torch.float64).reshape(-1, ncols)
            if mat.shape[0] != rows:
                raise ValueError(f"{mat.shape[0]} rows, expected {rows}")
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise AssetError(
                f"shard {k} of the run in {self.root} ({file.name}) is missing or damaged "
                f"({exc}); pass overwrite=True (--overwrite) to start over"
            ) from exc
        return mat

    # ----------------------------------------------------------------- writing

    def _write_manifest(self) -> None:
        self.manifest["shards"].sort(key=lambda e: e["shard"])
        atomic_write_text(self.root / MANIFEST, json_text(self.manifest))

    def start_run(self, info: dict[str, Any]) -> None:
        """Record one invocation (how it runs, not what it computes) in ``runs``."""
        self.manifest["runs"].append({**info, "shards": [], "shard_seconds": [], "seconds": 0.0})

    def write_shards(self, shards: Mapping[int, tuple[int, int, torch.Tensor, float]]) -> None:
        """Write finished shards (index -> start, stop, values, seconds), then the manifest."""
        run = self.manifest["runs"][-1]
        for k, (start, stop, mat, seconds) in sorted(shards.items()):
            body = {
                "format": FORMAT + "-shard",
                "shard": k,
                "start": start,
                "stop": stop,
                "values": mat.tolist(),
            }
            text = json.dumps(body, allow_nan=True) + "\n"
            atomic_write_text(self.root / SHARDS / _shard_name(k), text)
            self.manifest["shards"].append(
                {
                    "shard": k,
                    "start": start,
                    "stop": stop,
                    "rows": int(mat.shape[0]),
                    "crc32": zlib.crc32(text.encode()),
                }
            )
            run["shards"].append(k)
            run["shard_seconds"].append(round(seconds, 4))
        self._write_manifest()

    def finish(self, tables: Mapping[str, str], seconds: float) -> None:
        """Write the final tables, then mark the run complete."""
        for name, text in tables.items():
            atomic_write_text(self.root / name, text)
        self.manifest["complete"] = True
        if self.manifest["runs"]:
            self.manifest["runs"][-1]["seconds"] = round(seconds, 3)
        self._write_manifest()

    def set_seconds(self, seconds: float) -> None:
        if self.manifest["runs"]:
            self.manifest["runs"][-1]["seconds"] = round(seconds, 3)


class BackgroundWriter:
    """Run writes (shards, then the manifest) in one thread, in submission order.

    Scoring goes on while a finished shard is written; each write is still atomic and the
    manifest still lists a shard only once its file is in place, so a killed run resumes as
    before. A failed write is raised by the next :meth:`submit` or by :meth:`drain`.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xnn-score-writer")
        self._pending: list[Any] = []

    def _check(self, wait: bool) -> None:
        keep = []
        for fut in self._pending:
            if wait or fut.done():
                fut.result()  # raises the write's error
            else:
                keep.append(fut)
        self._pending = keep

    def submit(self, fn: Any, *args: Any) -> None:
        """Queue ``fn(*args)`` after the writes already queued."""
        self._check(wait=False)
        self._pending.append(self._pool.submit(fn, *args))

    def drain(self) -> None:
        """Wait for every queued write; raise the first error."""
        try:
            self._check(wait=True)
        finally:
            self._pending = [f for f in self._pending if not f.done()]

    def close(self) -> None:
        """Finish the queued writes (errors are dropped: an error is already on its way)."""
        self._pool.shutdown(wait=True)
