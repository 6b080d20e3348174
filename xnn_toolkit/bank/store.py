"""The on-disk format of an activation bank: manifest, shards, checks and resume."""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_write, atomic_write_text
from ..errors import AssetError, BankError

if TYPE_CHECKING:
    from .bank import ActivationBank

_FORMAT = "xnn-activation-bank"
_VERSION = 1
_MANIFEST = "manifest.json"
#: Target size of one shard (all arrays together) when ``shard_size`` is not given.
_SHARD_BYTES = 64 * 2**20
_SHARD_FILE = re.compile(r"^s\d{5}-[A-Za-z0-9_]+\.npy$")
_TMP_FILE = re.compile(r"^\.tmp-.*-(s\d{5}-[A-Za-z0-9_]+\.npy|manifest\.json)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_META_KEYS = ("logits", "labels", "indices")


def _storage_dtype(key: str, dtype: torch.dtype) -> np.dtype:
    if key in ("labels", "indices"):
        return np.dtype(np.int64)
    if key == "logits":
        return np.dtype(np.float32)
    return np.dtype(np.float16 if dtype == torch.float16 else np.float32)


def _new_manifest(layers, pool, dtype, fingerprint, shapes, dtypes) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "layers": list(layers),
        "pool": pool,
        "dtype": str(dtype).replace("torch.", ""),
        "shard_size": None,
        "complete": False,
        "num_samples": 0,
        "model": fingerprint,
        "expected_samples": None,
        "arrays": {
            k: {"sample_shape": list(shapes[k]), "dtype": np.dtype(dtypes[k]).str} for k in shapes
        },
        "shards": [],
    }


def _auto_shard_size(shapes: dict, dtypes: dict) -> int:
    per_sample = sum(
        int(np.prod(shapes[k], dtype=np.int64)) * np.dtype(dtypes[k]).itemsize for k in shapes
    )
    return max(1, _SHARD_BYTES // max(per_sample, 1))


def _write_manifest(root: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1)
    try:
        atomic_write_text(root / _MANIFEST, text)
    except AssetError as exc:
        raise BankError(f"could not write the manifest of {root}: {exc}") from exc


def _write_shard(
    root: Path, manifest: dict, arrays: dict[str, np.ndarray], *, commit: bool = True
) -> None:
    """Write one shard's files, then list it in the manifest (written when ``commit``)."""
    k = len(manifest["shards"])
    n = int(next(iter(arrays.values())).shape[0])
    files = {}
    for key, arr in arrays.items():
        name = f"s{k:05d}-{key}.npy"
        arr = np.ascontiguousarray(arr)

        def write(tmp: str, arr: np.ndarray = arr) -> None:
            with open(tmp, "wb") as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)

        try:
            atomic_write(root / name, write)
        except AssetError as exc:
            raise BankError(
                f"could not write {root / name}: {exc}; check free disk space and permissions "
                "(finished shards are kept: run again with resume=True)"
            ) from exc
        files[key] = {"file": name, "crc32": zlib.crc32(memoryview(arr).cast("B"))}
    manifest["shards"].append({"n": n, "files": files})
    manifest["num_samples"] = int(manifest["num_samples"]) + n
    if commit:
        _write_manifest(root, manifest)


def _read_manifest(root: Path) -> dict[str, Any]:
    file = root / _MANIFEST
    if not file.is_file():
        what = "does not exist" if not root.exists() else "is not an activation bank"
        raise BankError(f"{root} {what}: no {_MANIFEST}; create a bank with extract(..., path=)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BankError(
            f"{file} is corrupt ({exc}); extract the bank again (resume=False)"
        ) from exc
    try:
        _check_manifest(manifest)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise BankError(
            f"{file} is not a valid bank manifest ({type(exc).__name__}: {exc}); extract the "
            "bank again (resume=False)"
        ) from exc
    return manifest


def _check_manifest(m: Any) -> None:
    assert isinstance(m, dict), "not a JSON object"
    if m.get("format") != _FORMAT:
        raise ValueError(f"format is {m.get('format')!r}, expected {_FORMAT!r}")
    if not isinstance(m["version"], int) or m["version"] > _VERSION:
        raise ValueError(f"version {m['version']} is newer than this toolkit's ({_VERSION})")
    assert isinstance(m["layers"], list) and all(isinstance(x, str) for x in m["layers"])
    assert m["pool"] in (None, "avg", "max"), f"pool {m['pool']!r}"
    assert m["dtype"] in _DTYPES, f"dtype {m['dtype']!r}"
    assert isinstance(m["complete"], bool)
    arrays = m["arrays"]
    for i in range(len(m["layers"])):
        assert f"act{i}" in arrays, f"no array for layer {i}"
    for key in ("labels", "indices"):
        assert key in arrays, f"no {key}"
    for key, spec in arrays.items():
        assert re.fullmatch(r"[A-Za-z0-9_]+", key), f"bad array name {key!r}"
        assert all(isinstance(d, int) and d >= 0 for d in spec["sample_shape"])
        np.dtype(spec["dtype"])
    total = 0
    for s in m["shards"]:
        assert isinstance(s["n"], int) and s["n"] > 0, "shard size"
        assert set(s["files"]) == set(arrays), "shard files do not match the arrays"
        for f in s["files"].values():
            assert _SHARD_FILE.match(f["file"]), f"bad file name {f['file']!r}"
            assert isinstance(f["crc32"], int)
        total += s["n"]
    assert m["num_samples"] == total, f"num_samples {m['num_samples']} != {total}"


def _npy_header(file: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file, without reading its data."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return tuple(shape), dtype, f.tell()


def _validate_shards(root: Path, manifest: dict, *, verify: bool) -> None:
    arrays = manifest["arrays"]
    for k, shard in enumerate(manifest["shards"]):
        for key, entry in shard["files"].items():
            file = root / entry["file"]
            want_shape = (shard["n"], *arrays[key]["sample_shape"])
            want_dtype = np.dtype(arrays[key]["dtype"])
            if not file.is_file():
                raise BankError(
                    f"{file} (shard {k}) is missing; the bank is incomplete: extract it again"
                )
            try:
                shape, dtype, offset = _npy_header(file)
            except (OSError, ValueError, SyntaxError) as exc:
                raise BankError(f"{file} (shard {k}) is corrupt: {exc}") from exc
            if shape != want_shape or dtype != want_dtype:
                raise BankError(
                    f"{file} (shard {k}) holds {dtype} {shape}, the manifest says "
                    f"{want_dtype} {want_shape}: the bank is corrupt"
                )
            size = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            actual = file.stat().st_size
            if actual != size:
                raise BankError(
                    f"{file} (shard {k}) is {'truncated' if actual < size else 'too long'}: "
                    f"{actual} bytes, expected {size}"
                )
            if verify and _file_crc(file, offset) != entry["crc32"]:
                raise BankError(f"{file} (shard {k}) is corrupt: its CRC-32 does not match")


def _file_crc(file: Path, offset: int) -> int:
    crc = 0
    with open(file, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _bank_from_manifest(root: Path, manifest: dict) -> ActivationBank:
    from .bank import ActivationBank

    shards = []
    for s in manifest["shards"]:
        entry = {key: f["file"] for key, f in s["files"].items()}
        entry["n"] = s["n"]
        shards.append(entry)
    shapes = {k: tuple(v["sample_shape"]) for k, v in manifest["arrays"].items()}
    return ActivationBank(
        manifest["layers"],
        shards,
        shapes,
        path=root,
        pool=manifest["pool"],
        dtype=_DTYPES[manifest["dtype"]],
    )


def _prepare_dir(root: Path, *, fresh: bool, overwrite: bool) -> None:
    """Make ``root`` ready for a new bank; refuse to touch folders that hold other things."""
    if root.exists() and not root.is_dir():
        raise BankError(f"{root} is a file; a bank is a directory: choose another path")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BankError(f"cannot create the bank directory {root}: {exc}") from exc
    names = os.listdir(root)
    ours = [n for n in names if n == _MANIFEST or _SHARD_FILE.match(n) or _TMP_FILE.match(n)]
    others = sorted(set(names) - set(ours))
    if others:
        raise BankError(
            f"{root} holds files that are not part of an activation bank ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); use an empty or new directory"
        )
    if fresh and _MANIFEST in names and not overwrite:
        raise BankError(f"{root} already holds a bank; pass overwrite=True to replace it")
    # The manifest goes first: a crash while deleting leaves no bank, never a damaged one.
    for n in sorted(ours, key=lambda n: n != _MANIFEST):
        try:
            os.unlink(root / n)
        except OSError as exc:
            raise BankError(f"cannot remove the old bank file {root / n}: {exc}") from exc


# --------------------------------------------------------------------------- extraction


class _ShardWriter:
    """Collects batches into a shard buffer and writes a shard whenever it is full."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.size = int(manifest["shard_size"])
        self.buffers: dict[str, np.ndarray] = {}
        self.fill = 0

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        n = int(next(iter(arrays.values())).shape[0])
        pos = 0
        while pos < n:
            if not self.buffers:
                self.buffers = {
                    k: np.empty((self.size, *v.shape[1:]), dtype=v.dtype) for k, v in arrays.items()
                }
            take = min(self.size - self.fill, n - pos)
            for k, v in arrays.items():
                self.buffers[k][self.fill : self.fill + take] = v[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == self.size:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            _write_shard(
                self.root, self.manifest, {k: v[: self.fill] for k, v in self.buffers.items()}
            )
        self.fill = 0

    def finish(self) -> None:
        self.flush()
        self.buffers = {}
        self.manifest["complete"] = True
        _write_manifest(self.root, self.manifest)


def _discard_empty(root: Path, made_root: bool) -> None:
    """Remove a bank this call started and that holds no finished shard."""
    try:
        manifest = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("shards"):
            return  # finished shards stay, to be resumed
    except (OSError, ValueError):
        pass
    try:
        for name in os.listdir(root):
            if name == _MANIFEST or _TMP_FILE.match(name) or _SHARD_FILE.match(name):
                os.unlink(root / name)
        if made_root and not os.listdir(root):
            root.rmdir()
    except OSError:
        pass  # the original error matters more than a failed clean-up


def _start_manifest(
    root, names, pool, dtype, shard_size, fingerprint, total, arrays, probe=None
) -> dict:
    shapes = {k: tuple(v.shape[1:]) for k, v in arrays.items()}
    dtypes = {k: _storage_dtype(k, dtype) for k in arrays}
    manifest = _new_manifest(names, pool, dtype, fingerprint, shapes, dtypes)
    manifest["shard_size"] = shard_size or _auto_shard_size(shapes, dtypes)
    manifest["expected_samples"] = total
    manifest["data"] = {"probe_crc32": probe}
    _write_manifest(root, manifest)
    return manifest


def _open_for_resume(
    root, names, pool, dtype, shard_size, fingerprint, total, resume, probe=None, reuse=False
):
    """The manifest of an unfinished (or finished) matching bank in ``root``, else ``None``."""
    if not (root / _MANIFEST).is_file():
        return None
    if not resume:
        return None  # started over by _prepare_dir
    manifest = _read_manifest(root)
    wanted = {"layers": names, "pool": pool, "dtype": str(dtype).replace("torch.", "")}
    diffs = [f"{k} {manifest[k]!r} (asked {v!r})" for k, v in wanted.items() if manifest[k] != v]
    if shard_size is not None and manifest["shard_size"] != shard_size:
        diffs.append(f"shard_size {manifest['shard_size']} (asked {shard_size})")
    if (
        manifest.get("expected_samples") is not None
        and total is not None
        and (manifest["expected_samples"] != total)
    ):
        diffs.append(f"{manifest['expected_samples']} samples (the data has {total})")
    if not _same_model(manifest.get("model"), fingerprint):
        diffs.append("another model (its weights differ)")
    held = (manifest.get("data") or {}).get("probe_crc32")
    if held is not None and probe is not None and held != probe and not reuse:
        diffs.append(
            "other data (the images differ from those the bank holds; pass reuse=True to "
            "return the bank anyway)"
        )
    if diffs:
        raise BankError(
            f"the bank in {root} was extracted differently: {'; '.join(diffs)}. Use another "
            "path, or pass resume=False to delete it and start over"
        )
    _validate_shards(root, manifest, verify=False)
    listed = {f["file"] for s in manifest["shards"] for f in s["files"].values()}
    for name in os.listdir(root):
        # leftovers of the killed run: temporary files and shards it did not finish
        if _TMP_FILE.match(name) or (_SHARD_FILE.match(name) and name not in listed):
            try:
                os.unlink(root / name)
            except OSError as exc:
                raise BankError(f"cannot remove the stale file {root / name}: {exc}") from exc
    return manifest


def _model_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Structure hash and per-tensor norms of the state dict, to refuse resuming with another
    model. Norms are compared with a tolerance (devices reduce in different orders); this
    guards against mistakes, it is not a cryptographic identity."""
    h = hashlib.sha256(type(model).__name__.encode())
    norms = []
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.is_floating_point():
                norms.append(float(torch.linalg.vector_norm(t.detach(), dtype=torch.float32)))
    return {"class": type(model).__name__, "structure": h.hexdigest(), "norms": norms}


def _same_model(a: dict | None, b: dict) -> bool:
    if not isinstance(a, dict):
        return False
    if a.get("structure") != b["structure"] or len(a.get("norms", [])) != len(b["norms"]):
        return False
    return bool(np.allclose(a["norms"], b["norms"], rtol=1e-5, atol=1e-8, equal_nan=True))
