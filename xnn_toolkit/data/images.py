"""The user's own photos: one file, a folder, a class-folder tree or a glob, as a dataset.

Images are read with Pillow (JPEG, PNG, WebP, TIFF, BMP), turned upright by their EXIF
orientation, converted to RGB (grey, RGBA on white, CMYK, palette and 16-bit images), then
resized and centre-cropped the way the model's data configuration says (``crop_pct``:
the shorter side is resized to ``size / crop_pct``, then the centre ``size x size`` is cut,
timm's convention). Items are ``(image, label)`` with the image raw (float in ``[0, 1]``,
``image_space = "raw"``): the toolkit normalises it with the model's preprocessing.

A folder whose images sit in sub-folders (torchvision's ``ImageFolder`` layout) gives
labels: the sub-folders sorted by name are classes ``0, 1, ...`` (or, when a sub-folder is
named after a class of ``class_names``, that class's index). Otherwise labels are ``-1``.
"""

from __future__ import annotations

import glob as _glob
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import InputError, close_matches

__all__ = ["IMAGE_SUFFIXES", "ImageFiles", "SKIMAGE_PHOTOS", "SkimagePhotos", "sample_photos"]

#: File name endings read as images.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")

#: scikit-image's bundled photos (no download) and the ImageNet-1k class of each.
SKIMAGE_PHOTOS: dict[str, tuple[int, str]] = {
    "chelsea": (285, "Egyptian cat"),
    "coffee": (967, "espresso"),
    "rocket": (657, "missile"),
}


def _find(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The image files of ``source`` (a file, a folder searched recursively, a glob, a list)."""
    if isinstance(source, list | tuple):
        out: list[Path] = []
        for s in source:
            out += _find(s)
        return out
    text = os.fspath(source)
    if any(ch in text for ch in "*?["):
        hits = sorted(Path(p) for p in _glob.glob(text, recursive=True))
        if not hits:
            raise InputError(f"images: the pattern {text!r} matches no file")
        files = [p for p in hits if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise InputError(
                f"images: the pattern {text!r} matches {len(hits)} paths but no image "
                f"({', '.join(IMAGE_SUFFIXES)})"
            )
        return files
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = sorted(p for p in path.rglob("*") if p.is_file())
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            what = "is empty" if not entries else f"holds {len(entries)} files but no image"
            raise InputError(
                f"images: the folder {text!r} {what}; expected {', '.join(IMAGE_SUFFIXES)} "
                "files (in the folder or in one sub-folder per class)"
            )
        return files
    raise InputError(f"images: {text!r} is neither a file, a folder nor a glob pattern")


def _to_rgb(img):
    """A Pillow image as 8-bit RGB: EXIF orientation applied, alpha on white, 16 bit scaled."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "P", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


class ImageFiles(Dataset):
    """Image files as a dataset of raw ``3 x size x size`` images.

    Parameters
    ----------
    source : path, glob or list of them
        One image file, a folder (searched recursively; one sub-folder per class gives
        labels), a glob pattern (``"photos/*.jpg"``) or a list of these.
    size : int
        Output side in pixels (default 224).
    crop_pct : float
        The shorter side is resized to ``size / crop_pct`` before the centre crop (timm's
        convention; 1.0: no margin cut away).
    interpolation : {"bilinear", "bicubic", "nearest"}
        Resampling filter.
    class_names : list of str, optional
        The model's class names: a sub-folder named after one of them gets its index.
    max_side : int
        Images larger than this are decoded at reduced size first (JPEG draft mode) so a
        huge photo costs no more memory than needed.

    Attributes
    ----------
    files : list of Path
    labels : list of int
        ``-1`` where the layout gives no class.
    classes : list of str or None
        The class-folder names, when the layout has them.
    image_space : str
        ``"raw"``.
    """

    image_space = "raw"

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        size: int = 224,
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
        class_names: Sequence[str] | None = None,
        max_side: int = 4096,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise InputError(f"size must be a positive int, got {size!r}")
        if not 0 < float(crop_pct) <= 1:
            raise InputError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
        if interpolation not in ("bilinear", "bicubic", "nearest"):
            raise InputError(
                f"interpolation must be bilinear, bicubic or nearest, got {interpolation!r}"
            )
        self.files = _find(source)
        self.size = size
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.max_side = int(max_side)
        self.classes, self.labels = self._labels(source, class_names)

    def _labels(self, source, class_names) -> tuple[list[str] | None, list[int]]:
        root = Path(os.fspath(source)) if not isinstance(source, list | tuple) else None
        if root is None or not root.is_dir():
            return None, [-1] * len(self.files)
        folders = sorted(
            {p.parent.relative_to(root).parts[0] for p in self.files if p.parent != root}
        )
        if not folders or any(p.parent == root for p in self.files):
            return None, [-1] * len(self.files)
        names = list(class_names) if class_names is not None else None
        if names is not None and all(f in names for f in folders):
            index = {f: names.index(f) for f in folders}
            classes = names
        else:
            if names is not None:
                odd = [f for f in folders if f not in names]
                raise InputError(
                    f"images: the class folders {odd[:5]} of {str(root)!r} are not classes of "
                    f"the model; {close_matches(odd[0], names)}"
                )
            index = {f: i for i, f in enumerate(folders)}
            classes = folders
        labels = [index[p.relative_to(root).parts[0]] for p in self.files]
        return classes, labels

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        """The ``i``-th file as an 8-bit RGB Pillow image (upright, before resizing)."""
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as img:
                if max(img.size) > self.max_side and img.format == "JPEG":
                    img.draft("RGB", (self.max_side, self.max_side))
                img.load()
                return _to_rgb(img)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise InputError(
                f"images: cannot read {str(path)!r} ({type(exc).__name__}: {exc}); the file is "
                "corrupt, truncated or not an image - remove it or convert it"
            ) from exc
        except Image.DecompressionBombError as exc:
            raise InputError(f"images: {str(path)!r} is too large to decode safely: {exc}") from exc

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return _prepare(self.load(i), self.size, self.crop_pct, self.interpolation), int(
            self.labels[i]
        )

    @classmethod
    def for_model(cls, source, loaded, **kwargs) -> ImageFiles:
        """Images prepared the way a :class:`~xnn_toolkit.models.LoadedModel` expects.

        Size, ``crop_pct`` and interpolation come from the model's data configuration (timm's
        ``pretrained_cfg``, else its preprocessing), class names from the model.
        """
        return cls(source, **{**_model_args(loaded), **kwargs})


def _model_args(loaded) -> dict:
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    prep = loaded.preprocessing
    interp = prep.interpolation
    return {
        "size": int(prep.input_size[-1]),
        "crop_pct": float(cfg.get("crop_pct") or _torchvision_crop_pct(loaded) or 1.0),
        "interpolation": interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        "class_names": loaded.class_names,
    }


def _torchvision_crop_pct(loaded) -> float | None:
    """Crop / resize of a ``torchvision:NAME`` model's weights' transforms (224 / 256)."""
    kind, _, name = str(loaded.spec).partition(":")
    if kind != "torchvision":
        return None
    import torchvision.models as tvm

    try:
        t = tvm.get_model_weights(name.split(" + ")[0]).DEFAULT.transforms()
        crop = t.crop_size[0] if isinstance(t.crop_size, list | tuple) else t.crop_size
        resize = t.resize_size[0] if isinstance(t.resize_size, list | tuple) else t.resize_size
        return min(1.0, float(crop) / float(resize))
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        return None  # no classification transform known: the whole image, resized


def _prepare(img, size: int, crop_pct: float, interpolation: str) -> torch.Tensor:
    """Resize the shorter side to ``size / crop_pct``, cut the centre ``size x size``.

    Returns a ``3 x size x size`` float tensor in ``[0, 1]``.
    """
    from PIL import Image

    filters = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
        "nearest": Image.Resampling.NEAREST,
    }
    w, h = img.size
    short = math.floor(size / crop_pct)
    scale = short / min(w, h)
    nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
    if min(w // nw, h // nh) >= 4:  # huge: shrink in a cheap integer step first
        img = img.reduce(min(w // nw, h // nh) // 2)
    img = img.resize((nw, nh), filters[interpolation])
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    return x.clamp_(0, 1)


class SkimagePhotos(Dataset):
    """scikit-image's bundled photos (no download), labelled with their ImageNet-1k class.

    Parameters
    ----------
    names : list of str, optional
        Keys of :data:`SKIMAGE_PHOTOS` (default: all, in that order).
    size, crop_pct, interpolation
        As for :class:`ImageFiles`.

    Attributes
    ----------
    classes : list of str
        The 1 000 ImageNet-1k class names (labels index them).
    image_space : str
        ``"raw"``.
    """

    image_space = "raw"

    def __init__(
        self,
        names: Sequence[str] | None = None,
        *,
        size: int = 224,
        crop_pct: float = 1.0,
        interpolation: str = "bilinear",
        class_names: Sequence[str] | None = None,
    ) -> None:
        from ..zoo import imagenet_class_names

        self.names = list(names or SKIMAGE_PHOTOS)
        for n in self.names:
            if n not in SKIMAGE_PHOTOS:
                raise InputError(f"no bundled photo {n!r}; " + close_matches(n, SKIMAGE_PHOTOS))
        self.size, self.crop_pct, self.interpolation = size, float(crop_pct), interpolation
        self.classes = imagenet_class_names()
        self.labels = [SKIMAGE_PHOTOS[n][0] for n in self.names]
        del class_names  # the labels are ImageNet's whatever the model says

    def __len__(self) -> int:
        return len(self.names)

    def load(self, i: int):
        """The ``i``-th photo as an RGB Pillow image."""
        from PIL import Image
        from skimage import data

        return Image.fromarray(getattr(data, self.names[i])()).convert("RGB")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = _prepare(self.load(i), self.size, self.crop_pct, self.interpolation)
        return x, self.labels[i]

    @classmethod
    def for_model(cls, loaded, names: Sequence[str] | None = None) -> SkimagePhotos:
        """The photos prepared the way a :class:`~xnn_toolkit.models.LoadedModel` expects."""
        return cls(names, **_model_args(loaded))


def sample_photos(folder: str | os.PathLike, names: Sequence[str] | None = None) -> list[Path]:
    """Write scikit-image's bundled photos as JPEG files into ``folder`` (no download).

    Parameters
    ----------
    folder : path
        Created if needed.
    names : list of str, optional
        Keys of :data:`SKIMAGE_PHOTOS` (default: all).

    Returns
    -------
    list of Path
        The files written, ``<folder>/<name>.jpg``.
    """
    from PIL import Image
    from skimage import data

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names or list(SKIMAGE_PHOTOS):
        if name not in SKIMAGE_PHOTOS:
            raise InputError(f"no bundled photo {name!r}; " + close_matches(name, SKIMAGE_PHOTOS))
        path = out / f"{name}.jpg"
        tmp = path.with_suffix(".jpg.part")
        Image.fromarray(getattr(data, name)()).save(tmp, format="JPEG", quality=95)
        os.replace(tmp, path)
        paths.append(path)
    return paths
