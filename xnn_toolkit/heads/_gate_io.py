"""Saving and loading :class:`xnn_toolkit.heads.ClassSpecificGates`.

Safetensors for the tensors, JSON for the parameters; every file is checked on load.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._device import model_device
from .._io import checked_load, load_estimator_files, loaded_params, save_estimator_files
from ..errors import AssetError, InputError
from .gate_objective import (
    l1_density,
)

if TYPE_CHECKING:
    from .gates import ClassSpecificGates

__all__: list[str] = []


class _GateIO:
    """Persistence mixed into :class:`~xnn_toolkit.heads.ClassSpecificGates`."""

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` (gates, head, fine-tuned blocks) and ``<path>.json``.

        Both files are written atomically. The frozen backbone is not saved: pass the same
        model to :meth:`load`.
        """
        self._check_fitted(need_network=bool(self.finetune_))
        path = os.fspath(path)
        params = self._saved_params()
        params["layer"] = self.layer_
        params["finetune"] = list(self.finetune_) or None
        params["device"] = None
        params["lr_milestones"] = [float(m) for m in self.lr_milestones]
        meta = {
            "type": "ClassSpecificGates",
            "params": params,
            "layer_": self.layer_,
            "finetune_": self.finetune_,
            "n_classes_": self.n_classes_,
            "n_filters_": self.n_filters_,
            "g_": self.g_,
            "std_accuracy_": self.std_accuracy_,
            "csg_accuracy_": self.csg_accuracy_,
            "model_accuracy_": self.model_accuracy_,
            "head_from_model_": self.head_from_model_,
            "history_": self.history_,
        }
        tensors = {
            "gates": self.gates_.contiguous(),
            "head.weight": self.head_.weight.detach().cpu().contiguous(),
            "head.bias": self.head_.bias.detach().cpu().contiguous(),
        }
        if self.finetune_:
            state = self.network_.state_dict()
            for key, value in state.items():
                if any(key.startswith(m + ".") for m in self.finetune_):
                    tensors["network." + key] = value.detach().cpu().contiguous()
        save_estimator_files(path, tensors, meta)

    @classmethod
    @checked_load("the gates")
    def load(
        cls,
        path: str | os.PathLike,
        model: nn.Module | None = None,
        device: str | torch.device | None = None,
    ) -> ClassSpecificGates:
        """Read gates written by :meth:`save`.

        Parameters
        ----------
        path : path without extension
        model : nn.Module, optional
            The network the gates were fitted on; needed for everything that computes
            features. For the fine-tune recipe a deep copy receives the saved blocks (the
            model itself is not modified).
        device : optional
            Where to put the head (and the fine-tuned copy); default the model's device.

        Returns
        -------
        ClassSpecificGates
        """
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "ClassSpecificGates", "the gates")
        self = loaded_params(cls, meta["params"], path, "the gates")
        c, k = int(meta["n_classes_"]), int(meta["n_filters_"])
        gates = tensors.get("gates")
        if gates is None or tuple(gates.shape) != (c, k):
            raise AssetError(f"{path}.safetensors holds no C x K = {c} x {k} gate matrix")
        if model is not None:
            dev = torch.device(device) if device is not None else model_device(model)
        else:
            dev = torch.device(device or "cpu")
        head = nn.Linear(k, c)
        try:
            head.load_state_dict({"weight": tensors["head.weight"], "bias": tensors["head.bias"]})
        except (KeyError, RuntimeError) as exc:
            raise AssetError(f"{path}.safetensors has no matching head: {exc}") from exc
        network = None
        if model is not None:
            layer = meta["layer_"]
            if layer not in dict(model.named_modules()):
                raise InputError(
                    f"the gates were fitted on layer {layer!r}, which this model lacks; pass "
                    "the model they were fitted on"
                )
            network = model
            if meta["finetune_"]:
                network = copy.deepcopy(model).to(dev).eval()
                state = {
                    key[len("network.") :]: v
                    for key, v in tensors.items()
                    if key.startswith("network.")
                }
                try:
                    missing = network.load_state_dict(state, strict=False)
                except RuntimeError as exc:
                    raise AssetError(
                        f"the saved fine-tuned blocks do not fit this model: {exc}"
                    ) from exc
                if missing.unexpected_keys:
                    raise AssetError(
                        f"the saved fine-tuned blocks do not fit this model: unexpected "
                        f"{missing.unexpected_keys[:5]}"
                    )
                for p in network.parameters():
                    p.requires_grad_(False)
        self.layer_ = meta["layer_"]
        self.finetune_ = list(meta["finetune_"])
        self.n_classes_, self.n_filters_ = c, k
        self.g_ = float(meta["g_"])
        self.device_ = dev
        self.network_ = network
        self.head_ = head.to(dev).eval()
        for p in self.head_.parameters():
            p.requires_grad_(False)
        self.gates_ = gates.float().clone()
        self.std_accuracy_ = meta["std_accuracy_"]
        self.csg_accuracy_ = meta["csg_accuracy_"]
        self.model_accuracy_ = meta["model_accuracy_"]
        self.head_from_model_ = meta["head_from_model_"]
        self.history_ = meta["history_"]
        self.density_ = l1_density(self.gates_)
        self.class_specific_filters_ = [self.class_filters(i) for i in range(c)]
        return self
