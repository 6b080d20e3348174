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

import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._device import model_device
from ..datafit import data_fit
from ..errors import InputError
from ..hooks import record
from ..layers import LayerSpec, resolve_layer
from .bank import ActivationBank
from .store import (
    _DTYPES,
    _discard_empty,
    _model_fingerprint,
    _open_for_resume,
    _prepare_dir,
    _ShardWriter,
    _start_manifest,
)

__all__ = ["extract"]


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
    dev = model_device(model)
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
