"""What the heads fitted *through the model* share: data feeding, class rows, one epoch loop.

:class:`~xnn_toolkit.heads.ClassPaths` and :class:`~xnn_toolkit.heads.InformationDropout`
learn per-class parameters (masks, noise scales) at some layers of a frozen network, from
``(images, labels)`` data. They share, here:

- the data door (:func:`prepare`): a tuple of tensors, a map-style dataset or an iterable of
  batches (a DataLoader keeps its own order), each batch checked by
  :meth:`xnn_toolkit.datafit.DataFit.images`; the model's device, the masked layers and the
  number of logits; the fitted classes and the row of each logit (:func:`class_rows`) and the
  minimum number of images per class (:func:`check_counts`);
- the epoch loop (:func:`epoch_loop`): shuffling from ``random_state`` only (a private
  generator), labels checked against the logits, images of classes without a row dropped,
  the per-epoch history of the loss terms;
- the row-wise optimiser (:class:`_RowOptimizer`): each class row follows the trajectory of
  a one-class fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._device import model_device
from .._guard import model_guard
from ..datafit import as_labels, data_fit
from ..errors import InputError
from ._placement import auto_layers, check_layers

__all__: list[str] = []


def _is_pair(data: object) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


def _is_dataset(data: object) -> bool:
    """A map-style dataset of samples; a list or tuple counts as one when its items are
    samples (a ``C x H x W`` image first), not batches (``N x C x H x W``)."""
    if isinstance(data, torch.utils.data.DataLoader | torch.Tensor):
        return False
    if isinstance(data, list | tuple):
        first = data[0] if data else None
        if isinstance(first, dict):
            first = next(
                (first[k] for k in ("image", "x", "input", "inputs", "img") if k in first), None
            )
        elif isinstance(first, list | tuple) and first:
            first = first[0]
        return isinstance(first, torch.Tensor) and first.dim() == 3
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


def _check_pair(data: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data
    if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
        raise InputError(
            f"data as (images, labels) must be N x ... and (N,), got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if len(x) == 0:
        raise InputError("data is empty")
    return x, y.long()


def _known_labels(data: object) -> torch.Tensor | None:
    """All labels of the data when they are available without reading the images."""
    if _is_pair(data):
        return _check_pair(data)[1]
    if _is_dataset(data):
        for attr in ("targets", "labels"):
            t = getattr(data, attr, None)
            if t is not None and not callable(t):
                t = torch.as_tensor(t)
                if t.dim() == 1 and len(t) == len(data):
                    return t.long()
        label = getattr(data, "label", None)  # e.g. SyntheticParts.label(i), no rendering
        if callable(label):
            return torch.tensor([int(label(i)) for i in range(len(data))], dtype=torch.long)
    return None


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of one batch, split as :func:`xnn_toolkit.extract` splits them
    (pairs, tuples, dicts); the heads need the labels."""
    from ..bank.extraction import _split_batch as split

    try:
        x, y = split(batch)
    except InputError:
        x, y = None, None
    if not isinstance(x, torch.Tensor) or y is None:
        raise InputError(
            f"each batch must be (images, labels, ...), got {type(batch).__name__}; pass a "
            "DataLoader of (image, label) pairs, a Dataset, or an (images, labels) tuple"
        )
    return x, as_labels(y).reshape(-1)


def _batches(
    data: object, batch_size: int, gen: torch.Generator, door: Callable | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(images, labels)`` batches, shuffled with ``gen`` where we own the order;
    ``door(x, start)`` (:meth:`xnn_toolkit.datafit.DataFit.images`) checks each image batch."""
    seen = 0
    for x, y in _raw_batches(data, batch_size, gen):
        yield (x if door is None else door(x, seen)), y
        seen += int(x.shape[0])


def _raw_batches(
    data: object, batch_size: int, gen: torch.Generator | None, shuffle: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The one data adapter of the heads fitted on images: ``(images, labels)`` tensors, a
    map-style dataset of ``(image, label, ...)`` samples or an iterable of batches (kept in
    its own order); shuffled with ``gen`` where the order is ours and ``shuffle`` is set."""
    if _is_pair(data):
        x, y = _check_pair(data)
        order = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
        for s in range(0, len(x), batch_size):
            idx = order[s : s + batch_size]
            yield x[idx], y[idx]
    elif _is_dataset(data):
        seed = int(torch.randint(2**62, (1,), generator=gen)) if shuffle else 0
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=torch.Generator().manual_seed(seed) if shuffle else None,
            collate_fn=_collate_pairs,
        )
        yield from loader
    else:
        try:
            it = iter(data)  # type: ignore[call-overload]
        except TypeError:
            raise InputError(
                f"data must be an (images, labels) tuple of tensors, a Dataset or an "
                f"iterable of batches, got {type(data).__name__}"
            ) from None
        for batch in it:
            yield _split_batch(batch)


def _collate_pairs(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples as :func:`xnn_toolkit.extract` does (``(image, label, ...)`` or
    ``{"image": ..., "label": ...}``; annotations after the label are dropped); the heads
    need the labels."""
    from ..bank.extraction import _collate

    try:
        xs, ys = _collate(samples)
    except RuntimeError as exc:  # images of different sizes
        raise InputError(
            "dataset samples must be (image, label, ...) with C x H x W images of one size; "
            f"got {type(samples[0]).__name__}: {exc}"
        ) from None
    if ys is None:
        raise InputError("dataset samples must be (image, label, ...) pairs; labels are missing")
    return xs, as_labels(ys)


def _first_images(data: object) -> torch.Tensor:
    """A one-image batch for probing the network."""
    if _is_pair(data):
        return _check_pair(data)[0][:1]
    if _is_dataset(data):
        if len(data) == 0:
            raise InputError("the dataset is empty")
        item = data[0]
        x = item[0] if isinstance(item, tuple | list) else item
        return torch.as_tensor(x).unsqueeze(0)
    try:
        one_shot = iter(data) is data  # type: ignore[call-overload]
    except TypeError:
        one_shot = False
    if one_shot:
        raise InputError(
            f"data is a one-shot iterator ({type(data).__name__}) but fitting reads it once per "
            "epoch; pass a DataLoader, a list of batches, a Dataset or an (images, labels) tuple"
        )
    for batch in _batches(data, 1, torch.Generator()):
        return batch[0][:1]
    raise InputError("data yields no batches")


class _RowOptimizer:
    """Adam or normalised-gradient steps on ``R x C`` parameters, row (class) by row.

    Only the rows of classes present in a batch move; their step counters, moments and bias
    corrections are their own, so each row follows exactly the trajectory of a one-class
    fit on the same batches.

    - ``adam``: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
      ``θ ← θ − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`` (as ``torch.optim.Adam``).
    - ``normalized`` (official NAD code): ``θ ← θ − lr · g / ||g||₂``, the norm taken per
      class row of each layer (a row with zero gradient does not move).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        kind: str,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.kind = kind
        self.lr = lr
        self.betas = betas
        self.eps = eps
        n_rows = self.params[0].shape[0]
        self.t = torch.zeros(n_rows, dtype=torch.long, device=self.params[0].device)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], present: torch.Tensor) -> None:
        sel = present.reshape(-1, 1)
        if self.kind == "normalized":
            for p, g in zip(self.params, grads):
                norm = g.norm(dim=1, keepdim=True)
                upd = torch.where(norm > 0, g / norm.clamp_min(1e-30), torch.zeros_like(g))
                p.sub_(self.lr * upd * sel)
            return
        b1, b2 = self.betas
        self.t += present.long()
        t = self.t.clamp_min(1).to(self.params[0].dtype).reshape(-1, 1)
        bc1 = 1 - b1**t
        bc2 = 1 - b2**t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m.copy_(torch.where(sel, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(sel, b2 * v + (1 - b2) * g * g, v))
            upd = (m / bc1) / ((v / bc2).sqrt() + self.eps)
            p.sub_(self.lr * upd * sel)


# --------------------------------------------------------------------------- class rows


def class_rows(classes: Sequence[int] | None, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(classes, row_of)``: the fitted classes and the row of every logit (−1: none).

    Parameters
    ----------
    classes : sequence of int or None
        The classes to fit (``None``: every logit).
    n_out : int
        Number of logits.
    """
    if classes is None:
        cls = torch.arange(n_out)
    else:
        cls = torch.as_tensor(list(classes), dtype=torch.long)
        if cls.dim() != 1 or len(cls) == 0:
            raise InputError("classes must be a non-empty list of class indices")
        bad = [c for c in cls.tolist() if not 0 <= c < n_out]
        if bad:
            raise InputError(f"classes {bad} are out of range for a network with {n_out} logits")
        if len(cls.unique()) != len(cls):
            raise InputError(f"classes {cls.tolist()} lists a class more than once")
    row_of = torch.full((n_out,), -1, dtype=torch.long)
    row_of[cls] = torch.arange(len(cls))
    return cls, row_of


def check_counts(
    counts: torch.Tensor, cls: torch.Tensor, classes: Sequence[int] | None, min_images: int
) -> torch.Tensor:
    """The rows with images (bool); an error for classes with fewer than ``min_images``
    (named classes must all have them; with every logit, classes without images are
    dropped with a warning)."""
    import warnings

    if classes is not None:
        short = {int(c): int(n) for c, n in zip(cls, counts) if n < min_images}
    else:
        short = {int(c): int(n) for c, n in zip(cls, counts) if 0 < n < min_images}
    if short:
        raise InputError(
            f"too few images for some classes (class: images) {short}; each class needs "
            f"at least min_images={min_images}: add data, lower min_images, or pass "
            "classes= without them"
        )
    keep = counts > 0
    if not bool(keep.any()):
        raise InputError("no image of any class to fit: check the labels")
    missing = cls[~keep].tolist()
    if missing and classes is None:
        warnings.warn(
            f"classes {missing[:20]}{'...' if len(missing) > 20 else ''} have no images; "
            "they get no path",
            stacklevel=4,
        )
    return keep


def check_label_range(y: torch.Tensor, n_out: int) -> None:
    if bool(((y < 0) | (y >= n_out)).any()):
        raise InputError(f"labels must be in 0..{n_out - 1} (the network's logits)")


# --------------------------------------------------------------------------- the door


@dataclass
class ModelFit:
    """What :func:`prepare` found out before the first epoch.

    Attributes
    ----------
    model : nn.Module
        The network (a LoadedModel unwrapped).
    door : callable
        ``door(images, start)`` checks (and, for raw data of a LoadedModel, normalises) a
        batch.
    device : torch.device
    names : list of str
        The masked layers.
    shapes : dict of str to tuple
        Their output shapes on one image.
    n_out : int
        Number of logits.
    classes : Tensor
        The fitted classes; ``row_of[logit]`` is each logit's row (−1: not fitted).
    row_of : Tensor
    """

    model: nn.Module
    door: Callable
    device: torch.device
    names: list[str]
    shapes: dict
    n_out: int
    classes: torch.Tensor
    row_of: torch.Tensor


def prepare(
    model: nn.Module, data: object, layers: object, device: object, classes: Sequence[int] | None
) -> ModelFit:
    """Check the data against the model, pick the layers and the class rows (no training)."""
    door = data_fit(model, data, arg="data").images
    model = getattr(model, "model", model)  # a LoadedModel normalised raw data at the door
    dev = model_device(model, device)
    probe = door(_first_images(data), 0).to(dev)
    chosen = auto_layers(model, probe) if layers == "auto" else list(layers)  # type: ignore[call-overload]
    names, shapes = check_layers(model, chosen, probe)
    with model_guard(model, eval_mode=True), torch.no_grad():
        out = model(probe)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise InputError(
            f"the model must return N x K logits, got {getattr(out, 'shape', type(out).__name__)}"
        )
    n_out = int(out.shape[1])
    cls, row_of = class_rows(classes, n_out)
    known = _known_labels(data)
    if known is not None:
        check_label_range(known, n_out)
    return ModelFit(model, door, dev, names, shapes, n_out, cls, row_of)


def known_counts(fit: ModelFit, data: object) -> torch.Tensor | None:
    """Images per fitted class when the labels are known without reading the images."""
    known = _known_labels(data)
    if known is None:
        return None
    sel = fit.row_of[known]
    return torch.bincount(sel[sel >= 0], minlength=len(fit.classes))


# --------------------------------------------------------------------------- the epoch loop


def run_epochs(
    epochs: int,
    batches: Callable[[int], Iterator[tuple]],
    step: Callable[..., dict | None],
    summarize: Callable[[int, list[dict]], dict],
    *,
    start: Callable[[int], None] | None = None,
    end: Callable[[int], None] | None = None,
    verbose: bool = False,
) -> list[dict]:
    """The one epoch loop of the heads that train (class paths, information dropout, gates).

    Parameters
    ----------
    epochs : int
    batches : callable
        ``batches(epoch)``: that epoch's batches (shuffled by the caller from its
        ``random_state`` generator).
    step : callable
        ``step(epoch, *batch) -> stats`` (a dict; ``None`` skips the batch).
    summarize : callable
        ``summarize(epoch, stats) -> history row``.
    start, end : callable, optional
        Called with the epoch index before its first and after its last batch.
    verbose : bool
        Print each history row.

    Returns
    -------
    list of dict
        One row per epoch.
    """
    history = []
    for epoch in range(epochs):
        if start is not None:
            start(epoch)
        stats = []
        for batch in batches(epoch):
            out = step(epoch, *batch)
            if out is not None:
                stats.append(out)
        if end is not None:
            end(epoch)
        row = summarize(epoch, stats)
        history.append(row)
        if verbose:
            print(
                f"epoch {epoch:3d}: "
                + " ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                )
            )
    return history


def epoch_loop(
    fit: ModelFit,
    data: object,
    *,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    step: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, float]],
    end_of_epoch: Callable[[int], None] | None = None,
    verbose: bool = False,
) -> list[dict[str, float]]:
    """:func:`run_epochs` over ``data`` for the heads with class rows; the history is the mean
    of each loss term per step.

    Parameters
    ----------
    fit : ModelFit
    data : object
        As :func:`prepare` took it.
    epochs, batch_size : int
    gen : torch.Generator
        Shuffles the data where the loop owns the order (seeded from ``random_state``).
    step : callable
        ``step(epoch, x, y, rows) -> {term: summed value}`` on one batch, on the device, with
        the images of fitted classes only (``rows`` their class rows).
    end_of_epoch : callable, optional
        Called with the epoch index after its last batch.
    verbose : bool
        Print each epoch's row.
    """
    row_of = fit.row_of.to(fit.device)

    def batches(epoch: int) -> Iterator[tuple]:
        for x, y in _batches(data, batch_size, gen, fit.door):
            check_label_range(y, fit.n_out)
            y = y.to(fit.device)
            rows = row_of[y]
            keep = rows >= 0
            if not bool(keep.any()):
                continue
            if not bool(keep.all()):
                x, y, rows = x[keep.to(x.device)], y[keep], rows[keep]
            yield x.to(fit.device), y, rows

    def summarize(epoch: int, stats: list[dict]) -> dict:
        sums: dict[str, float] = {}
        for s in stats:
            for k, v in s.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / max(len(stats), 1) for k, v in sums.items()}

    return run_epochs(epochs, batches, step, summarize, end=end_of_epoch, verbose=verbose)


# --------------------------------------------------------------------------- per-class math


def _class_mean(
    values: torch.Tensor, rows: torch.Tensor, n_rows: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """``out_k = Σ_{b: rows_b = k} w_b v_b / Σ_{b: rows_b = k} w_b`` (0 where the sum is 0)."""
    w = torch.ones_like(values) if weight is None else weight.to(values.dtype)
    num = values.new_zeros(n_rows).index_add(0, rows, values * w)
    den = values.new_zeros(n_rows).index_add(0, rows, w)
    return num / den.clamp_min(1e-12) * (den > 0)


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``B x C`` masks -> broadcastable against ``B x C x H x W`` (or ``B x C``)."""
    return mask.reshape(mask.shape + (1,) * (like.dim() - 2))
