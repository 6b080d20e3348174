"""Information scores of representations.

- Gaussian total correlation (:doc:`/methods/paths`, Achille and Soatto 2018 §7): with ``Σ`` the
covariance of the
  (log-)activations and ``Σ₀ = diag Σ``, ``TC = −½ log det(Σ₀⁻¹ Σ) = −½ log det P`` with ``P``
  the correlation matrix. 0 for uncorrelated components, ``+inf`` for linearly dependent ones.
- Mutual-information score of channels (:doc:`/methods/gates`, CSG): per channel ``k`` and class
``c``
  the mutual information between the binned pooled activation and the one-vs-rest indicator
  ``[y = c]``; a channel's score is its ``max_c``; the layer's score is the mean over channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ._binning import _bin_index, _binary_mutual_information, _equal_width_edges, _joint_counts
from ._inputs import _as_labels, _as_maps
from .covariance import CovarianceAccumulator, _correlation, _neg_logdet

__all__ = ["MutualInformationScore", "gaussian_total_correlation", "mutual_information_score"]


def _as_samples(x: torch.Tensor, log_eps: float | None) -> torch.Tensor:
    a = _as_maps(x, "activations", ndims=(2, 4), expected="N x D or N x C x H x W")
    if a.dim() == 4:
        # channels are the components, every image position is a sample
        a = a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])
    if log_eps is not None:
        if bool((a + log_eps <= 0).any()):
            raise InputError(
                f"log(x + {log_eps}) needs x > -{log_eps}; pass positive activations (softplus, "
                "post-ReLU with log_eps > 0) or log_eps=None to use the values as they are"
            )
        a = torch.log(a + log_eps)
    return a


def gaussian_total_correlation(
    activations: torch.Tensor | CovarianceAccumulator, *, log_eps: float | None = None
) -> float:
    """Gaussian total correlation ``TC = −½ log det(Σ₀⁻¹ Σ)`` (Achille and Soatto 2018).

    See :doc:`/methods/infodrop`.

    Parameters
    ----------
    activations : Tensor or CovarianceAccumulator
        ``N x D`` samples of ``D`` components, or ``N x C x H x W`` conv activations (channels
        are components, every position a sample), or an accumulator already fed with the
        samples (to stream a dataset).
    log_eps : float, optional
        Take ``log(x + log_eps)`` first (Achille and Soatto 2018 models log-activations as
        Gaussian). Default
        None uses the values as given.

    Returns
    -------
    float
        ``TC ≥ 0`` in nats. Components with zero variance are treated as independent of the
        others (with a warning); ``+inf`` when the covariance is singular.
    """
    if isinstance(activations, CovarianceAccumulator):
        if log_eps is not None:
            raise InputError("log_eps applies to raw activations, not to an accumulator")
        cov = activations.covariance()
    else:
        cov = CovarianceAccumulator().update(_as_samples(activations, log_eps)).covariance()
    return 0.5 * _neg_logdet(_correlation(cov))


MI_ESTIMATORS = ("binned", "knn")


def _knn_mutual_information(
    a: torch.Tensor, y: torch.Tensor, c: int, random_state: int
) -> torch.Tensor:
    """``K x C`` one-vs-rest information from scikit-learn's k-NN estimator (float64)."""
    import numpy as np
    from sklearn.feature_selection import mutual_info_classif

    xs, ys = a.double().cpu().numpy(), y.cpu().numpy()
    n, k = xs.shape
    cols = [
        mutual_info_classif(xs, ys == ci, random_state=random_state)
        if 0 < int((ys == ci).sum()) < n
        else np.zeros(k)
        for ci in range(c)
    ]
    return torch.from_numpy(np.stack(cols, 1)).to(a.device)


@dataclass
class MutualInformationScore:
    """Mutual information between channels and one-vs-rest class indicators.

    Attributes
    ----------
    per_class : Tensor
        ``K x C`` ``I(a_k; [y = c])`` in nats (float64).
    per_channel : Tensor
        ``K`` ``max_c`` of ``per_class``.
    best_class : Tensor
        ``K`` int64 argmax class (first on ties).
    mean : float
        Mean of ``per_channel``: the layer's score.
    """

    per_class: torch.Tensor
    per_channel: torch.Tensor
    best_class: torch.Tensor
    mean: float


def mutual_information_score(
    activations: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    *,
    bins: int = 16,
    estimator: str = "binned",
    random_state: int = 0,
) -> MutualInformationScore:
    """Per-channel class mutual information of pooled activations (:doc:`/methods/gates`).

    ``I(a_k ; [y = c])`` for every channel ``k`` and class ``c``: with ``estimator="binned"``
    each channel is cut into ``bins`` equal-width bins over its range (a constant channel is one
    bin, so its information is 0) and the plug-in estimate
    ``Σ_{b, z} p(b, z) log(p(b, z) / (p(b) p(z)))`` with ``z = [y = c]`` and ``0 log 0 = 0`` is
    taken; ``estimator="knn"`` uses scikit-learn's ``mutual_info_classif`` (the class-specific
    gates authors' estimator; ``random_state`` seeds its jitter).

    Parameters
    ----------
    activations : Tensor
        ``N x K`` (e.g. globally average-pooled channels) or ``N x K x H x W`` (pooled here
        by the spatial mean).
    labels : Tensor
        ``N`` class indices.
    num_classes : int, optional
        ``C``; default ``labels.max() + 1``. Classes without samples get 0.
    bins : int
        Equal-width bins per channel over its observed range (plug-in estimator, nats).
    estimator : {"binned", "knn"}
        The estimator (above).
    random_state : int
        Seed of the ``knn`` estimator's jitter.

    Returns
    -------
    MutualInformationScore
    """
    a = _as_maps(activations, "activations", ndims=(2, 4), expected="N x K or N x K x H x W")
    if a.dim() == 4:
        a = a.mean((-2, -1))
    y = _as_labels(labels, a.shape[0]).to(a.device)
    c = int(y.max()) + 1 if num_classes is None else num_classes
    if y.numel() and int(y.max()) >= c:
        raise InputError(f"labels must be < num_classes = {c}")
    if estimator == "knn":
        mi = _knn_mutual_information(a, y, c, random_state)
    elif estimator == "binned":
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise InputError(f"bins must be an int >= 2, got {bins!r}")
        edges = _equal_width_edges(a, bins)
        mi = _binary_mutual_information(_joint_counts(_bin_index(a, edges), y, bins, c))
    else:
        raise InputError(f"estimator must be one of {MI_ESTIMATORS}, got {estimator!r}")
    best = mi.argmax(1)
    per = mi.gather(1, best[:, None])[:, 0]
    return MutualInformationScore(
        per_class=mi, per_channel=per, best_class=best, mean=float(per.mean())
    )
