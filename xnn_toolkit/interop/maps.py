"""Heatmaps on disk: safetensors shards with a JSON manifest, written by the scoring runner.

Layout of ``<out>/maps/``: ``manifest.json`` (model spec, preprocessing, methods, targets,
toolkit version, number of shards) and one ``shard-NNNNN.safetensors`` per scoring shard.
Each shard holds one float32 ``N x H x W`` tensor per (target, method) pair, at the model
input's resolution (plus, under ``layer:<key>``, the map at the read layer's resolution for
methods that read at a layer), and describes its rows in the safetensors metadata (image
index, label, explained class and its name, method, read layer, target). Every file is
written atomically (temporary file, then a rename), so a killed run leaves whole shards only,
and each shard is written by the process that scored it (``--resume`` and ``torchrun`` work
unchanged).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, atomic_write_text
from ..errors import AssetError, InputError

__all__ = ["SavedMaps", "load_maps", "write_manifest", "write_shard"]

_SHARD = re.compile(r"^shard-(\d{5})\.safetensors$")


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def write_manifest(folder: Path, header: dict[str, Any], num_shards: int) -> None:
    """Write ``manifest.json`` and drop shard files a previous, larger run left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        m = _SHARD.match(f.name)
        if m and int(m.group(1)) >= num_shards:
            f.unlink()
    atomic_write_text(
        folder / "manifest.json",
        json.dumps({"format": "xnn-maps/1", "num_shards": num_shards, **header}, indent=1),
    )


def write_shard(folder: Path, k: int, maps: dict[str, torch.Tensor], rows: dict[str, Any]) -> None:
    """Write shard ``k`` atomically: ``maps`` by key, ``rows`` (JSON) describing them."""
    from safetensors.torch import save_file

    tensors = {key: v.detach().to("cpu", torch.float32).contiguous() for key, v in maps.items()}
    meta = {"rows": json.dumps(rows)}
    atomic_write(_shard_path(folder, k), lambda tmp: save_file(tensors, tmp, metadata=meta))


@dataclass
class SavedMaps:
    """Heatmaps read back by :func:`load_maps`.

    Attributes
    ----------
    maps : Tensor
        ``M x H x W`` float32, one map per row of ``records``.
    records : list of dict
        Per map: ``index`` (image index in the data set), ``label``, ``class`` (explained
        class, ``-1`` for none), ``class_name``, ``method``, ``layer``, ``target``.
    manifest : dict
        The run's ``manifest.json``: model spec and weights fingerprint, ``preprocessing``,
        ``class_names``, data set, configuration, ``versions`` (toolkit included).
    """

    maps: torch.Tensor
    records: list[dict[str, Any]]
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.records)


def load_maps(
    path: str | os.PathLike,
    method: str | None = None,
    image: int | None = None,
    cls: int | str | None = None,
    at_layer: bool = False,
) -> SavedMaps:
    """Read the heatmaps a scoring run saved (``save_maps=True`` / ``--save-maps``).

    Parameters
    ----------
    path : str or PathLike
        The run's output folder (or its ``maps/`` subfolder).
    method : str, optional
        Keep only this method's maps.
    image : int, optional
        Keep only this image index.
    cls : int or str, optional
        Keep only this explained class (index or name).
    at_layer : bool
        Return the maps at the read layer's resolution (channels summed, before any clamp
        or upsampling) instead of the input-resolution heatmaps; only methods that read at
        a layer have them (the others are left out).

    Returns
    -------
    SavedMaps
        Maps shard by shard; inside a shard by (target, method) pair, then image.

    Raises
    ------
    AssetError
        No maps folder or manifest, or a shard that is missing or damaged (named).
    """
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    folder = root if (root / "manifest.json").is_file() and root.name == "maps" else root / "maps"
    mf = folder / "manifest.json"
    if not mf.is_file():
        raise AssetError(
            f"no saved maps in {os.fspath(root)!r} (expected {os.fspath(mf)!r}); score with "
            "save_maps=True (xnn score --save-maps) first"
        )
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
        num = int(manifest["num_shards"])
    except (ValueError, KeyError, TypeError) as exc:
        raise AssetError(f"{os.fspath(mf)!r} is not a maps manifest ({exc})") from exc
    maps, records = [], []
    for k in range(num):
        f = _shard_path(folder, k)
        if not f.is_file():
            raise AssetError(
                f"maps shard {f.name} is missing in {os.fspath(folder)!r} ({num} expected); "
                "finish the run with --resume"
            )
        try:
            with safe_open(os.fspath(f), framework="pt") as sf:
                rows = json.loads((sf.metadata() or {})["rows"])
                tensors = {key: sf.get_tensor(key) for key in sf.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise AssetError(
                f"maps shard {f.name} in {os.fspath(folder)!r} is damaged or truncated "
                f"({exc}); delete it and rerun with --resume"
            ) from exc
        for key in rows["order"]:
            t = tensors.get(f"layer:{key}") if at_layer else tensors[key]
            if t is None:
                continue
            for j, rec in enumerate(rows["groups"][key]):
                maps.append(t[j])
                records.append(rec)
    keep = [
        i
        for i, r in enumerate(records)
        if (method is None or r["method"] == method)
        and (image is None or r["index"] == image)
        and (cls is None or r["class"] == cls or r.get("class_name") == cls)
    ]
    if not maps:
        what = "read-layer maps (at_layer=True)" if at_layer else "maps"
        raise InputError(f"no {what} in {os.fspath(folder)!r}")
    h, w = maps[0].shape[-2:]
    shapes = {tuple(maps[i].shape) for i in keep}
    if len(shapes) > 1:
        raise InputError(
            f"the selected read-layer maps have different sizes {sorted(shapes)}; pass "
            "method=... to load one method's maps at a time"
        )
    out = torch.stack([maps[i] for i in keep]) if keep else torch.zeros(0, h, w)
    return SavedMaps(out, [records[i] for i in keep], manifest)
