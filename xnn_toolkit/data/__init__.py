"""Datasets with ground truth: synthetic part-annotated birds, Fashion-MNIST, CUB-style and
image + mask folders; and :func:`load_dataset`, which resolves a dataset spec."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from ..errors import SpecError
from .fashion_mnist import FashionMNIST, find_fashion_mnist, read_idx
from .folders import CUBFolder, MaskFolder
from .images import SKIMAGE_PHOTOS, ImageFiles, SkimagePhotos, sample_photos
from .normalized import Normalized
from .synthetic import SyntheticParts
from .types import PartAnnotation, PartBatch, collate_annotations

__all__ = [
    "CUBFolder",
    "FashionMNIST",
    "ImageFiles",
    "SKIMAGE_PHOTOS",
    "SkimagePhotos",
    "MaskFolder",
    "Normalized",
    "PartAnnotation",
    "PartBatch",
    "SyntheticParts",
    "collate_annotations",
    "find_fashion_mnist",
    "load_dataset",
    "read_idx",
    "sample_photos",
]

SPECS = (
    "synthetic",
    "fashion-mnist",
    "cub:PATH",
    "masks:IMAGES:MASKS",
    "photos[:NAME,...]",
    "images:PATH",
)


def load_dataset(
    spec: str,
    *,
    split: str = "test",
    n: int | None = None,
    seed: int | None = None,
    size: int | None = None,
    annotations: bool = True,
    preprocessing: object | None = None,
    model: object | None = None,
) -> Dataset:
    """Resolve a dataset spec.

    Parameters
    ----------
    spec : str
        ``"synthetic"`` (the part-annotated birds), ``"fashion-mnist"`` (standard idx files
        or the bundled test set), ``"cub:PATH"`` (a CUB-200-2011 folder) or
        ``"masks:IMAGES:MASKS"`` (image and mask folders matched by file stem),
        ``"photos"`` (scikit-image's bundled photos with their ImageNet class; ``"photos:
        chelsea,coffee"`` picks some) or ``"images:PATH"`` (your image files: one file, a
        folder, a class-folder tree or a glob; :class:`ImageFiles`).
    split : {"train", "test"}
        For the synthetic data the split picks the seed (train 0, test 1).
    n : int, optional
        Number of items (the synthetic data is generated; the others are truncated).
    seed : int, optional
        Overrides the synthetic split's seed.
    size : int, optional
        Image size (synthetic: rendered size, default 64; folders: resized).
    annotations : bool
        Items carry a :class:`PartAnnotation` third element where the data has one.
    model : LoadedModel, optional
        For ``photos`` and ``images:``: resize and crop the way the model's data
        configuration says, and read class folders against its class names.
    preprocessing : Preprocessing, optional
        When given, images are normalised with its ``mean`` / ``std`` (a :class:`Normalized`
        view).

    Returns
    -------
    Dataset
        Items ``(image C x H x W, label)`` or ``(image, label, PartAnnotation)``.
    """
    if split not in ("train", "test"):
        raise SpecError(f"split must be 'train' or 'test', got {split!r}")
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        default_seed = SyntheticParts.TRAIN_SEED if split == "train" else SyntheticParts.TEST_SEED
        ds: Dataset = SyntheticParts(
            n or 1000,
            size=size or 64,
            seed=default_seed if seed is None else seed,
            return_annotations=annotations,
        )
    elif kind in ("fashion-mnist", "fashion_mnist", "fmnist"):
        ds = FashionMNIST(rest or None, split=split)
    elif kind == "cub" and rest:
        ds = CUBFolder(rest, split=split, annotations=annotations, size=size)
    elif kind == "photos":
        names = [v for v in rest.split(",") if v] or None
        ds = SkimagePhotos.for_model(model, names) if model is not None else SkimagePhotos(names)
    elif kind == "images" and rest:
        ds = ImageFiles.for_model(rest, model) if model is not None else ImageFiles(rest)
    elif kind == "masks" and rest.count(":") == 1:
        images, masks = rest.split(":")
        ds = MaskFolder(images, masks, size=size, annotations=annotations)
    else:
        raise SpecError(f"unknown dataset spec {spec!r}; use one of {', '.join(SPECS)}")
    if n is not None and kind != "synthetic" and n < len(ds):
        ds = _Truncated(ds, n)
    if preprocessing is not None:
        ds = Normalized(ds, preprocessing.mean, preprocessing.std)
    return ds


class _Truncated(Subset):
    """The first ``n`` items; attributes (``classes``...) of the full dataset stay reachable."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        super().__init__(dataset, range(n))

    def __getattr__(self, name: str):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
