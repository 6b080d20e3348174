"""The activation bank: activations of chosen layers, logits and labels over a data set.

:func:`extract` runs a frozen model over the data once (forward hooks from
:func:`xnn_toolkit.hooks.record`; the model is left exactly as it was) and keeps, per layer,
the activation of every sample (``Z`` of :doc:`/methods/xnn`, the conv maps of §3), optionally
pooled
over space to ``N x C``, together with the logits ``ŷ`` (:doc:`/methods/xnn`), the labels and the
sample indices. Heads are fitted on the resulting :class:`ActivationBank`.

A bank lives in memory, or on disk as a directory::

    manifest.json               what is there (written last, atomically)
    s00000-act0.npy             shard 0, layer 0: n_0 x ... (plain .npy, no pickle)
    s00000-logits.npy           shard 0, logits: n_0 x K
    s00000-labels.npy           shard 0, labels: n_0 (int64, -1 where unknown)
    s00000-indices.npy          shard 0, sample indices: n_0 (int64)
    s00001-act0.npy             ...

On disk, extraction holds one shard in memory at a time, so a data set larger than the RAM
fits; reads go through memory maps opened one shard at a time. Every file is written to a
temporary name and moved into place with ``os.replace``; the manifest lists only finished
shards, so an extraction that is killed resumes from its last finished shard and yields the
same bank as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._io import atomic_write, atomic_write_text
from .datafit import data_fit
from .errors import AssetError, BankError, InputError, LayerNotFoundError, close_matches
from .hooks import record
from .layers import LayerSpec, resolve_layer

__all__ = ["ActivationBank", "extract"]

_FORMAT = "xnn-activation-bank"
_VERSION = 1
_MANIFEST = "manifest.json"
#: Target size of one shard (all arrays together) when ``shard_size`` is not given.
_SHARD_BYTES = 64 * 2**20
_SHARD_FILE = re.compile(r"^s\d{5}-[A-Za-z0-9_]+\.npy$")
_TMP_FILE = re.compile(r"^\.tmp-.*-(s\d{5}-[A-Za-z0-9_]+\.npy|manifest\.json)$")
_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_META_KEYS = ("logits", "labels", "indices")


# --------------------------------------------------------------------------- the bank


class ActivationBank:
    """Activations of some layers for ``N`` samples, with their logits, labels and indices.

    Build one with :func:`extract`, :meth:`from_tensors` or :meth:`load`; do not call the
    constructor directly.

    Attributes
    ----------
    layers : list of str
        Dotted names of the stored layers.
    path : Path or None
        The bank's directory, or ``None`` for a bank in memory.
    pool : str or None
        ``"avg"``, ``"max"`` or ``None`` (activations kept with their spatial dimensions).
    dtype : torch.dtype
        Storage type of the activations (``float32`` or ``float16``); they are always
        returned as ``float32``.
    """

    def __init__(
        self,
        layers: list[str],
        shards: list[dict[str, Any]],
        sample_shapes: dict[str, tuple[int, ...]],
        *,
        path: Path | None = None,
        pool: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        # shards: key -> in-memory tensor, or file name relative to ``path``; keys are
        # "act{i}" for layer i and the names in _META_KEYS.
        self.layers = list(layers)
        self.path = path
        self.pool = pool
        self.dtype = dtype
        self._shards = shards
        self._shapes = dict(sample_shapes)
        self._sizes = [int(s["n"]) for s in shards]
        self._starts = np.concatenate([[0], np.cumsum(self._sizes, dtype=np.int64)])
        self._cache: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_tensors(
        cls,
        activations: dict[str, torch.Tensor],
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ActivationBank:
        """A bank in memory from tensors already computed.

        Parameters
        ----------
        activations : dict of str to Tensor
            Layer name to ``N x ...`` activations (``float16`` is kept, anything else is
            stored as ``float32``).
        logits : Tensor, optional
            ``N x K``.
        labels : Tensor, optional
            ``N`` integer labels (``-1`` where unknown); default all ``-1``.

        Returns
        -------
        ActivationBank
            With sample indices ``0 .. N - 1``.
        """
        if not isinstance(activations, dict) or not activations:
            raise InputError("activations must be a non-empty dict of layer name -> N x ... Tensor")
        n = None
        shard: dict[str, Any] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes = set()
        for i, (name, t) in enumerate(activations.items()):
            if not isinstance(t, torch.Tensor) or t.dim() < 1:
                raise InputError(f"activations[{name!r}] must be an N x ... Tensor")
            t = t.detach().cpu()
            t = t if t.dtype == torch.float16 else t.float()
            dtypes.add(t.dtype)
            if n is None:
                n = int(t.shape[0])
            elif t.shape[0] != n:
                raise InputError(
                    f"activations[{name!r}] has {t.shape[0]} samples, the first layer has {n}"
                )
            shard[f"act{i}"] = t.contiguous()
            shapes[f"act{i}"] = tuple(t.shape[1:])
        if len(dtypes) > 1:
            raise InputError("activations must all be float16 or all be float32")
        assert n is not None
        if n == 0:
            raise InputError("the activations hold no samples (N = 0)")
        if logits is not None:
            logits = torch.as_tensor(logits).detach().cpu().float()
            if logits.dim() != 2 or logits.shape[0] != n:
                raise InputError(f"logits must be N x K with N = {n}, got {tuple(logits.shape)}")
            shard["logits"] = logits.contiguous()
            shapes["logits"] = tuple(logits.shape[1:])
        if labels is None:
            labels = torch.full((n,), -1, dtype=torch.long)
        labels = torch.as_tensor(labels).detach().cpu()
        if (
            labels.shape != (n,)
            or labels.is_floating_point()
            and not bool((labels == labels.round()).all())
        ):
            raise InputError(f"labels must be N = {n} integers, got shape {tuple(labels.shape)}")
        shard["labels"] = labels.long().contiguous()
        shard["indices"] = torch.arange(n, dtype=torch.long)
        shapes["labels"] = shapes["indices"] = ()
        shard["n"] = n
        return cls(list(activations), [shard], shapes, dtype=dtypes.pop())

    # ----------------------------------------------------------------- basic queries

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __repr__(self) -> str:
        where = f"on disk at {str(self.path)!r}" if self.path is not None else "in memory"
        return (
            f"ActivationBank(N={len(self)}, layers={self.layers}, pool={self.pool!r}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, {where})"
        )

    def _key(self, layer: str) -> str:
        if not isinstance(layer, str) or layer not in self.layers:
            raise LayerNotFoundError(
                f"the bank has no layer {layer!r}; " + close_matches(str(layer), self.layers)
            )
        return f"act{self.layers.index(layer)}"

    def shape(self, layer: str) -> tuple[int, ...]:
        """Shape of a layer's stored activations, ``(N, ...)`` (``(N, C)`` when pooled)."""
        return (len(self), *self._shapes[self._key(layer)])

    # ----------------------------------------------------------------- reading

    def _array(self, shard: int, key: str) -> torch.Tensor | np.ndarray:
        """One shard's array: the tensor itself in memory, a read-only memory map on disk."""
        item = self._shards[shard][key]
        if isinstance(item, torch.Tensor):
            return item
        assert self.path is not None
        file = self.path / item
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BankError(f"cannot read {file}: {exc}; the bank is damaged") from exc

    @staticmethod
    def _as_float(a: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(a, torch.Tensor):
            return a.to(torch.float32, copy=True)  # never hand out the bank's own storage
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def activations(
        self, layer: str, indices: Sequence[int] | np.ndarray | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Activations of one layer, as ``float32``.

        Parameters
        ----------
        layer : str
            One of :attr:`layers`.
        indices : sequence of int, optional
            Rows to return (positions ``0 .. N - 1`` in the bank, in any order, repeats
            allowed); all rows when ``None``.

        Returns
        -------
        Tensor
            ``len(indices) x ...`` (``N x C x H x W`` for conv layers, ``N x C`` when pooled);
            always a new tensor, so changing it never changes the bank.
        """
        key = self._key(layer)
        if indices is None:
            if len(self._shards) == 1 and isinstance(self._shards[0][key], torch.Tensor):
                return self._as_float(self._shards[0][key])
            out = torch.empty((len(self), *self._shapes[key]), dtype=torch.float32)
            for s in range(len(self._shards)):
                a, b = int(self._starts[s]), int(self._starts[s + 1])
                out[a:b] = self._as_float(self._array(s, key))
            return out
        idx = self._check_indices(indices)
        out = torch.empty((idx.numel(), *self._shapes[key]), dtype=torch.float32)
        for s in range(len(self._shards)):
            a, b = int(self._starts[s]), int(self._starts[s + 1])
            sel = ((idx >= a) & (idx < b)).nonzero().flatten()
            if sel.numel() == 0:
                continue
            rows = (idx[sel] - a).numpy()
            arr = self._array(s, key)
            out[sel] = self._as_float(
                arr[torch.from_numpy(rows)] if isinstance(arr, torch.Tensor) else arr[rows]
            )
        return out

    def _check_indices(self, indices) -> torch.Tensor:
        idx = torch.as_tensor(
            np.asarray(indices) if not isinstance(indices, torch.Tensor) else indices.cpu()
        )
        if idx.dim() != 1 or (idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool)):
            raise InputError(
                f"indices must be a 1-D sequence of integer positions, got shape "
                f"{tuple(idx.shape)} of {idx.dtype}"
            )
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise InputError(
                f"indices must lie in 0 .. {len(self) - 1}, got {int(idx.min())} .. "
                f"{int(idx.max())}"
            )
        return idx

    def iter_batches(self, layer: str, batch_size: int) -> Iterator[torch.Tensor]:
        """Stream a layer's activations in order, in bounded memory.

        Batch ``k`` holds rows ``k * batch_size`` to ``(k + 1) * batch_size - 1`` (the last
        one may be shorter), so ``bank.logits[k * batch_size: ...]`` lines up with it. On disk
        only one shard is memory-mapped at a time.

        Parameters
        ----------
        layer : str
        batch_size : int

        Yields
        ------
        Tensor
            ``B x ...`` float32.
        """
        key = self._key(layer)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        pending: list[torch.Tensor] = []
        have = 0
        for s in range(len(self._shards)):
            arr = self._array(s, key)
            n = self._sizes[s]
            pos = 0
            while pos < n:
                take = min(batch_size - have, n - pos)
                pending.append(self._as_float(arr[pos : pos + take]))
                have += take
                pos += take
                if have == batch_size:
                    yield pending[0] if len(pending) == 1 else torch.cat(pending)
                    pending, have = [], 0
            del arr  # unmap this shard before opening the next one
        if pending:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)

    def _meta(self, key: str) -> torch.Tensor | None:
        if key in self._cache:
            return self._cache[key].clone()
        if any(key not in s for s in self._shards):
            return None
        parts = []
        for s in range(len(self._shards)):
            arr = self._array(s, key)
            parts.append(
                arr.clone() if isinstance(arr, torch.Tensor) else torch.from_numpy(np.array(arr))
            )
        out = torch.cat(parts)
        out = out.float() if key == "logits" else out.long()
        self._cache[key] = out
        return out.clone()

    @property
    def logits(self) -> torch.Tensor | None:
        """``N x K`` float32 model outputs, or ``None`` when the bank has none."""
        return self._meta("logits")

    @property
    def labels(self) -> torch.Tensor:
        """``N`` int64 labels, ``-1`` where the data had none."""
        out = self._meta("labels")
        assert out is not None
        return out

    @property
    def indices(self) -> torch.Tensor:
        """``N`` int64 sample indices (position of each sample in the data's order)."""
        out = self._meta("indices")
        assert out is not None
        return out

    # ----------------------------------------------------------------- disk

    def save(
        self, path: str | os.PathLike, *, shard_size: int | None = None, overwrite: bool = False
    ) -> None:
        """Write the bank to a directory (the on-disk format of the module docstring).

        Copies shard by shard, so a bank on disk is copied in bounded memory.

        Parameters
        ----------
        path : str or PathLike
            A new or empty directory (or an existing bank with ``overwrite=True``).
        shard_size : int, optional
            Samples per shard (default: about 64 MiB per shard). Shards of a bank on disk are
            split further when larger, never merged.
        overwrite : bool
            Replace a bank already there.

        Raises
        ------
        BankError
            The directory holds something else, or a write failed (no partial manifest is
            left behind).
        """
        if shard_size is not None and (
            isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1
        ):
            raise InputError(f"shard_size must be a positive int or None, got {shard_size!r}")
        root = Path(path)
        if self.path is not None and root.exists() and root.resolve() == self.path.resolve():
            return
        _prepare_dir(root, fresh=True, overwrite=overwrite)
        keys = [f"act{i}" for i in range(len(self.layers))]
        keys += [k for k in _META_KEYS if all(k in s for s in self._shards)]
        shapes = {k: self._shapes[k] for k in keys}
        dtypes = {k: _storage_dtype(k, self.dtype) for k in keys}
        manifest = _new_manifest(self.layers, self.pool, self.dtype, None, shapes, dtypes)
        # split in-memory banks into shards so that reading them back stays bounded
        per = shard_size or _auto_shard_size(shapes, dtypes)
        manifest["shard_size"] = per
        for s in range(len(self._shards)):
            arrays = {k: self._array(s, k) for k in keys}
            n = self._sizes[s]
            for a in range(0, n, per):
                chunk = {
                    k: np.asarray(
                        v[a : a + per].numpy() if isinstance(v, torch.Tensor) else v[a : a + per],
                        dtype=dtypes[k],
                    )
                    for k, v in arrays.items()
                }
                _write_shard(root, manifest, chunk, commit=False)
            del arrays
        manifest["complete"] = True
        _write_manifest(root, manifest)

    @classmethod
    def load(cls, path: str | os.PathLike, *, verify: bool = False) -> ActivationBank:
        """Open a bank saved on disk (its arrays stay on disk, memory-mapped on demand).

        Parameters
        ----------
        path : str or PathLike
            The bank's directory.
        verify : bool
            Also read every file and compare its CRC-32 with the manifest (slow for big
            banks; the default checks headers, shapes and file sizes only).

        Returns
        -------
        ActivationBank

        Raises
        ------
        BankError
            Missing, corrupt, truncated or unfinished bank; the message names the file.
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if not manifest["complete"]:
            raise BankError(
                f"the bank in {root} is unfinished ({sum(s['n'] for s in manifest['shards'])} "
                "samples written); finish it by running extract(..., path=...) again with the "
                "same model and data (resume=True)"
            )
        _validate_shards(root, manifest, verify=verify)
        if not manifest["shards"]:
            raise BankError(f"the bank in {root} holds no samples")
        return _bank_from_manifest(root, manifest)


# --------------------------------------------------------------------------- disk format


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


def _data_probe(data: object, total: int | None, k: int = 8) -> int | None:
    """CRC-32 of ``k`` evenly spaced images of the data (``None`` where the data cannot be
    indexed), so that a bank refuses to stand in for other data of the same length."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader) and _is_map_dataset(data.dataset):
        data = data.dataset
        total = len(data)  # type: ignore[arg-type]
    if not total or not (isinstance(data, torch.Tensor) or _is_map_dataset(data)):
        return None
    crc = zlib.crc32(str(total).encode())
    for i in sorted({round(j * (total - 1) / max(k - 1, 1)) for j in range(k)}):
        item = data[i]
        if isinstance(item, dict):
            item = next(
                (item[key] for key in ("image", "x", "input", "inputs", "img") if key in item), None
            )
        elif isinstance(item, list | tuple):
            item = item[0] if item else None
        if not isinstance(item, torch.Tensor):
            return None
        raw = item.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(raw.numpy().tobytes(), crc)
    return crc


def _known_length(data: object) -> int | None:
    from torch.utils.data import DataLoader, IterableDataset

    if isinstance(data, torch.Tensor):
        return int(data.shape[0]) if data.dim() else None
    if isinstance(data, DataLoader):
        ds = data.dataset
        if isinstance(ds, IterableDataset) or data.drop_last:
            return None
        try:
            return len(ds)  # type: ignore[arg-type]
        except TypeError:
            return None
    if _is_map_dataset(data):
        return len(data)  # type: ignore[arg-type]
    return None


def _is_map_dataset(data: object) -> bool:
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    return (
        isinstance(data, Dataset)
        and not isinstance(data, IterableDataset | DataLoader)
        and hasattr(data, "__len__")
    )


def _collate(samples: list) -> tuple[torch.Tensor, Any]:
    """Stack dataset items ``x``, ``(x, y, ...)`` or ``{"image": x, "label": y}``."""
    first = samples[0]
    if isinstance(first, dict):
        xk = next((k for k in ("image", "x", "input", "inputs", "img") if k in first), None)
        yk = next((k for k in ("label", "y", "target", "labels") if k in first), None)
        if xk is None:
            raise InputError(
                f"dataset items are dicts without an image key (got {sorted(first)}); "
                "expected 'image' (and 'label')"
            )
        xs = [s[xk] for s in samples]
        ys = [s[yk] for s in samples] if yk else None
    elif isinstance(first, list | tuple):
        xs = [s[0] for s in samples]
        ys = [s[1] for s in samples] if len(first) > 1 else None
    else:
        xs, ys = samples, None
    if not all(isinstance(x, torch.Tensor) for x in xs):
        raise InputError(
            f"dataset items must hold tensors, got {type(xs[0]).__name__}; add a transform "
            "such as torchvision.transforms.ToTensor() (and the model's normalisation)"
        )
    return torch.stack(xs), ys


def _labels(y: Any, n: int) -> torch.Tensor:
    """Integer labels of a batch, ``-1`` where the target is not a class label."""
    if y is not None and hasattr(y, "labels") and isinstance(y.labels, torch.Tensor):
        y = y.labels  # PartBatch and alike
    if isinstance(y, list | tuple) and len(y) == n:
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in y):
            return torch.tensor([int(v) for v in y], dtype=torch.long)
        if all(hasattr(v, "label") for v in y):
            return torch.tensor([int(v.label) for v in y], dtype=torch.long)
        if all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in y):
            y = torch.stack([v.reshape(()) for v in y])
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    if isinstance(y, torch.Tensor) and y.shape == (n,) and not y.is_floating_point():
        if y.dtype != torch.bool:
            return y.detach().cpu().long()
    return torch.full((n,), -1, dtype=torch.long)


def _split_batch(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        return _dict_batch(batch)
    if isinstance(batch, list | tuple) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise InputError(
        f"a batch must be a Tensor, an (x, y) pair or a dict, got {type(batch).__name__}"
    )


def _dict_batch(batch: dict) -> tuple[torch.Tensor, Any]:
    xk = next((k for k in ("image", "x", "input", "inputs", "img") if k in batch), None)
    if xk is None:
        raise InputError(f"batch dicts need an 'image' key, got {sorted(batch)}")
    yk = next((k for k in ("label", "y", "target", "labels") if k in batch), None)
    return batch[xk], (batch[yk] if yk else None)


def _batches(data: Any, batch_size: int, skip: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """``(x, y)`` batches of the data in order, starting after ``skip`` samples."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, Subset

    if isinstance(data, torch.Tensor):
        if data.dim() < 1:
            raise InputError("data must be an N x ... Tensor, got a scalar")
        for a in range(skip, data.shape[0], batch_size):
            yield data[a : a + batch_size], None
        return
    if _is_map_dataset(data):
        n = len(data)
        loader = DataLoader(
            Subset(data, range(min(skip, n), n)),
            batch_size=batch_size,
            shuffle=False,
            collate_fn=_collate,
        )
        yield from loader
        return
    if (
        skip
        and isinstance(data, DataLoader)
        and isinstance(data.sampler, SequentialSampler)
        and type(data.batch_sampler) is BatchSampler
        and not data.drop_last
    ):
        # A sequential loader over a map-style dataset: restart it at ``skip`` instead of
        # loading and discarding the finished samples.
        n = len(data.dataset)  # type: ignore[arg-type]
        extra = (
            {
                "prefetch_factor": data.prefetch_factor,
                "multiprocessing_context": data.multiprocessing_context,
            }
            if data.num_workers
            else {}
        )
        data = DataLoader(
            Subset(data.dataset, range(min(skip, n), n)),
            batch_size=data.batch_size,
            shuffle=False,
            num_workers=data.num_workers,
            collate_fn=data.collate_fn,
            pin_memory=data.pin_memory,
            timeout=data.timeout,
            worker_init_fn=data.worker_init_fn,
            persistent_workers=data.persistent_workers,
            **extra,
        )
        skip = 0
    if not isinstance(data, Iterable):
        raise InputError(
            f"data must be a DataLoader, a Dataset, a Tensor or an iterable of batches, got "
            f"{type(data).__name__}"
        )
    for batch in data:
        x, y = _split_batch(batch)
        if not isinstance(x, torch.Tensor):
            raise InputError(f"batches must hold a Tensor of inputs, got {type(x).__name__}")
        n = int(x.shape[0]) if x.dim() else 0
        if skip >= n:
            skip -= n
            continue
        if skip:
            lab = _labels(y, n)[skip:]
            x, y, skip = x[skip:], lab, 0
        yield x, y


def _pool(a: torch.Tensor, pool: str | None) -> torch.Tensor:
    """Spatial pooling ``N x C x ... -> N x C`` (mean or max over every axis after C)."""
    if pool is None or a.dim() <= 2:
        return a
    dims = tuple(range(2, a.dim()))
    return a.mean(dim=dims) if pool == "avg" else a.amax(dim=dims)


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, list | tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]  # (logits, aux) or named tuples such as GoogLeNetOutputs
    if isinstance(out, dict):
        for key in ("logits", "out", "output"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    raise InputError(f"the model returned {type(out).__name__}, not a Tensor of logits")


def _check_finite(t: torch.Tensor, what: str, batch: int, start: int, source=None) -> None:
    if bool(torch.isfinite(t).all()):
        return
    bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten()
    samples = [start + int(i) for i in bad[:5]]
    if source is not None and bool(torch.isfinite(source).all()):
        raise InputError(
            f"activations of {what} overflow float16 at batch {batch} (samples {samples}); "
            "extract with dtype=torch.float32"
        )
    raise InputError(
        f"non-finite activations (NaN or inf) in {what} at batch {batch} (samples {samples}"
        f"{'...' if bad.numel() > 5 else ''}); check those inputs for NaN/inf and the model "
        "for overflow (e.g. run in float32)"
    )


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


def extract(
    model: nn.Module,
    data: Any,
    layers: LayerSpec | Sequence[LayerSpec],
    *,
    pool: str | None = None,
    dtype: torch.dtype = torch.float32,
    path: str | os.PathLike | None = None,
    shard_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    resume: bool = True,
    grey_to_rgb: bool = False,
    reuse: bool = False,
) -> ActivationBank:
    """Run the model over the data and keep the activations of some layers, with the logits.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        The network (in eval mode during extraction; left exactly as it was afterwards).
    data : DataLoader, Dataset, Tensor or iterable
        Images as the data declares them in its ``image_space`` attribute: ``"raw"`` (in
        ``[0, 1]``, normalised here with the preprocessing of the LoadedModel given as
        ``model``) or ``"normalized"`` (the default where nothing is declared); batches whose
        values contradict it are refused. An ``N x C x H x W`` Tensor, a map-style
        Dataset whose items are ``x``, ``(x, y, ...)`` or ``{"image": x, "label": y}``, or a
        DataLoader / iterable yielding batches ``x``, ``(x, y, ...)`` or such dicts. Labels are
        kept where ``y`` is an integer class per sample, else ``-1``. To resume, the data must
        come in the same order (no shuffling).
    layers : layer spec or sequence of them
        See :func:`xnn_toolkit.layers.resolve_layer` (names, modules, stage indices).
    pool : {None, "avg", "max"}
        Pool conv activations over space to ``N x C`` (before they leave the device).
    dtype : torch.float32 or torch.float16
        Storage type of the activations (logits are always float32).
    path : str or PathLike, optional
        Directory to stream the bank into (bounded memory, resumable); in memory when ``None``.
    shard_size : int, optional
        Samples per shard on disk (default: about 64 MiB per shard).
    batch_size : int
        For Tensor and Dataset data (DataLoaders keep their own).
    device : str or torch.device, optional
        Where the forward passes run; default and only allowed value: the model's device.
    progress : bool
        Show a tqdm progress bar.
    resume : bool
        With ``path``: continue an unfinished extraction there (or return the finished bank);
        with ``False`` start over, deleting the bank in ``path``.
    grey_to_rgb : bool
        Accept grey (1-channel) images for a colour model by repeating the channel.
    reuse : bool
        With ``path``: return a finished bank there even when the data's fingerprint differs
        from the data it was extracted from (by default that is an error).

    Returns
    -------
    ActivationBank
        ``N`` samples; per layer ``N x C x H x W`` (``N x C`` when pooled, ``N x D`` for
        linear layers), logits ``N x K``, labels ``N``, indices ``N`` (``0 .. N - 1``).

    Raises
    ------
    InputError
        Empty data, bad arguments, non-finite activations (naming the layer and the batch).
    BankError
        A bank in ``path`` that does not match (other layers, model or options) or cannot be
        written; finished shards are kept.
    """
    loaded = model
    model = getattr(model, "model", model) if not isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module or LoadedModel, got {type(model).__name__}")
    fit = data_fit(loaded, data, grey_to_rgb=grey_to_rgb, arg="data")
    if pool not in (None, "avg", "max"):
        raise InputError(f"pool must be None, 'avg' or 'max', got {pool!r}")
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.replace("torch.", ""), dtype)  # type: ignore[assignment]
    if dtype not in (torch.float32, torch.float16):
        raise InputError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    if shard_size is not None and (
        isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1
    ):
        raise InputError(f"shard_size must be a positive int or None, got {shard_size!r}")
    specs = [layers] if isinstance(layers, str | int | nn.Module) else list(layers)
    if not specs:
        raise InputError("layers is empty; name at least one layer (e.g. 'default')")
    names: list[str] = []
    for s in specs:
        name = resolve_layer(model, s)[0]
        if name not in names:
            names.append(name)
    dev = _model_device(model)
    if device is not None and not _same_device(torch.device(device), dev):
        raise InputError(
            f"the model is on {dev}, not {torch.device(device)}: move it first with "
            f"model.to({str(torch.device(device))!r}) (extract does not move your model)"
        )
    total = _known_length(data)
    if total == 0:
        raise InputError("the data set is empty; nothing to extract")

    root = Path(path) if path is not None else None
    manifest: dict | None = None
    fingerprint = _model_fingerprint(model) if root is not None else None
    probe = _data_probe(data, total) if root is not None else None
    if root is not None:
        manifest = _open_for_resume(
            root, names, pool, dtype, shard_size, fingerprint, total, resume, probe, reuse
        )
        if manifest is not None and manifest["complete"]:
            return ActivationBank.load(root)
    skip = int(manifest["num_samples"]) if manifest is not None else 0
    made_root = root is not None and not root.exists()
    if root is not None and manifest is None:
        _prepare_dir(root, fresh=False, overwrite=True)
    try:
        return _extract_into(
            model,
            data,
            names,
            root,
            manifest,
            fit,
            pool,
            dtype,
            shard_size,
            fingerprint,
            total,
            probe,
            batch_size,
            skip,
            dev,
            progress,
        )
    except BaseException:
        if root is not None and skip == 0:
            _discard_empty(root, made_root)  # nothing half-written: no bank without a shard
        raise


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


def _extract_into(
    model,
    data,
    names,
    root,
    manifest,
    fit,
    pool,
    dtype,
    shard_size,
    fingerprint,
    total,
    probe,
    batch_size,
    skip,
    dev,
    progress,
) -> ActivationBank:

    writer: _ShardWriter | None = _ShardWriter(root, manifest) if manifest else None
    collector = _MemoryCollector(total)
    seen = skip
    bar = _progress(progress, total, skip)
    try:
        with record(model, names, eval_mode=True) as rec, torch.no_grad():
            for b, (x, y) in enumerate(_batches(data, batch_size, skip)):
                n = int(x.shape[0])
                if n == 0:
                    continue
                x = fit.images(x, seen)
                fit.labels(_labels(y, n), seen)
                out = _output_tensor(model(x.to(dev, non_blocking=True)))
                arrays = _collect(rec.activations, names, out, y, n, seen, b, pool, dtype)
                if root is not None:
                    if writer is None:
                        manifest = _start_manifest(
                            root, names, pool, dtype, shard_size, fingerprint, total, arrays, probe
                        )
                        writer = _ShardWriter(root, manifest)
                    writer.add({k: v.numpy() for k, v in arrays.items()})
                else:
                    collector.add(arrays, seen)
                rec.clear()
                seen += n
                if bar is not None:
                    bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    if seen == 0:
        raise InputError("the data yielded no samples; nothing to extract")
    if root is not None:
        assert writer is not None
        writer.finish()
        return ActivationBank.load(root)
    shard: dict[str, Any] = collector.result(seen)
    shapes = {k: tuple(v.shape[1:]) for k, v in shard.items()}
    shard["n"] = seen
    return ActivationBank(names, [shard], shapes, pool=pool, dtype=dtype)


class _MemoryCollector:
    """Keeps the batches of an in-memory extraction: written into preallocated ``N x ...``
    tensors when the data's length is known (one copy of the bank, not two), else listed
    and concatenated at the end."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.full: dict[str, torch.Tensor] = {}
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, arrays: dict[str, torch.Tensor], at: int) -> None:
        n = int(next(iter(arrays.values())).shape[0])
        if self.total is not None and at + n <= self.total:
            for k, v in arrays.items():
                if k not in self.full:
                    self.full[k] = torch.empty((self.total, *v.shape[1:]), dtype=v.dtype)
                self.full[k][at : at + n] = v
            return
        if self.total is not None:  # more samples than announced: switch to a list
            self.parts = {k: [t[:at]] for k, t in self.full.items()}
            self.full, self.total = {}, None
        for k, v in arrays.items():
            self.parts.setdefault(k, []).append(v)

    def result(self, seen: int) -> dict[str, torch.Tensor]:
        if self.total is not None:
            return {k: t if seen == self.total else t[:seen].clone() for k, t in self.full.items()}
        return {k: torch.cat(v) for k, v in self.parts.items()}


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _same_device(asked: torch.device, have: torch.device) -> bool:
    return asked.type == have.type and asked.index in (None, have.index)


def _progress(progress: bool, total: int | None, initial: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="extract", leave=False)


def _collect(acts, names, out, y, n, start, batch, pool, dtype) -> dict[str, torch.Tensor]:
    """One batch's arrays on the CPU, in storage types, checked for NaN/inf."""
    arrays: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        if name not in acts:
            raise InputError(
                f"layer {name!r} did not run in the forward pass of batch {batch}; record a "
                "layer that the model's forward uses"
            )
        a = acts[name]
        if a.dim() == 0 or a.shape[0] != n:
            raise InputError(
                f"layer {name!r} gives shape {tuple(a.shape)} for a batch of {n}; only layers "
                "whose output has the batch as first dimension can be banked"
            )
        pooled = _pool(a, pool)
        stored = pooled.to(dtype)
        _check_finite(
            stored,
            f"layer {name!r}",
            batch,
            start,
            source=pooled if dtype != pooled.dtype else None,
        )
        arrays[f"act{i}"] = stored.cpu().contiguous()
    logits = out.detach().flatten(1).float() if out.dim() > 1 else out.detach().float()[:, None]
    if logits.shape[0] != n:
        raise InputError(f"the model output has shape {tuple(out.shape)} for a batch of {n}")
    _check_finite(logits, "the model output (logits)", batch, start)
    arrays["logits"] = logits.cpu().contiguous()
    arrays["labels"] = _labels(y, n)
    arrays["indices"] = torch.arange(start, start + n, dtype=torch.long)
    return arrays


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
