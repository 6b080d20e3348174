"""What a model expects of its input: its data configuration's preprocessing, the input check.

:class:`Preprocessing` (resize, crop, mean and std of a model's data configuration: timm's,
torchvision's, a bundled model's card) normalises raw images in [0, 1]; :func:`check_input`
refuses a batch that cannot be the model's input (shape, channels, dtype, NaN, a raw batch for
a model that expects normalised images). Both are also exported from
:mod:`xnn_toolkit.models`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import InputError, SpecError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing", "check_input"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """How images must be prepared for a model.

    Attributes
    ----------
    mean, std : tuple of float
        Per-channel statistics; the model sees ``(x - mean) / std`` of images in ``[0, 1]``.
    input_size : tuple of int
        ``(C, H, W)`` the weights were trained at (convolutional nets accept other sizes).
    interpolation : str
        Resampling used when resizing (``"bilinear"``, ``"bicubic"``, ...).
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.input_size = tuple(int(v) for v in self.input_size)  # type: ignore[assignment]
        if len(self.input_size) != 3:
            raise SpecError(f"input_size must be (C, H, W), got {self.input_size}")
        c = self.input_size[0]
        if len(self.mean) != c or len(self.std) != c:
            raise SpecError(
                f"mean {self.mean} and std {self.std} need one value per input channel "
                f"({c}, from input_size {self.input_size})"
            )
        if any(not s > 0 for s in self.std):
            raise SpecError(f"std must be positive, got {self.std}")

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != len(self.mean):
            raise InputError(
                f"expected an N x {len(self.mean)} x H x W batch, got shape {tuple(x.shape)}"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` channel-wise.

        Parameters
        ----------
        x : Tensor
            ``N x C x H x W`` images with values in ``[0, 1]``.

        Returns
        -------
        Tensor
            ``N x C x H x W``, what the model expects.

        Raises
        ------
        InputError
            Integer images (e.g. uint8 pixels in 0..255), or values far outside ``[0, 1]``
            (pixels in 0..255 stored as float, or images normalised already).
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            dtype = getattr(x, "dtype", type(x).__name__)
            fix = "x.float() / 255" if dtype == torch.uint8 else "torch.as_tensor(x).float()"
            raise InputError(
                f"normalize(x) needs float images in [0, 1], got dtype {dtype}: convert with {fix}"
            )
        mean, std = self._stats(x)
        from .datafit import RAW_TOLERANCE

        if x.numel():
            lo, hi = float(x.amin()), float(x.amax())
            if lo < -RAW_TOLERANCE or hi > 1 + RAW_TOLERANCE:
                hint = "divide by 255" if hi > 20 else "are they normalised already?"
                raise InputError(
                    f"normalize(x) needs images in [0, 1], got values in [{lo:.4g}, {hi:.4g}]: "
                    f"{hint}"
                )
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: ``x * std + mean``.

        Parameters
        ----------
        x : Tensor
            ``N x C x H x W`` normalised images.

        Returns
        -------
        Tensor
            ``N x C x H x W`` images in the ``[0, 1]`` range (not clipped).
        """
        mean, std = self._stats(x)
        return x * std + mean


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def check_input(
    x: object,
    *,
    in_chans: int | None = None,
    min_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Validate a batch of images before it reaches a model.

    Parameters
    ----------
    x : Tensor
        Expected ``N x C x H x W``, floating point, finite, ``N >= 1``.
    in_chans : int, optional
        Channels the model expects.
    min_size : int or (int, int), optional
        Smallest ``H`` and ``W`` the model accepts.

    Returns
    -------
    Tensor
        ``x`` itself (not copied).

    Raises
    ------
    InputError
        With what was wrong and the one-liner that fixes it.
    """
    if not isinstance(x, torch.Tensor):
        fix = "torch.as_tensor(x)" if hasattr(x, "shape") else "torchvision.transforms.ToTensor()"
        raise InputError(
            f"expected a torch.Tensor N x C x H x W, got {type(x).__name__}: convert with {fix}"
        )
    if x.dim() != 4:
        fixes = {
            2: "a single grey image? use x[None, None]",
            3: "a single C x H x W image? add the batch dimension with x.unsqueeze(0)",
            5: "a video or a stack of batches? merge them with x.flatten(0, 1)",
        }
        raise InputError(
            f"expected a 4-D batch N x C x H x W, got a {x.dim()}-D tensor of shape "
            f"{tuple(x.shape)}; " + fixes.get(x.dim(), "reshape it to N x C x H x W")
        )
    if not x.is_floating_point():
        fix = "x.float() / 255" if x.dtype == torch.uint8 else "x.float()"
        raise InputError(
            f"expected floating point images, got dtype {x.dtype}: convert with {fix}, then "
            "normalise with the model's preprocessing (LoadedModel.preprocessing.normalize)"
        )
    if x.shape[0] == 0:
        raise InputError("the batch is empty (N = 0); pass at least one image")
    c = int(x.shape[1])
    if in_chans is not None and c != in_chans:
        if x.shape[-1] == in_chans and c not in (1, 3, in_chans):
            fix = "it looks channels-last (N x H x W x C): use x.permute(0, 3, 1, 2)"
        elif c == 1:
            fix = f"repeat the grey channel with x.expand(-1, {in_chans}, -1, -1)"
        elif in_chans == 1 and c == 3:
            fix = "convert to grey with x.mean(1, keepdim=True)"
        elif x.shape[-1] == in_chans:
            fix = "if it is channels-last (N x H x W x C), use x.permute(0, 3, 1, 2)"
        else:
            fix = f"load the model with in_chans={c} or convert the images"
        raise InputError(
            f"got {c} channel{'s' if c != 1 else ''}, the model expects {in_chans}: {fix}"
        )
    if min_size is not None:
        mh, mw = (min_size, min_size) if isinstance(min_size, int) else tuple(min_size)
        h, w = int(x.shape[2]), int(x.shape[3])
        if h < mh or w < mw:
            raise InputError(
                f"images are {h} x {w}, the model needs at least {mh} x {mw}: resize with "
                f"torch.nn.functional.interpolate(x, size=({max(h, mh)}, {max(w, mw)}), "
                "mode='bilinear')"
            )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).flatten(1).any(1).nonzero().flatten()
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise InputError(
            f"the batch holds {n_nan} NaN and {n_inf} infinite values (images "
            f"{bad[:5].tolist()}{'...' if bad.numel() > 5 else ''}); fix the data loading, or "
            "replace them with torch.nan_to_num(x)"
        )
    return x
