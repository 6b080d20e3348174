"""Bridges to peer libraries: Quantus (both ways) and Captum (our methods as attributions).

- :func:`quantus_explain_func` turns any registered method into a Quantus ``explain_func``;
- :mod:`xnn_toolkit.interop.captum` offers Excitation Backprop and the CAM family as
  ``captum.attr.Attribution`` subclasses.

The CAM family of pytorch-grad-cam is in the method registry itself
(:mod:`xnn_toolkit.attribution.gradcam_bridge`).
"""

from .quantus import quantus_explain_func, quantus_metric_names, quantus_metric_spec

__all__ = ["quantus_explain_func", "quantus_metric_names", "quantus_metric_spec"]
