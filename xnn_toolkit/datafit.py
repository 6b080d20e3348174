"""The door every entry point passes data through: model and data must fit.

One rule, used by :func:`~xnn_toolkit.report.scoring.score_dataset`,
:func:`~xnn_toolkit.bank.extraction`, the heads that run a model and the ``xnn`` command:

- **Preprocessing travels with the data.** A dataset says in its ``image_space`` attribute
  whether its images are ``"raw"`` (float in ``[0, 1]``) or ``"normalized"`` (already
  ``(x - mean) / std`` with the model's :class:`~xnn_toolkit.models.Preprocessing`). Raw
  images are normalised here, with the model's preprocessing; normalised ones pass as they
  are. Data that says nothing (a bare tensor, a ``TensorDataset``) is taken as normalised,
  which is what the toolkit always asked for.
- **Statistics must agree with the claim.** A batch whose values cannot come from the claimed
  space is refused: "raw" values far outside ``[0, 1]`` (0..255 pixels, or already
  normalised), "normalised" values that undo to far outside ``[0, 1]`` (normalised twice),
  or "normalised" values all inside ``[0, 1]`` for a model whose preprocessing maps black
  well below zero (never normalised).
- **Channels and classes fit the model.** A grey dataset for an RGB model is refused unless
  the caller asks for ``grey_to_rgb``; labels must be integers below the model's class count;
  a dataset whose class names differ from the model card's is refused with both lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["IMAGE_SPACES", "RAW_TOLERANCE", "DataFit", "as_labels", "data_fit", "image_space_of"]

IMAGE_SPACES = ("raw", "normalized")

#: How far outside [0, 1] a raw value may lie (resampling overshoot) before it is refused.
RAW_TOLERANCE = 0.1
#: "Never normalised" is only claimed where normalising maps black at least this far below 0.
_NEVER_NORMALISED_DEPTH = 0.5


def image_space_of(data: object) -> str | None:
    """The declared ``image_space`` of a dataset (or of the dataset a DataLoader reads).

    Parameters
    ----------
    data : object
        A dataset, a DataLoader, a tensor or anything else.

    Returns
    -------
    str or None
        ``"raw"``, ``"normalized"`` or ``None`` where the data declares nothing.

    Raises
    ------
    InputError
        The attribute holds something else.
    """
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, torch.Tensor):
        return None
    try:
        space = getattr(data, "image_space", None)
    except Exception:  # noqa: BLE001 - a dataset's __getattr__ may raise anything
        return None
    if space is None:
        return None
    if space not in IMAGE_SPACES:
        raise InputError(
            f"the data's image_space must be 'raw' (images in [0, 1]) or 'normalized' "
            f"(already normalised for the model), got {space!r}; set it on the dataset"
        )
    return str(space)


@dataclass
class DataFit:
    """What a batch must look like for one model, and how to bring it there.

    Built by :func:`data_fit`; :meth:`images` and :meth:`labels` are called on every batch.

    Attributes
    ----------
    mean, std : tuple of float or None
        The model's preprocessing (``None`` when the model came without one).
    space : str or None
        The data's declared image space.
    in_chans : int or None
        Channels the model reads.
    num_classes : int or None
        Outputs of the model.
    grey_to_rgb : bool
        Repeat a grey channel to ``in_chans`` channels.
    arg : str
        How the error messages name the data argument.
    dtype : torch.dtype or None
        Floating dtype of the model's parameters; batches are converted to it.
    """

    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    space: str | None
    in_chans: int | None
    num_classes: int | None
    grey_to_rgb: bool = False
    arg: str = "dataset"
    dtype: torch.dtype | None = None

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.std is not None
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def images(self, x: Any, start: int = 0) -> torch.Tensor:
        """Check one batch and return what the model must see.

        Parameters
        ----------
        x : Tensor
            ``N x C x H x W`` images of the data.
        start : int
            Index of the first image (for the messages).

        Returns
        -------
        Tensor
            Normalised ``N x in_chans x H x W`` images.

        Raises
        ------
        InputError
            Wrong type, dtype, shape or channel count; NaN or infinite values; statistics
            that contradict the declared image space.
        """
        from .models import check_input

        what = f"{self.arg} (images {start}..{start + _len(x) - 1})"
        if (
            isinstance(x, torch.Tensor)
            and x.dim() != 4
            and x.dim() >= 2
            and self.in_chans is None
            and self.mean is None
        ):
            # a model without convolutions (an MLP on vectors): no image rules to apply
            try:
                check_input(x.reshape(x.shape[0], -1, 1, 1))
            except InputError as exc:
                raise InputError(f"{what}: {exc}") from None
            return x if self.dtype is None else x.to(self.dtype)
        try:
            x = check_input(x)
        except InputError as exc:
            raise InputError(f"{what}: {exc}") from None
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)  # float64 data for a float32 model: what the model computes in
        c = int(x.shape[1])
        if self.in_chans is not None and c != self.in_chans:
            if c == 1 and self.grey_to_rgb:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif c == 1:
                raise InputError(
                    f"{what} are grey (1 channel), the model reads {self.in_chans}: pass "
                    "grey_to_rgb=True (CLI: --grey-to-rgb) to repeat the grey channel, or use "
                    f"a model trained on grey images"
                )
            else:
                raise InputError(
                    f"{what} have {c} channels, the model reads {self.in_chans}: use data "
                    "and a model with the same channels"
                )
        if self.mean is None:
            return x
        if len(self.mean) != int(x.shape[1]):
            raise InputError(
                f"{what} have {int(x.shape[1])} channels, the model's preprocessing has "
                f"{len(self.mean)}; use data and a model with the same channels"
            )
        lo, hi = float(x.amin()), float(x.amax())
        mean, std = self._stats(x)
        if self.space == "raw":
            if lo < -RAW_TOLERANCE or hi > 1 + RAW_TOLERANCE:
                hint = (
                    "pixels in 0..255? divide by 255"
                    if hi > 20
                    else "already normalised? set the dataset's image_space = 'normalized'"
                )
                raise InputError(
                    f"{what} declare image_space 'raw' (values in [0, 1]) but hold values in "
                    f"[{lo:.3g}, {hi:.3g}]: {hint}"
                )
            return (x - mean) / std
        # declared normalised, or undeclared (taken as normalised)
        raw = x * std + mean
        rlo, rhi = float(raw.amin()), float(raw.amax())
        claim = "declare image_space 'normalized'" if self.space else "are taken as normalised"
        if rlo < -RAW_TOLERANCE or rhi > 1 + RAW_TOLERANCE:
            raise InputError(
                f"{what} {claim} but undo to values in [{rlo:.3g}, {rhi:.3g}], outside [0, 1] "
                f"for the model's preprocessing (mean {self.mean}, std {self.std}): normalised "
                "twice, pixels in 0..255, or other statistics? Give images in [0, 1] with "
                "image_space = 'raw' and let the toolkit normalise them"
            )
        depth = min(m / s for m, s in zip(self.mean, self.std))
        if depth > _NEVER_NORMALISED_DEPTH and lo >= 0 and hi <= 1 and hi > lo:
            raise InputError(
                f"{what} {claim} but every value lies in [0, 1], which the model's "
                f"preprocessing (mean {self.mean}, std {self.std}) maps to negative values "
                "for dark pixels: these look never normalised. Set the dataset's image_space "
                "= 'raw' (or wrap it: load_dataset(..., preprocessing=lm.preprocessing))"
            )
        return x

    def labels(self, y: Any, start: int = 0) -> None:
        """Refuse labels that are not integers or exceed the model's classes.

        ``-1`` means "no label" and passes.
        """
        if y is None or not isinstance(y, torch.Tensor) or y.numel() == 0:
            return
        if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
            raise InputError(
                f"{self.arg}: labels must be integers (class indices), got dtype {y.dtype}; "
                "convert with y.long() if they are whole numbers"
            )
        if self.num_classes is not None:
            bad = (y >= self.num_classes) | (y < -1)
            if bool(bad.any()):
                i = int(bad.flatten().nonzero()[0])
                raise InputError(
                    f"{self.arg}: image {start + i} has label {int(y.flatten()[i])}, the model "
                    f"has {self.num_classes} classes (0..{self.num_classes - 1}); use data "
                    "labelled for this model"
                )


def _len(x: Any) -> int:
    return int(x.shape[0]) if isinstance(x, torch.Tensor) and x.dim() else 1


def data_fit(
    model: Any,
    data: object,
    *,
    grey_to_rgb: bool = False,
    arg: str = "dataset",
    space: str | None = None,
    labels_are_classes: bool = True,
) -> DataFit:
    """Check at the door that a model and a dataset fit, and return the per-batch rule.

    Parameters
    ----------
    model : nn.Module or LoadedModel
        A :class:`~xnn_toolkit.models.LoadedModel` brings its preprocessing, class count
        and class names; a bare module only its channel and class counts.
    data : Dataset, DataLoader, Tensor or iterable
        Its ``image_space``, ``classes`` and ``num_classes`` attributes are read where present.
    grey_to_rgb : bool
        Allow a grey dataset for a colour model (the channel is repeated).
    arg : str
        Name of the data argument in messages.
    space : str, optional
        Overrides the data's declared image space.
    labels_are_classes : bool
        The caller reads the data's labels as the model's classes (scoring the labelled
        class, fitting heads): then class names and label ranges must agree with the model.
        ``False`` (e.g. scoring the predicted class of photos labelled otherwise) skips
        those two checks.

    Returns
    -------
    DataFit

    Raises
    ------
    InputError
        Raw images for a model without preprocessing, more dataset classes than model
        classes, or class names that differ from the model card's.
    """
    from .models import LoadedModel, _first_conv_channels, _last_linear_out

    if not isinstance(grey_to_rgb, bool):
        raise InputError(f"grey_to_rgb must be True or False, got {grey_to_rgb!r}")
    lm = model if isinstance(model, LoadedModel) else None
    module = lm.model if lm is not None else model
    if space is not None and space not in IMAGE_SPACES:
        raise InputError(f"image_space must be 'raw' or 'normalized', got {space!r}")
    space = space or image_space_of(data)
    pre = lm.preprocessing if lm is not None else None
    if space == "raw" and pre is None:
        raise InputError(
            f"{arg} holds raw images (image_space 'raw') but the model came without its "
            "preprocessing: pass the LoadedModel (load_model(...)) instead of its .model, or "
            "normalise the data yourself (load_dataset(..., preprocessing=...))"
        )
    in_chans = pre.input_size[0] if pre is not None else None
    if isinstance(module, nn.Module):
        in_chans = _first_conv_channels(module) or in_chans
    k = lm.num_classes if lm is not None else None
    if k is None and isinstance(module, nn.Module):
        k = _last_linear_out(module)
    first = _first_image(data)
    if first is not None and in_chans is not None and first.dim() == 3:
        c = int(first.shape[0])
        if c != in_chans and not (c == 1 and grey_to_rgb):
            fix = (
                "pass grey_to_rgb=True (CLI: --grey-to-rgb) to repeat the grey channel, or "
                "use a model trained on grey images"
                if c == 1
                else "use data and a model with the same channels"
            )
            raise InputError(
                f"{arg} has {c}-channel images, the model reads {in_chans} channels: {fix}"
            )
    names = _dataset_classes(data) if labels_are_classes else None
    model_names = list(lm.class_names) if lm is not None and lm.class_names else None
    if names is not None and k is not None and len(names) > k:
        raise InputError(
            f"{arg} has {len(names)} classes, the model has {k}: use data labelled for this "
            f"model (dataset classes: {_show(names)})"
        )
    if names is not None and model_names is not None and list(names) != model_names[: len(names)]:
        raise InputError(
            f"{arg}'s class names differ from the model card's: the data has {_show(names)}, "
            f"the model {_show(model_names)}; use the dataset the model was trained on"
        )
    dtype = None
    if isinstance(module, nn.Module):
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    return DataFit(
        mean=pre.mean if pre is not None else None,
        std=pre.std if pre is not None else None,
        space=space,
        in_chans=in_chans,
        num_classes=k if labels_are_classes else None,
        grey_to_rgb=grey_to_rgb,
        arg=arg,
        dtype=dtype,
    )


def _first_image(data: object) -> torch.Tensor | None:
    """The first image of a map-style dataset or a tensor, else ``None`` (not read)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, torch.Tensor):
        return data[0] if data.dim() == 4 and data.shape[0] else None
    if not isinstance(data, Dataset) or isinstance(data, IterableDataset):
        return None
    try:
        if len(data) == 0:  # type: ignore[arg-type]
            return None
        item = data[0]
    except Exception:  # noqa: BLE001 - the per-batch check reports a broken dataset
        return None
    if isinstance(item, list | tuple) and item:
        item = item[0]
    elif isinstance(item, dict):
        item = item.get("image")
    return item if isinstance(item, torch.Tensor) else None


def _dataset_classes(data: object) -> list[str] | None:
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, torch.Tensor):
        return None
    try:
        names = getattr(data, "classes", None)
    except Exception:  # noqa: BLE001 - a dataset's __getattr__ may raise anything
        return None
    if isinstance(names, Sequence) and not isinstance(names, str) and names:
        if all(isinstance(n, str) for n in names):
            return list(names)
    return None


def _show(names: Sequence[str], n: int = 12) -> str:
    shown = ", ".join(names[:n])
    return f"[{shown}{', ...' if len(names) > n else ''}] ({len(names)})"


def as_labels(labels: Any, arg: str = "labels") -> torch.Tensor:
    """Class labels as an int64 tensor; anything but integers is refused, never truncated.

    Parameters
    ----------
    labels : Tensor, array or sequence
        Integer class indices.
    arg : str
        How the message names the argument.

    Returns
    -------
    Tensor
        int64, same shape.

    Raises
    ------
    InputError
        Floating point, boolean, complex or non-numeric labels.
    """
    if isinstance(labels, torch.Tensor):
        y = labels
    else:
        try:
            y = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(
                f"{arg} must be integer class indices (a Tensor, array or list of int), got "
                f"{type(labels).__name__}: {exc}"
            ) from None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(
            f"{arg} must be integer class indices, got dtype {y.dtype}"
            + (
                f" (e.g. {float(y.flatten()[0]):g}); labels are never rounded: convert "
                "whole numbers with labels.long()"
                if y.is_floating_point() and y.numel()
                else ""
            )
        )
    return y.long()
