"""
CAM
===

CAM on the bundled ImageNet EfficientNet-Lite0 and one of the bundled photos: the last feature
maps weighted by the classifier's weights of the class (see :doc:`/methods/cam`). The target is
the class the model predicts.
"""

# %%
# Load the real model (bundled weights, no network) and one bundled photo, cropped the way
# the model's own data configuration says.
import tempfile

import matplotlib.pyplot as plt
import torch

import xnn_toolkit as xt
from xnn_toolkit.attribution import explain
from xnn_toolkit.data import ImageFiles, sample_photos

lm = xt.load_model("bundled:efficientnet_lite0")
folder = tempfile.mkdtemp()
sample_photos(folder, names=["chelsea"])
photos = ImageFiles.for_model(folder, lm)
raw = photos[0][0][None]  # 1 x 3 x 224 x 224, values in [0, 1]
x = lm.preprocessing.normalize(raw)
with torch.no_grad():
    predicted = lm.model(x).argmax(1)
print("predicted:", lm.class_names[int(predicted)])

# %%
# Explain the predicted class with ``cam``; the model is left exactly as it was.
result = explain(lm.model, x, predicted, method="cam")
heatmap = result.heatmap[0]
print("heatmap", tuple(heatmap.shape), "min", float(heatmap.min()), "max", float(heatmap.max()))

# %%
# The photo and the heatmap over it.
fig, axes = plt.subplots(1, 2, figsize=(6, 3))
axes[0].imshow(raw[0].permute(1, 2, 0))
axes[0].set_title(lm.class_names[int(predicted)])
axes[1].imshow(raw[0].permute(1, 2, 0))
axes[1].imshow(heatmap, cmap="jet", alpha=0.5)
axes[1].set_title("cam")
for ax in axes:
    ax.axis("off")
plt.tight_layout()
plt.show()
