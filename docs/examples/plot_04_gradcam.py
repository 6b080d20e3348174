"""
Grad-CAM
========

Grad-CAM on the bundled ImageNet EfficientNet-Lite0 and one of the bundled photos: feature maps
weighted by their spatially averaged gradients (see :doc:`/methods/cam`). The target is the
class the model predicts.
"""

# %%
# Load the real model (bundled weights, no network) and one bundled photo, cropped the way
# the model's own data configuration says.
import torch

import xnn_toolkit as xt
from xnn_toolkit.attribution import explain
from xnn_toolkit.data import SkimagePhotos
from xnn_toolkit.viz import heatmap_grid

lm = xt.load_model("bundled:efficientnet_lite0")
photos = SkimagePhotos.for_model(lm, ["chelsea"])  # prepared as the model's data config says
raw = photos[0][0][None]  # 1 x 3 x 224 x 224, values in [0, 1]
x = lm.preprocessing.normalize(raw)
with torch.no_grad():
    predicted = lm.model(x).argmax(1)
print("predicted:", lm.class_names[int(predicted)])

# %%
# Explain the predicted class with ``gradcam``; the model is left exactly as it was.
result = explain(lm.model, x, predicted, method="gradcam")
heatmap = result.heatmap[0]
print("heatmap", tuple(heatmap.shape), "min", float(heatmap.min()), "max", float(heatmap.max()))

# %%
# The photo and the heatmap over it, drawn by the toolkit's :func:`~xnn_toolkit.viz.heatmap_grid`
# (:func:`~xnn_toolkit.viz.save_figure` writes it as PNG, SVG or PDF).
fig = heatmap_grid(
    raw,
    heatmap[None, None],
    row_labels=[lm.class_names[int(predicted)]],
    col_labels=["photo", "gradcam"],
)
