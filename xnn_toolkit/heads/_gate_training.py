"""The two training recipes of :class:`xnn_toolkit.heads.ClassSpecificGates`.

:doc:`/methods/gates`.

``frozen``: gates and a new head learned on the pooled activations of the frozen layer;
``finetune``: the blocks named in ``finetune`` of a deep copy of the network trained as
well. Both share one step (the CSG and STD paths' losses and the sparsity penalty), the
learning-rate schedule and the per-epoch history.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from ..errors import InputError
from ..hooks import record
from ..layers import resolve_layer
from ._gate_data import (
    _first_tensor,
)
from ._training import run_epochs
from .gate_objective import (
    _check_label_range,
    l1_density,
    project_gates,
    sparsity_penalty,
)

__all__: list[str] = []


class _GateTraining:
    """Training internals mixed into :class:`~xnn_toolkit.heads.ClassSpecificGates`."""

    def _is_csg_epoch(self, epoch: int) -> bool:
        if epoch < self.warmup:
            return False
        return (epoch - self.warmup) % self.csg_every < self.csg_ratio

    def _lr_factor(self, epoch: int) -> float:
        passed = sum(epoch >= int(round(float(m) * self.epochs)) for m in self.lr_milestones)
        return float(self.lr_gamma) ** passed

    def _finetune_modules(self, model: nn.Module, layer: str, x: torch.Tensor) -> list[str]:
        """Resolve and check the blocks to fine-tune (they must feed the gated layer)."""
        modules = dict(model.named_modules())
        order: list[str] = []  # names in the order their forward calls complete
        handles = [
            m.register_forward_hook(lambda *_a, _n=name: order.append(_n))
            for name, m in modules.items()
            if name
        ]
        try:
            with torch.no_grad():
                model(x[:2].to(model_device(model)))
        finally:
            for h in handles:
                h.remove()
        if layer not in order:
            raise InputError(f"the gated layer {layer!r} did not run in a forward pass")
        t_layer = order.index(layer)

        def feeds(name: str) -> bool:
            contains = layer == name or layer.startswith(name + ".")
            return name in order and (order.index(name) <= t_layer or contains)

        def trainable(name: str) -> bool:
            return any(p.numel() for p in modules[name].parameters())

        if not self.finetune:
            # the gated module itself when it has parameters (a ResNet's "layer4"); else the
            # last module holding a convolution before it, and the modules with parameters
            # between the two (the conv, its BatchNorm, ... before a pooling layer)
            if trainable(layer):
                return [layer]
            before = list(dict.fromkeys(order[:t_layer]))
            convs = [
                i
                for i, n in enumerate(before)
                if any(isinstance(m, nn.Conv2d) for m in modules[n].modules())
            ]
            if not convs:
                raise InputError(
                    f"no convolution runs before the gated layer {layer!r}; pass finetune= "
                    "the blocks to train"
                )
            first = before[convs[-1]]
            rest = [
                n for n in before[convs[-1] + 1 :] if trainable(n) and not n.startswith(first + ".")
            ]
            return [first, *rest]
        names = [resolve_layer(model, s)[0] for s in self.finetune]
        for name in names:
            if not trainable(name):
                raise InputError(f"fine-tune block {name!r} has no parameters to train")
            if not feeds(name):
                raise InputError(
                    f"fine-tune block {name!r} runs after the gated layer {layer!r} (or not at "
                    "all), so it cannot change what the gates see; name blocks up to the gated "
                    "layer"
                )
        return list(dict.fromkeys(names))

    def _make_head(
        self,
        model: nn.Module,
        layer: str,
        first: tuple[torch.Tensor, torch.Tensor],
        k: int,
        c: int,
        device: torch.device,
        gen: torch.Generator,
    ) -> tuple[nn.Linear, bool]:
        head = nn.Linear(k, c).to(device)
        bound = 1.0 / math.sqrt(k)
        with torch.no_grad():
            head.weight.copy_(torch.empty(c, k).uniform_(-bound, bound, generator=gen))
            head.bias.copy_(torch.empty(c).uniform_(-bound, bound, generator=gen))
        if self.head_init == "random":
            return head, False
        src = self._model_classifier(model, layer, first[0], k, c)
        if src is None:
            if self.head_init == "model":
                raise InputError(
                    f"head_init='model' needs the model to end in global-average-pool → "
                    f"linear ({k} → {c}) on layer {layer!r}; it does not (or num_classes "
                    "differs from its outputs); use head_init='auto' or 'random'"
                )
            return head, False
        with torch.no_grad():
            head.weight.copy_(src.weight.to(device))
            head.bias.copy_(src.bias.to(device) if src.bias is not None else 0.0)
        return head, True

    @staticmethod
    def _model_classifier(
        model: nn.Module, layer: str, x: torch.Tensor, k: int, c: int
    ) -> nn.Linear | None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            return None
        lin = linears[-1]
        if lin.in_features != k or lin.out_features != c:
            return None
        with record(model, layer) as rec, torch.no_grad():
            logits = _first_tensor(model(x.to(model_device(model))))
            a = rec.activations[layer]
            ours = F.linear(a.mean((2, 3)), lin.weight, lin.bias)
        if ours.shape != logits.shape:
            return None
        scale = float(logits.abs().max().clamp_min(1.0))
        if not torch.allclose(ours, logits, rtol=1e-4, atol=1e-4 * scale):
            return None
        return lin

    def _step(
        self,
        f: torch.Tensor,
        y: torch.Tensor,
        csg: bool,
        head: nn.Linear,
        gates: nn.Parameter,
        g: float,
        optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer, Any],
    ) -> dict[str, float]:
        """One step on pooled features ``f`` (``B x K``) with labels ``y``
        (:doc:`/methods/gates`)."""
        opt_head, opt_gates, opt_net = optimizers
        logits = head(f)
        ce_std = F.cross_entropy(logits, y)
        out = {"ce_std": float(ce_std.detach()), "ce_csg": float("nan"), "penalty": float("nan")}
        if csg:
            ce_csg = F.cross_entropy(head(f * gates[y]), y)
            pen = sparsity_penalty(gates, g)
            main = ce_std + self.lambda1 * ce_csg if self.objective == "paper" else ce_csg
            loss = main + self.lambda2 * pen
            out.update(ce_csg=float(ce_csg.detach()), penalty=float(pen.detach()))
        else:
            loss = ce_std
        opt_head.zero_grad(set_to_none=True)
        opt_gates.zero_grad(set_to_none=True)
        if opt_net is not None:
            opt_net.zero_grad(set_to_none=True)
        loss.backward()
        opt_head.step()
        if opt_net is not None:
            opt_net.step()
        if csg:
            opt_gates.step()
            with torch.no_grad():
                gates.copy_(project_gates(gates))
        out["loss"] = float(loss.detach())
        out["correct"] = float((logits.detach().argmax(1) == y).sum())
        return out

    def _set_lr(self, epoch: int, optimizers: Sequence[Any]) -> None:
        factor = self._lr_factor(epoch)
        bases = (self.lr, self.lr_gates, self.lr_backbone)
        for opt, base in zip(optimizers, bases):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * factor

    def _row(self, epoch: int, stats: list, gates) -> dict:
        """One history row: mean losses, the gates' density, the STD path's accuracy."""
        n = sum(s["n"] for s in stats)
        mean = {
            key: float(np.mean([s[key] for s in stats])) if stats else float("nan")
            for key in ("loss", "ce_std", "ce_csg", "penalty")
        }
        return {
            "epoch": epoch,
            "path": "csg" if self._is_csg_epoch(epoch) else "std",
            **mean,
            "density": l1_density(gates),
            "std_accuracy": sum(s["correct"] for s in stats) / max(n, 1),
        }

    def _epochs(self, batches, features, head, gates, g, optimizers) -> list:
        """The shared epoch loop (:func:`~xnn_toolkit.heads._training.run_epochs`) over
        ``batches(epoch)`` of ``(inputs, labels)``; ``features`` maps inputs to the pooled
        activations of the gated layer."""

        def step(epoch: int, x, y) -> dict:
            out = self._step(features(x), y, self._is_csg_epoch(epoch), head, gates, g, optimizers)
            return {**out, "n": int(y.shape[0])}

        head.train()
        return run_epochs(
            self.epochs,
            batches,
            step,
            lambda epoch, stats: self._row(epoch, stats, gates),
            start=lambda epoch: self._set_lr(epoch, optimizers),
            verbose=self.verbose,
        )

    def _train_frozen(self, ext, head, gates, g, opt_head, opt_gates, gen, history) -> None:
        feats, y = ext.features, ext.labels
        n = feats.shape[0]

        def batches(epoch: int):
            order = torch.randperm(n, generator=gen).to(feats.device)
            for i in range(0, n, self.batch_size):
                idx = order[i : i + self.batch_size]
                yield feats[idx], y[idx]

        optimizers = (opt_head, opt_gates, None)
        history += self._epochs(batches, lambda f: f, head, gates, g, optimizers)

    def _train_finetune(
        self, network, layer, source, head, gates, g, c, optimizers, device, gen, history
    ) -> None:
        def batches(epoch: int):
            for x, y in source.batches(shuffle=True, generator=gen):
                y = y.to(device)
                _check_label_range(y, c)
                yield x.to(device), y

        with record(network, layer, detach=False, eval_mode=False) as rec:

            def features(x):
                network(x)
                f = rec.activations[layer].float().mean((2, 3))
                rec.clear()
                return f

            history += self._epochs(batches, features, head, gates, g, optimizers)
