"""Fashion-MNIST from the standard idx files.

Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017; MIT licence, (c) Zalando SE) has 60 000 training
and 10 000 test images of 28 x 28 grey-scale clothing articles in 10 classes. The files are
the four idx files of the original distribution, gzipped or not::

    train-images-idx3-ubyte[.gz]   train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]    t10k-labels-idx1-ubyte[.gz]

:func:`find_fashion_mnist` looks for them, in this order, in a folder the caller gives (or its
torchvision-style ``<root>/FashionMNIST/raw``), in ``/usr/share/datasets/fashion-mnist`` (Debian
package ``dataset-fashion-mnist``) and in the bundled copy of the test set
(``assets/fashion_mnist``, test split only).

idx format: a big-endian header ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian
uint32 sizes and the row-major data; images are ``0x08`` (unsigned byte) with 3 dimensions
(magic 2051), labels unsigned bytes with 1 dimension (magic 2049).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AssetError, InputError

__all__ = [
    "FashionMNIST",
    "find_fashion_mnist",
    "read_idx",
    "CLASSES",
    "MEAN",
    "STD",
    "SYSTEM_DIR",
    "BUNDLED_DIR",
]

#: Class names in label order (from the Fashion-MNIST README).
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Pixel mean and standard deviation of the 60 000 training images, scaled to [0, 1].
MEAN = (0.2860,)
STD = (0.3530,)

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The bundled copy of the test set (10 000 images) in the source tree
#: (``$XNN_TOOLKIT_ASSETS/fashion_mnist`` when that variable is set, as for the models).
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "assets" / "fashion_mnist"

_PREFIX = {"train": "train", "test": "t10k"}
_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":  # gzip magic, whatever the file is called
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise AssetError(f"idx file {path} does not exist") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise AssetError(
            f"idx file {path} is corrupt or truncated ({exc}); replace it with a fresh copy"
        ) from exc


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read one idx file (gzipped or not) into an array.

    Parameters
    ----------
    path : path
        The file.
    ndim : int, optional
        Expected number of dimensions (3 for images, 1 for labels); checked when given.

    Returns
    -------
    numpy.ndarray
        With the file's shape and its native-endian dtype (``uint8`` for Fashion-MNIST).

    Raises
    ------
    AssetError
        Missing file, bad magic number, wrong number of dimensions, or a data section whose
        length does not match the header (truncated or padded file).
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise AssetError(
            f"{path} is not an idx file: magic {raw[:4].hex() or 'missing'}; expected "
            "00 00 <type> <ndim> (e.g. 00000803 for images, 00000801 for labels)"
        )
    dtype, nd = _DTYPES[raw[2]], raw[3]
    if ndim is not None and nd != ndim:
        raise AssetError(f"{path} has {nd} dimensions, expected {ndim} (magic {raw[:4].hex()})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise AssetError(f"{path} is truncated inside its header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(nd))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise AssetError(
            f"{path} is {what}: {len(raw)} bytes, expected {expected} for shape {shape}; "
            "replace it with a fresh copy"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _split_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The ``(images, labels)`` files of ``split`` in ``folder``, or None."""
    found = []
    for kind, nd in (("images", 3), ("labels", 1)):
        stem = f"{_PREFIX[split]}-{kind}-idx{nd}-ubyte"
        hit = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found[0], found[1]


def _bundled_dir() -> Path:
    env = os.environ.get("XNN_TOOLKIT_ASSETS")
    return Path(env) / "fashion_mnist" if env else BUNDLED_DIR


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        root = Path(root)
        return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist"]
    return [SYSTEM_DIR, _bundled_dir()]


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str | None = None) -> Path:
    """Find the folder holding the Fashion-MNIST idx files.

    Parameters
    ----------
    root : path, optional
        A folder with the idx files, or a torchvision-style root (``<root>/FashionMNIST/raw``).
        When given, only this root is searched. When omitted, ``/usr/share/datasets/
        fashion-mnist`` and then the bundled test set are searched.
    split : {"train", "test"}, optional
        Require the files of this split; by default any folder with a complete split will do.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    AssetError
        Nothing found; the message lists the places searched and where to put the files.
    """
    if split is not None and split not in _PREFIX:
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    splits = [split] if split else list(_PREFIX)
    searched = _candidates(root)
    for folder in searched:
        if any(_split_files(folder, s) for s in splits):
            return folder
    where = ", ".join(str(p) for p in searched)
    need = (
        f"{_PREFIX[split]}-images-idx3-ubyte.gz and {_PREFIX[split]}-labels-idx1-ubyte.gz"
        if split
        else "the idx files (train-* and/or t10k-*, .gz or not)"
    )
    extra = (
        " The bundled copy has only the test split."
        if split == "train" and root is None and _split_files(_bundled_dir(), "test")
        else ""
    )
    raise AssetError(
        f"Fashion-MNIST {split or ''} files not found (searched {where}).{extra} Put {need} "
        f"in one folder and pass it as root=, use a torchvision root (<root>/FashionMNIST/raw), "
        f"or install the Debian package dataset-fashion-mnist ({SYSTEM_DIR})."
    )


class FashionMNIST(Dataset):
    """Fashion-MNIST as a map-style dataset of ``(image, label)`` pairs.

    Parameters
    ----------
    root : path, optional
        Where the idx files are (see :func:`find_fashion_mnist`); searched when omitted.
    split : {"train", "test"}
        The 60 000 training or the 10 000 test images.
    transform : callable, optional
        Applied to each ``1 x 28 x 28`` float image tensor.

    Attributes
    ----------
    classes : tuple of str
        The 10 class names, in label order.
    data : Tensor
        ``N x 28 x 28`` uint8, all images.
    targets : Tensor
        ``N`` int64, all labels in ``0..9``.
    mean, std : tuple of float
        Training-set pixel statistics (one channel), for normalisation.
    root : pathlib.Path
        The folder the files were read from.
    split : str

    Raises
    ------
    AssetError
        Files not found (e.g. ``split="train"`` with only the bundled test set), corrupt,
        truncated, or with images and labels that do not match.
    """

    classes = CLASSES
    #: images are float in [0, 1], not normalised (see :mod:`xnn_toolkit.datafit`)
    image_space = "raw"
    mean = MEAN
    std = STD

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if split not in _PREFIX:
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        self.root = find_fashion_mnist(root, split)
        self.split = split
        self.transform = transform
        img_path, lab_path = _split_files(self.root, split)
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lab_path, ndim=1)
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
            raise AssetError(
                f"{img_path} holds {images.dtype} images of shape {images.shape[1:]}, "
                "expected uint8 28 x 28"
            )
        if labels.dtype != np.uint8 or len(labels) != len(images):
            raise AssetError(
                f"{lab_path} has {len(labels)} {labels.dtype} labels for {len(images)} images "
                f"in {img_path}; expected one uint8 label per image"
            )
        if len(labels) and int(labels.max()) >= len(CLASSES):
            raise AssetError(f"{lab_path} has label {int(labels.max())}, expected 0..9")
        self.data = torch.from_numpy(images.copy())
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Image ``1 x 28 x 28`` float32 in [0, 1] (after ``transform``) and its label."""
        image = self.data[index].unsqueeze(0).float().div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root={str(self.root)!r})"
