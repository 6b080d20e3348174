"""Load a classifier by spec, with the preprocessing its weights expect; check input batches.

One entry point, :func:`load_model`, in the manner of ``timm.create_model``. A spec is one of

- ``"timm:NAME"`` -- ``timm.create_model``; preprocessing from timm's pretrained config
  (``timm.data.resolve_model_data_config``), which needs no download;
- ``"torchvision:NAME"`` (or ``"tv:NAME"``) -- ``torchvision.models.get_model``; preprocessing
  from the default weights' metadata (their ``transforms()`` object, built without download);
- ``"zoo:ARCH"`` -- a freshly initialised architecture of :mod:`xnn_toolkit.zoo`;
- ``"bundled:NAME"`` -- a trained model shipped with the toolkit (``zoo.load_bundled``);
- a path to a weights file: ``.safetensors`` (or a ``.pt`` / ``.pth`` state dict) with a JSON
  card ``<stem>.json`` next to it naming the architecture, or a whole pickled module when the
  caller passes ``trust_pickle=True``;
- an ``nn.Module`` (preprocessing defaults to ImageNet statistics).

Weights are downloaded only when the caller asks for ``pretrained=True``.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AssetError, SpecError, close_matches
from .preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    _first_conv_channels,
    check_input,
)

__all__ = [
    "load_weights",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "Preprocessing",
    "check_input",
    "load_model",
    "save_model",
]


_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_PREFIXES = {
    "timm": "timm",
    "torchvision": "torchvision",
    "tv": "torchvision",
    "zoo": "zoo",
    "bundled": "bundled",
}


@dataclass
class LoadedModel:
    """A model with what is needed to feed and read it.

    Attributes
    ----------
    model : nn.Module
        In eval mode.
    preprocessing : Preprocessing
    spec : str
        The spec it was loaded from (``"timm:resnet18"``, a path, ``"module:ClassName"``).
    name : str
        Short name (architecture or bundled model name).
    num_classes : int or None
        Number of outputs, when known.
    class_names : list of str or None
        Label of each output, when known (pretrained weights, bundled models, cards).
    card : dict or None
        The model card (bundled models and weight files), else ``None``.
    """

    model: nn.Module
    preprocessing: Preprocessing
    spec: str
    name: str
    num_classes: int | None = None
    class_names: list[str] | None = None
    card: dict | None = None


# --------------------------------------------------------------------------- entry point


def load_model(
    spec: str | os.PathLike | nn.Module,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    device: str | torch.device | None = None,
    preprocessing: Preprocessing | None = None,
    trust_pickle: bool = False,
    **kwargs: Any,
) -> LoadedModel:
    """Load a classifier and its preprocessing from a spec.

    Parameters
    ----------
    spec : str, path or nn.Module
        ``"timm:NAME"``, ``"torchvision:NAME"`` / ``"tv:NAME"``, ``"zoo:ARCH"``,
        ``"bundled:NAME"``, a weights file (``.safetensors``, ``.pt``, ``.pth``) with a JSON
        card ``<stem>.json`` next to it, or a module (see the module docstring).
    pretrained : bool
        Load the library's pretrained weights (timm / torchvision only; may download).
    num_classes : int, optional
        Size of the classifier (a new, randomly initialised head where it differs).
    in_chans : int, optional
        Number of input channels; for torchvision the first convolution is adapted the way
        timm does it (``timm.models.adapt_input_conv``).
    device : str or torch.device, optional
        Move the model there (for a module passed in, it is moved in place).
    preprocessing : Preprocessing, optional
        Overrides what the spec implies.
    trust_pickle : bool
        Allow loading a whole pickled module from a ``.pt`` file. Unpickling runs code from
        the file: only for files you trust.
    **kwargs
        Passed to ``timm.create_model``, ``torchvision.models.get_model`` or
        ``zoo.build_model``.

    Returns
    -------
    LoadedModel
        The model in eval mode, with its preprocessing.

    Raises
    ------
    SpecError
        Unknown spec or architecture (the message lists close names) or bad arguments.
    AssetError
        A weights file or card that is missing, unreadable or does not fit.

    Examples
    --------
    >>> lm = load_model("timm:resnet18", num_classes=10)           # doctest: +SKIP
    >>> lm.preprocessing.mean
    (0.485, 0.456, 0.406)
    """
    for arg, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise SpecError(f"{arg} must be a positive int or None, got {value!r}")
    if device is not None:
        from ._device import resolve_device

        device = resolve_device(device)  # before any weights are read
    loaded = _load(spec, pretrained, num_classes, in_chans, trust_pickle, kwargs)
    if preprocessing is not None:
        if not isinstance(preprocessing, Preprocessing):
            raise SpecError(
                f"preprocessing must be a Preprocessing, got {type(preprocessing).__name__}"
            )
        loaded.preprocessing = replace(preprocessing)
    if device is not None:
        loaded.model.to(device)
    loaded.model.eval()
    return loaded


def _load(spec, pretrained, num_classes, in_chans, trust_pickle, kwargs) -> LoadedModel:
    if isinstance(spec, nn.Module):
        if pretrained or kwargs:
            raise SpecError(
                "pretrained= and extra keyword arguments do not apply to a module passed in; "
                f"got pretrained={pretrained}, {sorted(kwargs)}"
            )
        return _from_module(spec, num_classes, in_chans)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
        return _from_file(Path(spec), pretrained, num_classes, in_chans, trust_pickle, kwargs)
    if not isinstance(spec, str):
        raise SpecError(
            f"a model spec is a string, a path or an nn.Module, got {type(spec).__name__}"
        )
    prefix, sep, name = spec.partition(":")
    if not sep or prefix not in _PREFIXES or not name:
        raise SpecError(_unknown_prefix_message(spec))
    kind = _PREFIXES[prefix]
    if kind == "timm":
        return _from_timm(name, pretrained, num_classes, in_chans, kwargs)
    if kind == "torchvision":
        return _from_torchvision(name, pretrained, num_classes, in_chans, kwargs)
    if pretrained:
        raise SpecError(f"pretrained=True applies to timm and torchvision specs, not {spec!r}")
    if kind == "zoo":
        return _from_zoo(name, num_classes, in_chans, kwargs)
    return _from_bundled(name, num_classes, in_chans, kwargs)


def _looks_like_path(spec: str) -> bool:
    if spec.lower().endswith(_WEIGHT_SUFFIXES):
        return True
    prefix = spec.partition(":")[0]
    return prefix not in _PREFIXES and (os.sep in spec or os.path.exists(spec))


def _unknown_prefix_message(spec: str) -> str:
    hint = ""
    import timm
    import torchvision.models as tvm

    if timm.is_model(spec):
        hint = f" '{spec}' is a timm model: use 'timm:{spec}'"
        if spec in tvm.list_models():
            hint += f" or 'torchvision:{spec}'"
        hint += "."
    elif spec in tvm.list_models():
        hint = f" '{spec}' is a torchvision model: use 'torchvision:{spec}'."
    return (
        f"cannot understand the model spec {spec!r}: expected 'timm:NAME', "
        "'torchvision:NAME', 'zoo:ARCH', 'bundled:NAME', a path to a weights file "
        f"({', '.join(_WEIGHT_SUFFIXES)}) or an nn.Module.{hint}"
    )


def _construct(builder, what: str, pretrained: bool):
    """Call a model constructor, turning its errors into toolkit errors."""
    try:
        return builder()
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise SpecError(f"could not build {what}: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        if not pretrained:
            raise SpecError(f"could not build {what}: {exc}") from exc
        raise AssetError(
            f"could not get the pretrained weights of {what}: {exc}; without network, load "
            "weights from a local file instead (a .safetensors with a JSON card)"
        ) from exc


def _channels_stats(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Per-channel statistics for ``in_chans`` channels from RGB ones.

    One channel gets the mean of the three (a grey image); other counts repeat the RGB
    values cyclically, as ``timm.models.adapt_input_conv`` repeats the filters.
    """
    values = tuple(float(v) for v in values)
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return (sum(values) / len(values),)
    return tuple(values[i % len(values)] for i in range(in_chans))


def _preprocessing_from_timm_config(model: nn.Module, in_chans: int) -> Preprocessing:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    _, h, w = cfg["input_size"]
    return Preprocessing(
        mean=_channels_stats(cfg["mean"], in_chans),
        std=_channels_stats(cfg["std"], in_chans),
        input_size=(in_chans, h, w),
        interpolation=str(cfg.get("interpolation") or "bicubic"),
    )


def _from_timm(name, pretrained, num_classes, in_chans, kwargs) -> LoadedModel:
    import timm
    from timm.models import split_model_name_tag

    arch, _tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise SpecError(f"timm has no model {arch!r}; " + close_matches(arch, timm.list_models()))
    args = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    model = _construct(
        lambda: timm.create_model(name, pretrained=pretrained, **args),
        f"timm model {name!r}",
        pretrained,
    )
    if not pretrained:
        _warn_random(f"timm:{name}")
    chans = in_chans or _first_conv_channels(model) or 3
    prep = _preprocessing_from_timm_config(model, chans)
    k = getattr(model, "num_classes", None)
    names = _timm_class_names(model, k) if pretrained else None
    return LoadedModel(model, prep, f"timm:{name}", arch, k or None, names, None)


class RandomWeightsWarning(UserWarning):
    """A library architecture was built with random weights (no ``pretrained=True``)."""


def _warn_random(spec: str) -> None:
    warnings.warn(
        f"{spec} has randomly initialised weights (pretrained=False): its predictions and "
        "explanations carry no meaning for real data. Pass pretrained=True (downloads, "
        "needs network), load trained weights from a file, or use a bundled model such as "
        "'bundled:efficientnet_lite0'",
        RandomWeightsWarning,
        stacklevel=5,  # the caller of load_model
    )


def _timm_class_names(model: nn.Module, k: int | None) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo, infer_imagenet_subset

        subset = infer_imagenet_subset(model)
        if not subset:
            return None
        info = ImageNetInfo(subset)
        if info.num_classes() != k:
            return None
        return [d.split(",")[0] for d in info.label_descriptions()]
    except Exception:  # noqa: BLE001 - class names are a convenience, never a failure
        return None


def _from_torchvision(name, pretrained, num_classes, in_chans, kwargs) -> LoadedModel:
    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        raise SpecError(
            f"torchvision has no model {name!r}; "
            + close_matches(name, tvm.list_models(module=tvm) or available)
        )
    try:
        weights_enum = tvm.get_model_weights(name)
        default = weights_enum.DEFAULT
    except (ValueError, AttributeError, KeyError):
        default = None
    args = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    weights = "DEFAULT" if pretrained else None
    model = _construct(
        lambda: tvm.get_model(name, weights=weights, **args),
        f"torchvision model {name!r}",
        pretrained,
    )
    if not pretrained:
        _warn_random(f"torchvision:{name}")
    if in_chans is not None and in_chans != _first_conv_channels(model):
        _adapt_first_conv(model, in_chans)
    chans = in_chans or _first_conv_channels(model) or 3
    prep = Preprocessing(
        mean=_channels_stats(IMAGENET_MEAN, chans),
        std=_channels_stats(IMAGENET_STD, chans),
        input_size=(chans, 224, 224),
        interpolation="bilinear",
    )
    names = None
    if default is not None:
        try:
            t = default.transforms()
            crop = t.crop_size[0] if isinstance(t.crop_size, list | tuple) else t.crop_size
            interp = getattr(t.interpolation, "value", t.interpolation)
            prep = Preprocessing(
                mean=_channels_stats(tuple(t.mean), chans),
                std=_channels_stats(tuple(t.std), chans),
                input_size=(chans, int(crop), int(crop)),
                interpolation=str(interp),
            )
        except (AttributeError, TypeError, IndexError):
            pass  # not an image classifier's transform: keep the ImageNet defaults
        if pretrained:
            names = list(default.meta.get("categories") or []) or None
    k = num_classes if num_classes is not None else _last_linear_out(model)
    if names is not None and len(names) != k:
        names = None
    return LoadedModel(model, prep, f"torchvision:{name}", name, k, names, None)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first convolution by one with ``in_chans`` inputs (timm's adaptation)."""
    from timm.models import adapt_input_conv

    found = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if found is None:
        raise SpecError(f"{type(model).__name__} has no Conv2d whose input channels to change")
    name, conv = found
    if conv.groups != 1:
        raise SpecError(f"cannot adapt the grouped first convolution {name!r} to {in_chans} inputs")
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        1,
        conv.bias is not None,
        conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight.detach(), conv.in_channels))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _last_linear_out(model: nn.Module) -> int | None:
    k = getattr(model, "num_classes", None)
    if isinstance(k, int) and k > 0:
        return k
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m.out_features
        elif isinstance(m, nn.Conv2d):
            last = None  # a conv after the last linear: the net does not end in it
    return last


def _zoo():
    # import_module honours a module placed in sys.modules (tests swap in a fake zoo)
    return importlib.import_module("xnn_toolkit.zoo")


def _from_zoo(arch, num_classes, in_chans, kwargs) -> LoadedModel:
    zoo = _zoo()
    args = dict(kwargs)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if in_chans is not None:
        args["in_chans"] = in_chans
    model = zoo.build_model(arch, **args)
    chans = in_chans or _first_conv_channels(model) or 3
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        prep = _preprocessing_from_timm_config(model, chans)
    else:
        prep = _default_preprocessing(chans)
    return LoadedModel(model, prep, f"zoo:{arch}", arch, _last_linear_out(model), None, None)


def _preprocessing_from_card(card: dict, base: Preprocessing, where: str) -> Preprocessing:
    try:
        return Preprocessing(
            mean=tuple(card.get("mean", base.mean)),
            std=tuple(card.get("std", base.std)),
            input_size=tuple(card.get("input_size", base.input_size)),
            interpolation=str(card.get("interpolation", base.interpolation)),
        )
    except (SpecError, TypeError, ValueError) as exc:
        raise AssetError(f"the preprocessing in {where} is invalid: {exc}") from exc


def _from_bundled(name, num_classes, in_chans, kwargs) -> LoadedModel:
    if kwargs:
        raise SpecError(f"bundled models take no extra arguments, got {sorted(kwargs)}")
    model, card = _zoo().load_bundled(name)
    card = dict(card)
    k = card.get("num_classes", _last_linear_out(model))
    for arg, value, have in (
        ("num_classes", num_classes, k),
        ("in_chans", in_chans, _first_conv_channels(model)),
    ):
        if value is not None and have is not None and value != have:
            raise SpecError(
                f"the bundled model {name!r} has {arg}={have}, not {value}; omit {arg} or "
                "load its architecture with 'zoo:ARCH' and train a new head"
            )
    chans = _first_conv_channels(model) or 3
    prep = _preprocessing_from_card(card, _default_preprocessing(chans), f"the card of {name!r}")
    names = card.get("class_names")
    return LoadedModel(
        model, prep, f"bundled:{name}", name, k, list(names) if names else None, card
    )


def _default_preprocessing(chans: int) -> Preprocessing:
    return Preprocessing(
        mean=_channels_stats(IMAGENET_MEAN, chans),
        std=_channels_stats(IMAGENET_STD, chans),
        input_size=(chans, 224, 224),
        interpolation="bilinear",
    )


def _from_module(model: nn.Module, num_classes, in_chans) -> LoadedModel:
    chans = in_chans or _first_conv_channels(model) or 3
    k = num_classes if num_classes is not None else _last_linear_out(model)
    name = type(model).__name__
    names = None
    if isinstance(getattr(model, "pretrained_cfg", None), dict):
        # a timm module knows its own statistics (tf_efficientnet_lite0: mean = std = 0.5)
        prep = _preprocessing_from_timm_config(model, chans)
        names = _timm_class_names(model, k)
    else:
        prep = _default_preprocessing(chans)
    return LoadedModel(model, prep, f"module:{name}", name, k, names)


# --------------------------------------------------------------------------- files


def _card_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AssetError(f"the model card {path} is unreadable: {exc}") from exc
    if not isinstance(card, dict):
        raise AssetError(f"the model card {path} must hold a JSON object")
    return card


def _from_file(path, pretrained, num_classes, in_chans, trust_pickle, kwargs) -> LoadedModel:
    if pretrained:
        raise SpecError("pretrained=True does not apply to a weights file")
    if not path.is_file():
        raise AssetError(f"no weights file {str(path)!r}; check the path")
    card_path = _card_path(path)
    card = _read_card(card_path) if card_path.is_file() else None
    is_safetensors = path.suffix.lower() == ".safetensors"
    if card is None and is_safetensors:
        raise AssetError(
            f"{path} holds only weights; write its card {card_path} with the architecture, "
            'e.g. {"arch": "timm:resnet18", "arch_kwargs": {"num_classes": 10}}, '
            "or save the model with xnn_toolkit.models.save_model"
        )
    if card is None:
        return _from_pickled_module(path, trust_pickle, num_classes, in_chans)
    arch = card.get("arch")
    if isinstance(arch, str) and ":" not in arch and arch in _zoo().arch_names():
        arch = f"zoo:{arch}"  # bundled cards name their zoo architecture bare
    if not isinstance(arch, str) or _looks_like_path(arch) or ":" not in arch:
        raise AssetError(
            f"the card {card_path} needs 'arch': a 'timm:', 'torchvision:', 'zoo:' or "
            f"'bundled:' spec, got {arch!r}"
        )
    raw_args = card.get("arch_kwargs", card.get("kwargs", {})) or {}
    if not isinstance(raw_args, dict):
        raise AssetError(
            f"the card {card_path} needs 'arch_kwargs' as a JSON object, got {raw_args!r}"
        )
    names = card.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names)
    ):
        raise AssetError(
            f"the card {card_path} needs 'class_names' as a list of strings or null, got {names!r}"
        )
    args = dict(raw_args)
    args.update(kwargs)
    for key, value in (("num_classes", num_classes), ("in_chans", in_chans)):
        if value is not None:
            args[key] = value
        elif key in card and key not in args and not arch.startswith("bundled:"):
            args[key] = card[key]
    k_arg = args.pop("num_classes", None)
    c_arg = args.pop("in_chans", None)
    want = card.get("weights_sha256")
    if want is not None:
        from .zoo import _sha256

        have = _sha256(path)
        if not isinstance(want, str) or have != want.lower():
            raise AssetError(
                f"the weights file {path} is damaged or not the one its card {card_path} "
                f"describes: sha256 {have}, the card's weights_sha256 is {want!r}; copy the "
                "file again, or remove weights_sha256 from the card if you changed the "
                "weights on purpose"
            )
    try:
        base = _load(arch, False, k_arg, c_arg, False, args)
    except SpecError as exc:
        raise SpecError(
            f"the card {card_path} names an architecture that cannot be built ({arch!r}): {exc}"
        ) from None
    except (TypeError, ValueError) as exc:
        raise AssetError(
            f"the card {card_path} describes an architecture that cannot be "
            f"built ({arch!r}, {args}): {exc}"
        ) from None
    state = _read_state_dict(path, is_safetensors)
    _load_state(base.model, state, path)
    prep = _preprocessing_from_card(card, base.preprocessing, str(card_path))
    k = card.get("num_classes", base.num_classes)
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise AssetError(f"the card {card_path} needs 'num_classes' as a positive int, got {k!r}")
    return LoadedModel(
        base.model,
        prep,
        str(path),
        str(card.get("name", path.stem)),
        k,
        list(names) if names else base.class_names,
        card,
    )


def _read_state_dict(path: Path, is_safetensors: bool) -> dict[str, torch.Tensor]:
    if is_safetensors:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise AssetError(f"the weights file {path} is corrupt or truncated: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise AssetError(
            f"{path} is not a plain state dict ({type(exc).__name__}: {exc}); save the weights "
            "with safetensors, or pass trust_pickle=True without a card to load a whole module"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AssetError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(loaded: LoadedModel, path: str | os.PathLike) -> LoadedModel:
    """Load a state dict from a file into a loaded model's architecture (in place).

    For ``xnn ... --model timm:resnet50 --weights my.safetensors``: the architecture comes
    from the spec, the trained weights from the file. Every tensor must fit: nothing is
    loaded partially.

    Parameters
    ----------
    loaded : LoadedModel
        From :func:`load_model`.
    path : path
        ``.safetensors``, or ``.pt`` / ``.pth`` holding a plain state dict (read with
        ``weights_only=True``; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
        unwrapped).

    Returns
    -------
    LoadedModel
        ``loaded``, with the file's weights.

    Raises
    ------
    AssetError
        Missing or unreadable file, or tensors that do not fit (the message lists the
        missing, unexpected and wrongly shaped ones).
    """
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"--weights / weights: no file {str(path)!r}; check the path")
    state = _read_state_dict(path, path.suffix.lower() == ".safetensors")
    _load_state(loaded.model, state, path, what=f"the architecture of {loaded.spec!r}")
    if loaded.class_names is None:
        loaded.class_names = _library_class_names(loaded)
    loaded.spec = f"{loaded.spec} + {path.name}"
    return loaded


def _library_class_names(loaded: LoadedModel) -> list[str] | None:
    """The class names a timm / torchvision architecture's pretrained head has, if it fits.

    Weights loaded from a file into ``timm:NAME`` / ``torchvision:NAME`` keep the library's
    head layout, so when the output count matches its pretrained classes (ImageNet-1k for
    most), those names label the outputs.
    """
    kind, _, name = loaded.spec.partition(":")
    k = loaded.num_classes
    if kind == "timm":
        return _timm_class_names(loaded.model, k)
    if kind == "torchvision":
        import torchvision.models as tvm

        try:
            names = list(tvm.get_model_weights(name).DEFAULT.meta.get("categories") or [])
        except (ValueError, AttributeError, KeyError):
            return None
        return names if names and len(names) == k else None
    return None


def _load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    what: str = "the card's architecture",
) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape (file vs model)", wrong),
        ):
            if items:
                more = f" and {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{label}: {', '.join(items[:3])}{more}")
        raise AssetError(
            f"the weights in {path} do not fit {what} ({'; '.join(parts)}); check the "
            "architecture and its num_classes (a card's 'arch' and 'arch_kwargs')"
        )
    model.load_state_dict(state, strict=True)


def _from_pickled_module(path: Path, trust_pickle: bool, num_classes, in_chans) -> LoadedModel:
    if not trust_pickle:
        raise SpecError(
            f"{path} has no card {_card_path(path).name}, so it can only be a pickled module; "
            "unpickling runs code from the file: pass trust_pickle=True only if you trust its "
            "source, or save the weights as .safetensors with a JSON card"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types
        raise AssetError(f"could not unpickle {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        raise AssetError(
            f"{path} holds a {type(obj).__name__}, not an nn.Module; a state dict needs a card "
            f"{_card_path(path).name} naming its architecture"
        )
    loaded = _from_module(obj, num_classes, in_chans)
    loaded.spec = str(path)
    return loaded


def save_model(
    loaded: LoadedModel,
    path: str | os.PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    **card_fields: Any,
) -> Path:
    """Write a model as ``<path>.safetensors`` plus its JSON card, readable by :func:`load_model`.

    Parameters
    ----------
    loaded : LoadedModel
        The model and its preprocessing.
    path : str or PathLike
        Where the weights go; the card is written next to it with the suffix ``.json``.
    arch : str, optional
        Spec that rebuilds the architecture (default: ``loaded.spec`` when it is a
        ``timm:`` / ``torchvision:`` / ``zoo:`` / ``bundled:`` spec).
    arch_kwargs : dict, optional
        Keyword arguments for the architecture (default: ``num_classes`` and ``in_chans``).
    **card_fields
        Anything else to record in the card (data set, seed, accuracy, ...).

    Returns
    -------
    Path
        The weights file.
    """
    from safetensors.torch import save_file

    from ._io import atomic_write, atomic_write_text

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    arch = arch or loaded.spec
    if ":" not in arch or _looks_like_path(arch) or arch.startswith("module:"):
        raise SpecError(
            f"cannot tell how to rebuild {loaded.name}; pass arch='timm:NAME' (or another spec)"
        )
    if arch_kwargs is None:
        arch_kwargs = {"in_chans": loaded.preprocessing.input_size[0]}
        if loaded.num_classes is not None:
            arch_kwargs["num_classes"] = loaded.num_classes
        if arch.startswith("bundled:"):
            arch_kwargs = {}
    p = loaded.preprocessing
    card = {
        "name": loaded.name,
        "arch": arch,
        "arch_kwargs": arch_kwargs,
        "num_classes": loaded.num_classes,
        "class_names": loaded.class_names,
        "mean": list(p.mean),
        "std": list(p.std),
        "input_size": list(p.input_size),
        "interpolation": p.interpolation,
        **card_fields,
    }
    state = {k: v.detach().cpu().contiguous() for k, v in loaded.model.state_dict().items()}
    # tied weights share storage, which safetensors refuses: give each its own copy
    state = {k: v.clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    from .zoo import _sha256

    card["weights_sha256"] = _sha256(path)  # load_model checks it
    text = json.dumps(card, indent=2, default=str)
    atomic_write_text(_card_path(path), text)
    return path


# --------------------------------------------------------------------------- input checks
