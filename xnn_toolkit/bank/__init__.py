"""The activation bank: activations of chosen layers, logits and labels over a data set.

- :mod:`~xnn_toolkit.bank.bank`: :class:`ActivationBank`, in memory or memory-mapped from disk.
- :mod:`~xnn_toolkit.bank.store`: the on-disk format (JSON manifest, ``.npy`` shards, atomic
  writes, checks, resume).
- :mod:`~xnn_toolkit.bank.extraction`: :func:`extract`, one forward pass over the data with hooks.
"""

from .bank import ActivationBank
from .extraction import extract

__all__ = ["ActivationBank", "extract"]
