"""Information-dropout masks on a frozen network (:doc:`/methods/infodrop`, Achille and Soatto
2018).

Post hoc, the frozen network's layer outputs ``f(x)`` are multiplied by log-normal noise,
``z = ε ⊙ f(x)``, ``ε = exp(α·n)``, ``n ~ N(0, 1)`` (reparametrised: one sample per unit and
step while fitting; ``ε = 1`` at evaluation), with ``α = α_min + α_max·sigmoid(a)``,
``α_min = 0.001``, ``α_max = 0.7`` (variance of ``log ε`` at most about 0.5, Achille and
Soatto 2018 §7).
The noise scales ``α`` are learned so that the network still classifies (cross-entropy of
the noisy logits) while as little information as possible passes (the KL term):

``L = Σ_k mean_{b ∈ B_k} [ CE(noisy logits_b, y_b) + β Σ_i mean_units KL_i,b ]``

summed over the classes ``k`` present in the batch (each class's images averaged, as in
:mod:`xnn_toolkit.heads.paths`). ``β`` weighs the KL *per unit*; multiply it by a layer's
unit count to compare with a loss that sums the KL over units (the seed's form).

Two parametrisations of ``α``:

- ``mode="class"``: per class and layer one ``α`` per channel (``K x C_i``, broadcast over
  positions) -- information-dropout *masks* of a class, comparable with class paths;
- ``mode="image"``: per-image amortised ``α``-maps, ``α = α_min + α_max·sigmoid(W f(x)/s +
  b)`` with a 1 x 1 convolution (a linear map for ``N x D`` layers) on the activation,
  ``s`` the layer's RMS.

KL divergences per unit (Achille and Soatto 2018, propositions 2 and 3):

- ReLU layers, log-uniform prior ``q(z) = q₀δ₀(z) + c/z``: ``KL = −log α + const`` where
  ``f(x) ≠ 0`` and a constant where ``f(x) = 0``. We report the shifted form
  ``−log(α / (α_max + α_min)) ≥ 0`` (0 at the largest noise) and 0 for zero units.
- Positive layers (softplus, ...), log-normal prior ``logN(μ, σ²)`` per channel:
  ``KL = [α² + (log f(x) − μ)²] / (2σ²) + log(σ/α) − ½`` (the seed prints ``μ²`` where
  ``(log f(x) − μ)²`` is meant). ``μ, σ`` are the mean and standard deviation of
  ``log f(x)`` per channel over the data, measured once before fitting.

Information heatmaps ``Σ_c KL_{c,h,w}`` minus their minimum, the per-layer information budget
``Σ KL`` and the Gaussian total correlation ``TC = −½ log det(Σ₀⁻¹Σ)`` of log-activations
(``Σ`` their covariance, ``Σ₀`` its diagonal; computed by
:func:`xnn_toolkit.metrics.information.gaussian_total_correlation`) complete the analysis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .._device import model_device
from .._io import checked_load, load_estimator_files, loaded_params, save_estimator_files
from ..datafit import as_labels
from ..errors import AssetError, InputError, NotFittedError
from ..hooks import intervene
from ._base import Head, keeps_global_rng
from ._training import (
    _batches,
    _class_mean,
    _expand,
    _RowOptimizer,
    check_counts,
    check_label_range,
    epoch_loop,
    prepare,
)

__all__ = [
    "ALPHA_MAX",
    "ALPHA_MIN",
    "InformationDropout",
    "alpha_from_logit",
    "information_budget",
    "information_heatmap",
    "kl_log_normal",
    "kl_log_uniform",
    "log_normal_noise",
]

ALPHA_MAX = 0.7
ALPHA_MIN = 0.001
PRIORS = ("auto", "log_uniform", "log_normal")
MODES = ("class", "image")


# --------------------------------------------------------------------------- formulas


def alpha_from_logit(
    logit: torch.Tensor, alpha_max: float = ALPHA_MAX, alpha_min: float = ALPHA_MIN
) -> torch.Tensor:
    """``α = α_min + α_max · sigmoid(a)``, in ``(α_min, α_min + α_max)``.

    See :doc:`/methods/infodrop`.
    """
    return alpha_min + alpha_max * torch.sigmoid(logit)


def log_normal_noise(
    activation: torch.Tensor, alpha: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One reparametrised sample ``z = exp(α·n) ⊙ f(x)``, ``n ~ N(0, 1)`` per unit.

    Parameters
    ----------
    activation : Tensor
        ``f(x)``, any shape.
    alpha : Tensor
        Broadcastable to ``activation``.
    generator : torch.Generator, optional
        On the activation's device.

    Returns
    -------
    Tensor
        Same shape as ``activation``; differentiable in ``alpha`` (and ``activation``).
    """
    n = torch.randn(
        activation.shape, generator=generator, device=activation.device, dtype=activation.dtype
    )
    return activation * torch.exp(alpha * n)


def kl_log_uniform(
    alpha: torch.Tensor,
    activation: torch.Tensor,
    alpha_max: float = ALPHA_MAX,
    alpha_min: float = ALPHA_MIN,
    shifted: bool = True,
) -> torch.Tensor:
    """KL of a ReLU unit under the log-uniform prior (Achille and Soatto 2018, proposition 2).

    ``KL = −log(α / (α_max + α_min))`` (``shifted``, ≥ 0) or ``−log α`` where
    ``f(x) ≠ 0``; 0 where ``f(x) = 0`` (there the KL is the constant ``−log q₀``).

    Parameters
    ----------
    alpha : Tensor
        Broadcastable to ``activation``.
    activation : Tensor
        ``f(x) ≥ 0``.

    Returns
    -------
    Tensor
        The shape of ``activation`` broadcast with ``alpha``.

    Raises
    ------
    InputError
        Negative activations (the prior has no mass there).
    """
    if bool((activation < 0).any()):
        raise InputError(
            "the log-uniform prior (ReLU layers) needs activations >= 0, got a minimum of "
            f"{float(activation.min()):.4g}; place the masks after the ReLU, or use "
            "prior='log_normal' for strictly positive (softplus) layers"
        )
    kl = -torch.log(alpha / (alpha_max + alpha_min)) if shifted else -torch.log(alpha)
    kl = kl.expand(torch.broadcast_shapes(kl.shape, activation.shape))
    return torch.where(activation != 0, kl, torch.zeros_like(kl))


def kl_log_normal(
    alpha: torch.Tensor,
    activation: torch.Tensor,
    mu: torch.Tensor | float,
    sigma: torch.Tensor | float,
) -> torch.Tensor:
    """KL of a positive unit under a log-normal prior (Achille and Soatto 2018, proposition 3,
    corrected).

    ``KL(N(log f, α²) ‖ N(μ, σ²)) = [α² + (log f(x) − μ)²] / (2σ²) + log(σ/α) − ½``.

    Parameters
    ----------
    alpha : Tensor
        Broadcastable to ``activation``.
    activation : Tensor
        ``f(x) > 0``.
    mu, sigma : Tensor or float
        Prior parameters, broadcastable (e.g. ``1 x C x 1 x 1`` per channel).

    Returns
    -------
    Tensor

    Raises
    ------
    InputError
        Non-positive activations (``log f`` undefined).
    """
    if bool((activation <= 0).any()):
        raise InputError(
            "the log-normal prior needs strictly positive activations (softplus-like "
            f"layers), got a minimum of {float(activation.min()):.4g}; use "
            "prior='log_uniform' for ReLU layers"
        )
    mu = torch.as_tensor(mu, dtype=activation.dtype, device=activation.device)
    sigma = torch.as_tensor(sigma, dtype=activation.dtype, device=activation.device)
    return (
        (alpha**2 + (torch.log(activation) - mu) ** 2) / (2 * sigma**2)
        + torch.log(sigma / alpha)
        - 0.5
    )


def information_heatmap(kl: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``Σ_c KL_{c,h,w}`` minus its minimum over positions, per image (Achille and Soatto 2018, Fig.
    2).

    Parameters
    ----------
    kl : Tensor
        ``B x C x H x W`` KL per unit.
    size : (int, int), optional
        Upsample (bilinear) to this size before subtracting the minimum.

    Returns
    -------
    Tensor
        ``B x H x W``, ≥ 0 with minimum 0.
    """
    if kl.dim() != 4:
        raise InputError(f"kl must be B x C x H x W, got shape {tuple(kl.shape)}")
    m = kl.sum(1)
    if size is not None and tuple(size) != tuple(m.shape[-2:]):
        m = F.interpolate(m[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return m - m.flatten(1).min(1).values[:, None, None]


def information_budget(kl: torch.Tensor) -> torch.Tensor:
    """``Σ KL`` over every unit of a layer, per image (nats). ``B x ...`` -> ``B``."""
    return kl.flatten(1).sum(1)


# --------------------------------------------------------------------------- estimator


@dataclass
class _LayerStats:
    """Running statistics of one layer's activations over the survey pass (float64)."""

    sq_sum: float = 0.0
    count: int = 0
    minimum: float = math.inf
    log_sum: torch.Tensor | None = None  # per channel, while every value seen is > 0
    log_sq_sum: torch.Tensor | None = None
    log_count: int = 0

    def update(self, f: torch.Tensor) -> None:
        f = f.double()
        self.sq_sum += float(f.pow(2).sum())
        self.count += f.numel()
        self.minimum = min(self.minimum, float(f.min()))
        if self.minimum > 0:  # still a candidate for the log-normal prior
            lf = f.log().transpose(0, 1).reshape(f.shape[1], -1)
            s1, s2 = lf.sum(1), lf.pow(2).sum(1)
            self.log_sum = s1 if self.log_sum is None else self.log_sum + s1
            self.log_sq_sum = s2 if self.log_sq_sum is None else self.log_sq_sum + s2
            self.log_count += lf.shape[1]


class _DropRun:
    """State shared by the forward edits of one :func:`intervene` block."""

    def __init__(self, owner: InformationDropout, generator: torch.Generator | None) -> None:
        self.owner = owner
        self.noisy = False
        self.rows: torch.Tensor | None = None
        self.logits: dict[str, torch.Tensor] = {}
        self.heads: dict[str, nn.Module] = {}
        self.generator = generator
        self.f: dict[str, torch.Tensor] = {}
        self.alpha: dict[str, torch.Tensor] = {}
        self.check: dict[str, str] = {}

    def edit(self, name: str, out: torch.Tensor) -> torch.Tensor:
        kind = self.check.get(name)
        if kind == "log_uniform" and bool((out < 0).any()):
            raise InputError(
                f"layer {name!r} has negative activations (minimum {float(out.min()):.4g}); "
                "the log-uniform prior needs f(x) >= 0: mask after the ReLU instead"
            )
        if kind == "log_normal" and bool((out <= 0).any()):
            raise InputError(
                f"layer {name!r} has activations <= 0 (minimum {float(out.min()):.4g}); the "
                "log-normal prior needs f(x) > 0: use prior='log_uniform' for ReLU layers"
            )
        self.f[name] = out
        if not self.logits and not self.heads:
            return out
        alpha = self.owner._alpha(name, out, self.rows, self.logits, self.heads)
        self.alpha[name] = alpha
        if not self.noisy:
            return out
        return log_normal_noise(out, alpha, self.generator)


class InformationDropout(Head):
    """Information-dropout noise masks of a frozen network (:doc:`/methods/infodrop`, Achille and
    Soatto 2018).

    Parameters
    ----------
    layers : "auto" or sequence of layer specs
        Where to inject noise (same placement as :class:`~xnn_toolkit.heads.ClassPaths`).
        ``N x C x H x W`` and ``N x D`` outputs are supported.
    prior : {"auto", "log_uniform", "log_normal"}
        ``log_uniform`` for ReLU layers (``f ≥ 0``), ``log_normal`` for strictly positive
        ones; ``auto`` picks per layer from the data (any zero: log-uniform; all positive:
        log-normal). Negative activations are an error.
    mode : {"class", "image"}
        Per-class channel ``α`` (``K x C_i``) or per-image amortised ``α``-maps.
    beta : float
        Weight of the per-unit KL.
    alpha_max, alpha_min : float
        ``α = α_min + α_max · sigmoid(a)`` (seed: 0.7 and 0.001).
    init_alpha : float
        Initial ``α`` of every unit.
    shifted : bool
        Report the log-uniform KL as ``−log(α/(α_max + α_min))`` (≥ 0) instead of ``−log α``
        (the two differ by a constant and have the same gradients).
    lr, epochs, batch_size : training schedule (Adam).
    classes, min_images : as in :class:`~xnn_toolkit.heads.ClassPaths` (class mode).
    random_state : int
        Seed of the batch order and of the noise.
    device : str or torch.device, optional
        Where the head computes; ``None``: where its input is (the model's device). The
        model is never moved, so a device other than the model's is refused.
    verbose : bool
        Print one line per epoch (the mean of each loss term), as the gates do.

    Attributes
    ----------
    layers_ : list of str
    priors_ : dict of str to str
        The prior of each layer.
    prior_mu_, prior_sigma_ : dict of str to Tensor
        ``C_i`` log-normal prior parameters (log-normal layers only).
    scales_ : dict of str to float
        RMS of each layer's activation (input scaling of the ``α`` heads).
    classes_ : Tensor
        ``K`` classes with ``α`` rows (class mode).
    logits_ : dict of str to Tensor
        ``K x C_i`` ``α`` logits (class mode).
    alphas_ : dict of str to Tensor
        ``K x C_i`` ``α`` (class mode).
    heads_ : dict of str to nn.Module
        The 1 x 1-conv / linear ``α`` heads (image mode).
    n_outputs_ : int
    history_ : list of dict
    """

    def __init__(
        self,
        layers: str | Sequence[object] = "auto",
        prior: str = "auto",
        mode: str = "class",
        beta: float = 0.1,
        alpha_max: float = ALPHA_MAX,
        alpha_min: float = ALPHA_MIN,
        init_alpha: float = 0.1,
        shifted: bool = True,
        lr: float = 0.05,
        epochs: int = 10,
        batch_size: int = 32,
        classes: Sequence[int] | None = None,
        min_images: int = 10,
        random_state: int = 0,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ) -> None:
        self.layers = layers
        self.prior = prior
        self.mode = mode
        self.beta = beta
        self.alpha_max = alpha_max
        self.alpha_min = alpha_min
        self.init_alpha = init_alpha
        self.shifted = shifted
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.classes = classes
        self.min_images = min_images
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    # ---------------------------------------------------------------- validation
    def _check_params(self) -> None:
        if self.prior not in PRIORS:
            raise InputError(f"prior must be one of {PRIORS}, got {self.prior!r}")
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.beta >= 0:
            raise InputError(f"beta must be >= 0, got {self.beta}")
        if not (self.alpha_max > 0 and self.alpha_min > 0):
            raise InputError("alpha_max and alpha_min must be > 0")
        if not self.alpha_min < self.init_alpha < self.alpha_min + self.alpha_max:
            raise InputError(
                f"init_alpha must lie in (alpha_min, alpha_min + alpha_max) = "
                f"({self.alpha_min}, {self.alpha_min + self.alpha_max}), got {self.init_alpha}"
            )
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise InputError(f"epochs must be an int >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if isinstance(self.layers, str) and self.layers != "auto":
            raise InputError(f"layers must be 'auto' or a list of layer names, got {self.layers!r}")

    def _init_logit(self) -> float:
        p = (self.init_alpha - self.alpha_min) / self.alpha_max
        return math.log(p / (1 - p))

    def _alpha(self, name, f, rows, logits, heads) -> torch.Tensor:
        if self.mode == "class":
            a = logits[name][rows]
            return alpha_from_logit(_expand(a, f), self.alpha_max, self.alpha_min)
        return alpha_from_logit(heads[name](f / self.scales_[name]), self.alpha_max, self.alpha_min)

    def _kl(self, name: str, f: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if self.priors_[name] == "log_uniform":
            return kl_log_uniform(alpha, f, self.alpha_max, self.alpha_min, self.shifted)
        mu = _expand(self.prior_mu_[name].to(f.device)[None], f)
        sigma = _expand(self.prior_sigma_[name].to(f.device)[None], f)
        return kl_log_normal(alpha, f, mu, sigma)

    # ---------------------------------------------------------------- fitting
    def _survey(self, model, data, names, dev, n_out, row_of, door):
        """One no-grad pass: priors, log-normal parameters, activation scales, label counts."""
        gen = torch.Generator().manual_seed(self.random_state + 1)
        stats = {n: _LayerStats() for n in names}
        counts = torch.zeros(int((row_of >= 0).sum()), dtype=torch.long)
        run = _DropRun(self, None)
        with intervene(model, {n: partial(run.edit, n) for n in names}, freeze=True):
            with torch.no_grad():
                for x, y in _batches(data, self.batch_size, gen, door):
                    check_label_range(y, n_out)
                    rows = row_of[y]
                    counts += torch.bincount(rows[rows >= 0], minlength=len(counts))
                    model(x.to(dev))
                    for n in names:
                        stats[n].update(run.f[n])
        priors, mus, sigmas, scales = {}, {}, {}, {}
        for n in names:
            st = stats[n]
            scales[n] = max(math.sqrt(st.sq_sum / max(st.count, 1)), 1e-12)
            if st.minimum < 0:
                raise InputError(
                    f"layer {n!r} has negative activations (minimum {st.minimum:.4g}); "
                    "information dropout needs f(x) >= 0 (ReLU, log-uniform prior) or "
                    "f(x) > 0 (softplus, log-normal prior): mask after the activation"
                )
            kind = self.prior
            if kind == "auto":
                kind = "log_uniform" if st.minimum == 0 else "log_normal"
            if kind == "log_normal":
                if st.minimum <= 0:
                    raise InputError(
                        f"layer {n!r} has zero activations; the log-normal prior needs f(x) > 0: "
                        "use prior='log_uniform' (or 'auto') for ReLU layers"
                    )
                mean = st.log_sum / st.log_count
                var = (st.log_sq_sum / st.log_count - mean**2).clamp_min(1e-12)
                mus[n], sigmas[n] = mean.float().cpu(), var.sqrt().float().cpu()
            priors[n] = kind
        return priors, mus, sigmas, scales, counts

    @keeps_global_rng
    def fit(self, model: nn.Module, data: object) -> InformationDropout:
        """Learn the noise scales ``α``; see :meth:`ClassPaths.fit` for ``model`` and ``data``.

        Returns
        -------
        InformationDropout
            ``self``.
        """
        self._check_params()
        fit = prepare(model, data, self.layers, self.device, self.classes)
        model, dev, names, shapes, n_out = fit.model, fit.device, fit.names, fit.shapes, fit.n_out
        cls, row_of = fit.classes, fit.row_of
        priors, mus, sigmas, scales, counts = self._survey(
            model, data, names, dev, n_out, row_of, fit.door
        )
        self.priors_, self.prior_mu_, self.prior_sigma_, self.scales_ = priors, mus, sigmas, scales
        keep = check_counts(counts, cls, self.classes, self.min_images)
        n_rows = len(cls)

        logits: dict[str, torch.Tensor] = {}
        heads: dict[str, nn.Module] = {}
        if self.mode == "class":
            logits = {
                n: torch.full(
                    (n_rows, shapes[n][1]), self._init_logit(), device=dev, requires_grad=True
                )
                for n in names
            }
            row_opt = _RowOptimizer(list(logits.values()), "adam", self.lr)
        else:
            for n in names:
                c = shapes[n][1]
                head = nn.Conv2d(c, c, 1) if len(shapes[n]) == 4 else nn.Linear(c, c)
                nn.init.zeros_(head.weight)
                nn.init.constant_(head.bias, self._init_logit())
                heads[n] = head.to(dev)
            opt = torch.optim.Adam([p for h in heads.values() for p in h.parameters()], lr=self.lr)
        noise_gen = torch.Generator(device=dev).manual_seed(self.random_state)
        run = _DropRun(self, noise_gen)
        run.logits, run.heads, run.check = logits, heads, priors

        def step(epoch: int, x, y, rows) -> dict[str, float]:
            run.rows, run.noisy = rows, True
            out = model(x)
            run.noisy = False
            ce = F.cross_entropy(out, y, reduction="none")
            kl = ce.new_zeros(len(y))
            for n in names:
                kl = kl + self._kl(n, run.f[n], run.alpha[n]).flatten(1).mean(1)
            ce_k = _class_mean(ce, rows, n_rows)
            kl_k = _class_mean(kl, rows, n_rows) * self.beta
            total = (ce_k + kl_k).sum()
            if self.mode == "class":
                grads = torch.autograd.grad(total, list(logits.values()))
                present = torch.zeros(n_rows, dtype=torch.bool, device=dev)
                present[rows] = True
                row_opt.step(grads, present)
            else:
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
            run.f.clear()
            run.alpha.clear()
            return {
                "ce": float(ce_k.detach().sum()),
                "kl": float(kl_k.detach().sum()),
                "total": float(total.detach()),
            }

        with intervene(model, {n: partial(run.edit, n) for n in names}, freeze=True):
            history = epoch_loop(
                fit,
                data,
                epochs=self.epochs,
                batch_size=self.batch_size,
                gen=torch.Generator().manual_seed(self.random_state),
                step=step,
                verbose=self.verbose,
            )
        self.layers_ = names
        self.n_outputs_ = n_out
        self.history_ = history
        self.classes_ = cls[keep]
        if self.mode == "class":
            self.logits_ = {n: v.detach()[keep.to(dev)].cpu() for n, v in logits.items()}
            self.alphas_ = {
                n: alpha_from_logit(v, self.alpha_max, self.alpha_min)
                for n, v in self.logits_.items()
            }
        else:
            self.heads_ = {n: h.eval().requires_grad_(False) for n, h in heads.items()}
        return self

    # ---------------------------------------------------------------- inference
    def _check_fitted(self) -> None:
        if not hasattr(self, "layers_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _rows(self, labels, n: int, dev) -> torch.Tensor | None:
        if self.mode != "class":
            return None
        if labels is None:
            raise InputError("class-mode alphas depend on the class: pass labels=")
        labels = as_labels(labels).reshape(-1).cpu()
        if len(labels) != n:
            raise InputError(f"got {n} images but {len(labels)} labels")
        row_of = torch.full((self.n_outputs_,), -1, dtype=torch.long)
        row_of[self.classes_] = torch.arange(len(self.classes_))
        ok = (labels >= 0) & (labels < self.n_outputs_)
        rows = torch.where(ok, row_of[labels.clamp(0, self.n_outputs_ - 1)], -1)
        if bool((rows < 0).any()):
            raise InputError(
                f"classes {sorted(set(labels[rows < 0].tolist()))} have no alphas; fitted "
                f"classes: {self.classes_.tolist()}"
            )
        return rows.to(dev)

    @torch.no_grad()
    def _deterministic(self, model, images, labels):
        self._check_fitted()
        dev = model_device(model, None)
        run = _DropRun(self, None)
        if self.mode == "class":
            run.logits = {n: v.to(dev) for n, v in self.logits_.items()}
        else:
            run.heads = {n: h.to(dev) for n, h in self.heads_.items()}
        run.rows = self._rows(labels, len(images), dev)
        with intervene(model, {n: partial(run.edit, n) for n in self.layers_}, freeze=True):
            logits = model(images.to(dev))
        return run, logits

    def alphas(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``α`` of every unit, per layer: ``B x C x H x W`` (or ``B x C``), on CPU.

        ``labels`` (``B``) are needed in class mode.
        """
        run, _ = self._deterministic(model, images, labels)
        return {n: run.alpha[n].expand_as(run.f[n]).cpu() for n in self.layers_}

    def kl(
        self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """KL per unit (nats) at the deterministic activations, per layer, on CPU.

        Parameters
        ----------
        model : nn.Module
        images : Tensor
            ``B x C x H x W``.
        labels : Tensor, optional
            ``B`` classes (class mode).

        Returns
        -------
        dict of str to Tensor
            ``B x C_i x H_i x W_i`` (or ``B x C_i``).
        """
        run, _ = self._deterministic(model, images, labels)
        return {n: self._kl(n, run.f[n], run.alpha[n]).cpu() for n in self.layers_}

    def information_heatmaps(
        self,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Information heatmaps (:func:`information_heatmap`) of every spatial layer.

        Returns
        -------
        dict of str to Tensor
            ``B x H x W`` (``size`` if given, else the layer's).
        """
        return {
            n: information_heatmap(k, size)
            for n, k in self.kl(model, images, labels).items()
            if k.dim() == 4
        }

    def information_budget(
        self, model: nn.Module, data: object, batch_size: int = 64
    ) -> dict[str, float]:
        """Mean over images of ``Σ KL`` per layer (nats per image).

        ``data`` as in :meth:`fit`; in class mode its labels choose the rows (images of
        classes without ``α`` are skipped).
        """
        self._check_fitted()
        sums = {n: 0.0 for n in self.layers_}
        count = 0
        for x, y in _batches(data, batch_size, torch.Generator().manual_seed(0)):
            if self.mode == "class":
                ok = torch.isin(y, self.classes_)
                x, y = x[ok], y[ok]
                if len(y) == 0:
                    continue
            for n, k in self.kl(model, x, y).items():
                sums[n] += float(information_budget(k).sum())
            count += len(x)
        if count == 0:
            raise InputError("no images to measure")
        return {n: v / count for n, v in sums.items()}

    @torch.no_grad()
    def total_correlation(
        self,
        model: nn.Module,
        data: object,
        eps: float | None = None,
        pool: bool = False,
        noisy: bool = False,
        batch_size: int = 64,
    ) -> dict[str, float]:
        """Gaussian total correlation of log-activations per layer (Achille and Soatto 2018 §8).

        ``TC = −½ log det(Σ₀⁻¹Σ)`` of the covariance ``Σ`` of ``log f`` streamed over the data
        (:func:`xnn_toolkit.metrics.information.gaussian_total_correlation`).

        Parameters
        ----------
        model : nn.Module
        data : as in :meth:`fit`
        eps : float, optional
            Use ``log(f + eps)``; needed for layers with zeros (ReLU), otherwise an error.
        pool : bool
            Average conv activations over positions first (samples are images); by default
            every position of every image is a sample of the ``C``-dimensional vector.
        noisy : bool
            Add one noise sample, ``log z = log f + α·n`` (the representation passed on
            while fitting); by default the deterministic activations.
        batch_size : int

        Returns
        -------
        dict of str to float
            TC in nats per layer.
        """
        from ..metrics.covariance import CovarianceAccumulator
        from ..metrics.information import gaussian_total_correlation

        self._check_fitted()
        accs = {n: CovarianceAccumulator() for n in self.layers_}
        gen = torch.Generator().manual_seed(self.random_state)
        for x, y in _batches(data, batch_size, torch.Generator().manual_seed(0)):
            if self.mode == "class":
                ok = torch.isin(y, self.classes_)
                x, y = x[ok], y[ok]
                if len(y) == 0:
                    continue
            run, _ = self._deterministic(model, x, y)
            for n in self.layers_:
                f = run.f[n]
                if pool and f.dim() == 4:
                    f = f.mean((2, 3))
                if eps is None and bool((f <= 0).any()):
                    raise InputError(
                        f"layer {n!r} has activations <= 0 and log f is undefined; pass eps= "
                        "to use log(f + eps)"
                    )
                lf = torch.log(f + (eps or 0.0))
                if noisy:
                    a = run.alpha[n]
                    if pool and a.dim() == 4:
                        a = a.mean((2, 3))
                    a = a.expand_as(lf).cpu()
                    lf = lf + a * torch.randn(lf.shape, generator=gen).to(lf.device)
                if lf.dim() == 4:
                    lf = lf.transpose(0, 1).reshape(lf.shape[1], -1).T
                accs[n].update(lf)
        return {n: gaussian_total_correlation(a) for n, a in accs.items()}

    # ---------------------------------------------------------------- persistence
    def _saved_params(self) -> dict:
        """Hyperparameters as given to ``__init__``."""
        layers = (
            self.layers
            if isinstance(self.layers, str)
            else [x if isinstance(x, str | int) else str(x) for x in self.layers]
        )
        keys = [
            "prior",
            "mode",
            "beta",
            "alpha_max",
            "alpha_min",
            "init_alpha",
            "shifted",
            "lr",
            "epochs",
            "batch_size",
            "min_images",
            "random_state",
        ]
        out = {k: getattr(self, k) for k in keys}
        out["layers"] = layers
        out["classes"] = None if self.classes is None else [int(c) for c in self.classes]
        out["device"] = None if self.device is None else str(self.device)
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write ``<path>.safetensors`` and ``<path>.json`` atomically."""
        self._check_fitted()
        path = os.fspath(path)
        tensors = {"classes": self.classes_.contiguous()}
        for n in self.layers_:
            if self.mode == "class":
                tensors[f"logits/{n}"] = self.logits_[n].contiguous()
            else:
                for k, v in self.heads_[n].state_dict().items():
                    tensors[f"heads/{n}/{k}"] = v.detach().cpu().contiguous()
            if n in self.prior_mu_:
                tensors[f"mu/{n}"] = self.prior_mu_[n].contiguous()
                tensors[f"sigma/{n}"] = self.prior_sigma_[n].contiguous()
        meta = {
            "type": "InformationDropout",
            "params": self._saved_params(),
            "layers_": self.layers_,
            "priors_": self.priors_,
            "scales_": self.scales_,
            "n_outputs_": self.n_outputs_,
            "history_": self.history_,
        }
        save_estimator_files(path, tensors, meta)

    @classmethod
    @checked_load("the information dropout")
    def load(cls, path: str | os.PathLike) -> InformationDropout:
        """Read masks written by :meth:`save`."""
        path = os.fspath(path)
        meta, tensors = load_estimator_files(path, "InformationDropout", "the information dropout")
        self = loaded_params(cls, meta["params"], path, "the information dropout")
        try:
            self.layers_ = list(meta["layers_"])
            self.priors_ = dict(meta["priors_"])
            self.scales_ = {k: float(v) for k, v in meta["scales_"].items()}
            self.n_outputs_ = int(meta["n_outputs_"])
            self.history_ = meta.get("history_", [])
            self.classes_ = tensors["classes"].long()
            self.prior_mu_ = {n: tensors[f"mu/{n}"] for n in self.layers_ if f"mu/{n}" in tensors}
            self.prior_sigma_ = {
                n: tensors[f"sigma/{n}"] for n in self.layers_ if f"sigma/{n}" in tensors
            }
            if self.mode == "class":
                self.logits_ = {n: tensors[f"logits/{n}"] for n in self.layers_}
                self.alphas_ = {
                    n: alpha_from_logit(v, self.alpha_max, self.alpha_min)
                    for n, v in self.logits_.items()
                }
            else:
                self.heads_ = {}
                for n in self.layers_:
                    w = tensors[f"heads/{n}/weight"]
                    head = (
                        nn.Conv2d(w.shape[1], w.shape[0], 1)
                        if w.dim() == 4
                        else nn.Linear(w.shape[1], w.shape[0])
                    )
                    head.load_state_dict({"weight": w, "bias": tensors[f"heads/{n}/bias"]})
                    self.heads_[n] = head.eval().requires_grad_(False)
        except KeyError as exc:
            raise AssetError(f"{path}.safetensors lacks {exc}; the files do not match") from exc
        return self
