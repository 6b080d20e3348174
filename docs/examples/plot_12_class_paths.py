"""
Class paths
===========

Information-bottleneck channel masks, one per class and masked layer (see
:doc:`/methods/paths`), fit on the bundled synthetic-bird VGG with its backbone frozen, then
the similarity of the classes' paths (mean Jaccard index of their binary masks over layers).
A short fit: two epochs on 240 images.
"""

import matplotlib.pyplot as plt

import xnn_toolkit as xt
from xnn_toolkit.data import load_dataset
from xnn_toolkit.heads import ClassPaths
from xnn_toolkit.viz import path_mask_figure, path_similarity_figure

lm = xt.load_model("bundled:vgg_synth")
data = load_dataset(
    "synthetic", split="train", n=240, annotations=False, preprocessing=lm.preprocessing
)
paths = ClassPaths(epochs=2, batch_size=32, random_state=0).fit(lm.model, data)

# %%
fig = path_similarity_figure(paths.similarity(), lm.class_names)
plt.show()

# %%
fig = path_mask_figure(paths.masks_, lm.class_names)
plt.show()
