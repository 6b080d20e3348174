"""The activation bank: a data set's activations, logits and labels, in memory or on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BankError, InputError, LayerNotFoundError, close_matches
from .store import (
    _META_KEYS,
    _auto_shard_size,
    _bank_from_manifest,
    _new_manifest,
    _prepare_dir,
    _read_manifest,
    _storage_dtype,
    _validate_shards,
    _write_manifest,
    _write_shard,
)

__all__ = ["ActivationBank"]


# --------------------------------------------------------------------------- the bank


class ActivationBank:
    """Activations of some layers for ``N`` samples, with their logits, labels and indices.

    Build one with :func:`~xnn_toolkit.bank.extract`, :meth:`ActivationBank.from_tensors` or
    :meth:`ActivationBank.load`; do not call the constructor directly.

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
