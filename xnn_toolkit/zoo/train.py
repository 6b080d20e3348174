"""Train one bundled model reproducibly and write its weights and model card.

Usage::

    python -m xnn_toolkit.zoo.train --model vgg_fmnist [--epochs E] [--seed S] [--out assets/models]

Each bundled model has a recipe here (architecture, data, optimiser, epochs). Training is
seeded (weights initialisation, dropout and the per-epoch data order all come from ``--seed``),
runs on whole in-memory tensors in a fixed order, uses AdamW with a one-cycle learning-rate
schedule, and ends by measuring accuracy on the held-out test split. The weights
(``<name>.safetensors``) and then the card (``<name>.json``, see :data:`xnn_toolkit.zoo.CARD_KEYS`)
are written atomically (temporary file + rename), so a card always describes complete weights.

Data:

- ``*_fmnist``: Fashion-MNIST, 60 000 training images (``/usr/share/datasets/fashion-mnist`` or
  ``--data-root``), tested on the 10 000 test images; 1 x 28 x 28 inputs.
- ``*_synth``: the synthetic part dataset (:class:`xnn_toolkit.data.synthetic.SyntheticParts`),
  20 000 training images (seed 0), tested on 2 000 (seed 1); 3 x 64 x 64 inputs.

Reproducibility: the seed fixes the initial weights, the dropout masks and the data order;
on the CPU the same seed, thread count (``--threads``, part of the recorded command) and library
versions give the same weights file bit for bit (checked by ``tests/test_zoo.py``). The card
records all of these. On a GPU, deterministic kernels are requested but not guaranteed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AssetError, SpecError, close_matches
from . import build_model

__all__ = ["train", "recipe_names"]  # main() is the script entry point, not API


@dataclass(frozen=True)
class _Recipe:
    arch: str
    arch_kwargs: dict[str, Any]
    dataset: str  # "fashion_mnist" or "synthetic"
    epochs: int
    lr: float
    weight_decay: float = 5e-4
    batch_size: int = 128
    train_size: int | None = None  # None: the whole training split
    test_size: int | None = None
    flip: bool = False  # random horizontal flips


_RECIPES: dict[str, _Recipe] = {
    "vgg_fmnist": _Recipe(
        arch="vgg_small",
        arch_kwargs=dict(
            channels=[32, 64, 128],
            convs_per_block=[1, 1, 2],
            fc=[256, 256],
            pool_size=3,
            dropout=0.3,
        ),
        dataset="fashion_mnist",
        epochs=5,
        lr=2e-3,
    ),
    "resnet_fmnist": _Recipe(
        arch="resnet_small",
        arch_kwargs=dict(
            channels=[16, 32, 64, 128], layers=[1, 1, 1, 1], stem_stride=1, stem_pool=False
        ),
        dataset="fashion_mnist",
        epochs=6,
        lr=4e-3,
    ),
    "vgg_synth": _Recipe(
        arch="vgg_small",
        arch_kwargs=dict(
            channels=[32, 64, 128, 128],
            convs_per_block=[1, 1, 2, 2],
            fc=[256, 256],
            pool_size=4,
            dropout=0.3,
            batch_norm=True,
        ),
        dataset="synthetic",
        epochs=6,
        lr=2e-3,
        train_size=20000,
        test_size=2000,
    ),
    "resnet_synth": _Recipe(
        arch="resnet_small",
        arch_kwargs=dict(
            channels=[32, 64, 128, 256], layers=[1, 1, 1, 1], stem_stride=1, stem_pool=True
        ),
        dataset="synthetic",
        epochs=6,
        lr=4e-3,
        train_size=20000,
        test_size=2000,
    ),
}


def recipe_names() -> list[str]:
    """Names of the models :func:`train` knows how to train."""
    return sorted(_RECIPES)


@dataclass
class _Data:
    train_x: torch.Tensor  # N x C x H x W, uint8 or float
    train_y: torch.Tensor  # N int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    scale: float  # divide stored pixels by this to get [0, 1]
    mean: list[float]
    std: list[float]
    class_names: list[str]
    details: dict[str, Any]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fashion_mnist(
    rec: _Recipe, root: str | None, train_size: int | None, test_size: int | None
) -> _Data:
    from ..data.fashion_mnist import FashionMNIST, _split_files

    tr = FashionMNIST(root, split="train")
    te = FashionMNIST(root, split="test")
    n_tr = len(tr) if train_size is None else min(train_size, len(tr))
    n_te = len(te) if test_size is None else min(test_size, len(te))
    x = tr.data[:n_tr].float().div(255.0)
    # Statistics of the images actually trained on (== MEAN / STD for the full split).
    mean, std = [round(x.mean().item(), 4)], [round(x.std().item(), 4)]
    details = {}
    for split, ds, n in (("train", tr, n_tr), ("test", te, n_te)):
        files = _split_files(ds.root, split)
        details[split] = {
            "source": str(ds.root),
            "n": n,
            "files": {p.name: _sha256_file(p) for p in files},
        }
    return _Data(
        train_x=tr.data[:n_tr].unsqueeze(1),
        train_y=tr.targets[:n_tr],
        test_x=te.data[:n_te].unsqueeze(1),
        test_y=te.targets[:n_te],
        scale=255.0,
        mean=mean,
        std=std,
        class_names=list(tr.classes),
        details=details,
    )


def _synthetic(
    rec: _Recipe, train_size: int | None, test_size: int | None, cache_dir: str | None
) -> _Data:
    try:
        from ..data.synthetic import SyntheticParts
    except ImportError as exc:
        raise AssetError(
            f"the synthetic part dataset is not available ({exc}); "
            "xnn_toolkit/data/synthetic.py must provide SyntheticParts"
        ) from exc
    n_tr = train_size if train_size is not None else rec.train_size
    n_te = test_size if test_size is not None else rec.test_size
    tr = SyntheticParts(n_tr, size=64, seed=0)
    te = SyntheticParts(n_te, size=64, seed=1)

    def stack(ds) -> tuple[torch.Tensor, torch.Tensor]:
        cache = None
        if cache_dir is not None:
            # keyed by the renderer's source too, so an edited generator is re-rendered
            src = Path(sys.modules[SyntheticParts.__module__].__file__).parent
            h = hashlib.sha256()
            for f in sorted(src.glob("*.py")):
                h.update(f.read_bytes())
            cache = Path(cache_dir) / (
                f"synthetic_seed{ds.seed}_n{len(ds)}_size{ds.size}_{h.hexdigest()[:12]}.pt"
            )
            if cache.is_file():
                xs, ys = torch.load(cache)
                print(f"  loaded {len(ds)} rendered images from {cache}", flush=True)
                return xs, ys
        # Stored as bytes (error <= 0.5 / 255) to keep 20 000 RGB images in ~250 MB.
        xs = torch.empty(len(ds), 3, 64, 64, dtype=torch.uint8)
        ys = torch.empty(len(ds), dtype=torch.long)
        for start in range(0, len(ds), 256):
            idx = list(range(start, min(start + 256, len(ds))))
            img, ann = ds.render_batch(idx)
            q = img.mul(255.0).round_().clamp_(0, 255)
            xs[idx[0] : idx[-1] + 1] = q.to(torch.uint8)
            ys[idx[0] : idx[-1] + 1] = ann.labels
        print(f"  rendered {len(ds)} images", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((xs, ys), cache)
        return xs, ys

    t0 = time.perf_counter()
    train_x, train_y = stack(tr)
    test_x, test_y = stack(te)
    print(f"  data ready in {time.perf_counter() - t0:.1f}s", flush=True)
    return _Data(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        scale=255.0,
        mean=[float(m) for m in tr.mean],
        std=[float(s) for s in tr.std],
        class_names=list(tr.classes),
        details={
            "train": {
                "source": "xnn_toolkit.data.synthetic.SyntheticParts",
                "seed": 0,
                "n": n_tr,
                "size": 64,
                "stored_as": "uint8 (round(255 * x))",
            },
            "test": {
                "source": "xnn_toolkit.data.synthetic.SyntheticParts",
                "seed": 1,
                "n": n_te,
                "size": 64,
                "stored_as": "uint8 (round(255 * x))",
            },
        },
    )


def _normalise(x: torch.Tensor, data: _Data, device: torch.device) -> torch.Tensor:
    x = x.to(device).float().div_(data.scale)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def _accuracy(model: nn.Module, data: _Data, device: torch.device, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(data.test_y), batch):
        x = _normalise(data.test_x[i : i + batch], data, device)
        pred = model(x).argmax(1).cpu()
        correct += int((pred == data.test_y[i : i + batch]).sum())
    return correct / max(1, len(data.test_y))


@contextlib.contextmanager
def _reproducible(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix the thread count, ask for deterministic kernels; restore afterwards.

    ``fork_rng`` gives back the caller's random state.
    """
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        try:
            torch.manual_seed(seed)
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            torch.set_num_threads(old_threads)
            torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise AssetError(f"could not write {path}: {exc}") from exc


def train(
    name: str,
    epochs: int | None = None,
    seed: int = 0,
    out: str | os.PathLike = "assets/models",
    data_root: str | None = None,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    threads: int = 2,
    train_size: int | None = None,
    test_size: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train the bundled model ``name`` and write ``<out>/<name>.safetensors`` and ``.json``.

    Parameters
    ----------
    name : str
        One of :func:`recipe_names`.
    epochs : int, optional
        Overrides the recipe's number of epochs.
    seed : int
        Seeds initialisation, dropout and the data order.
    out : path
        Output folder (created if needed).
    data_root : str, optional
        Fashion-MNIST folder (see :func:`xnn_toolkit.data.fashion_mnist.find_fashion_mnist`).
    cache_dir : str, optional
        Keep the rendered synthetic images here and reuse them (the rendering is
        deterministic, so this changes nothing but time).
    device : str or torch.device
        Where to train.
    threads : int
        CPU threads used by torch during training (restored afterwards).
    train_size, test_size : int, optional
        Use only the first images of each split (quick checks; the card records the sizes).
    verbose : bool
        Print one line per epoch.

    Returns
    -------
    dict
        The model card that was written (keys :data:`xnn_toolkit.zoo.CARD_KEYS` and
        ``dataset_details``, ``train_size``, ``test_size``, ``device``, ``threads``, ...).

    Raises
    ------
    SpecError
        Unknown model name.
    AssetError
        Training data missing, or the output cannot be written.
    """
    from safetensors.torch import save

    if name not in _RECIPES:
        raise SpecError(f"no training recipe for {name!r}; " + close_matches(name, _RECIPES))
    rec = _RECIPES[name]
    epochs = rec.epochs if epochs is None else int(epochs)
    if epochs < 1:
        raise SpecError(f"epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    out = Path(out)
    log = print if verbose else (lambda *a, **k: None)

    log(f"[{name}] loading {rec.dataset} data", flush=True)
    if rec.dataset == "fashion_mnist":
        data = _fashion_mnist(rec, data_root, train_size, test_size)
    else:
        data = _synthetic(rec, train_size, test_size, cache_dir)
    in_chans = int(data.train_x.shape[1])
    input_size = [in_chans, int(data.train_x.shape[2]), int(data.train_x.shape[3])]
    num_classes = len(data.class_names)
    n = len(data.train_y)
    steps = epochs * ((n + rec.batch_size - 1) // rec.batch_size)

    with _reproducible(seed, threads):
        model = build_model(
            rec.arch, num_classes=num_classes, in_chans=in_chans, **rec.arch_kwargs
        ).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=rec.lr, weight_decay=rec.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=rec.lr, total_steps=steps)
        order_gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(n, generator=order_gen)
            flips = torch.rand(n, generator=order_gen) < 0.5 if rec.flip else None
            total, correct, loss_sum = 0, 0, 0.0
            for i in range(0, n, rec.batch_size):
                idx = perm[i : i + rec.batch_size]
                x = _normalise(data.train_x[idx], data, device)
                y = data.train_y[idx].to(device)
                if flips is not None:
                    f = flips[idx].to(device)
                    x = torch.where(f.view(-1, 1, 1, 1), x.flip(-1), x)
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += len(y)
                correct += int((logits.argmax(1) == y).sum())
                loss_sum += loss.item() * len(y)
            log(
                f"[{name}] epoch {epoch + 1}/{epochs} loss {loss_sum / total:.4f} "
                f"train_acc {correct / total:.4f} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
        train_seconds = time.perf_counter() - t0
        acc = _accuracy(model, data, device)
    log(f"[{name}] test accuracy {acc:.4f} on {len(data.test_y)} images", flush=True)

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key: safetensors writes a map in random order, which would change the sha.
    payload = save(state, metadata={"name": name})
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    _atomic_write(weights, payload)
    cmd = (
        f"python -m xnn_toolkit.zoo.train --model {name} --epochs {epochs} --seed {seed} "
        f"--threads {threads}"
    )
    if train_size is not None or test_size is not None:
        cmd += "".join(
            f" --{k.replace('_', '-')} {v}"
            for k, v in (("train_size", train_size), ("test_size", test_size))
            if v is not None
        )
    card = {
        "name": name,
        "arch": rec.arch,
        "arch_kwargs": rec.arch_kwargs,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "input_size": input_size,
        "mean": data.mean,
        "std": data.std,
        "class_names": data.class_names,
        "dataset": rec.dataset,
        "dataset_details": data.details,
        "train_size": n,
        "test_size": len(data.test_y),
        "train_command": cmd,
        "seed": seed,
        "epochs": epochs,
        "batch_size": rec.batch_size,
        "optimizer": f"AdamW(lr={rec.lr}, weight_decay={rec.weight_decay}), OneCycleLR",
        "augmentation": "random horizontal flip" if rec.flip else "none",
        "test_accuracy": round(acc, 4),
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "threads": threads,
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "weights_bytes": len(payload),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
    }
    _atomic_write(out / f"{name}.json", (json.dumps(card, indent=2) + "\n").encode())
    log(f"[{name}] wrote {weights} ({len(payload) / 1e6:.2f} MB) and {name}.json", flush=True)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m xnn_toolkit.zoo.train``)."""
    p = argparse.ArgumentParser(
        prog="python -m xnn_toolkit.zoo.train",
        description="Train one bundled model and write its weights and model card.",
    )
    p.add_argument("--model", required=True, choices=recipe_names())
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="assets/models")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--cache-dir", default=None, help="reuse rendered synthetic images")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-size", type=int, default=None, help="first N training images")
    p.add_argument("--test-size", type=int, default=None, help="first N test images")
    a = p.parse_args(argv)
    try:
        train(
            a.model,
            epochs=a.epochs,
            seed=a.seed,
            out=a.out,
            data_root=a.data_root,
            cache_dir=a.cache_dir,
            device=a.device,
            threads=a.threads,
            train_size=a.train_size,
            test_size=a.test_size,
        )
    except (SpecError, AssetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
