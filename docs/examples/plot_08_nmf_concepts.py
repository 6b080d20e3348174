"""
NMF concepts
============

Non-negative matrix factorisation of the activations of the bundled synthetic-bird VGG (its
default read layer, a post-ReLU conv map) into four concepts (see :doc:`/methods/nmf`); each
concept's score map is coloured over the images.
"""

import matplotlib.pyplot as plt
import torch

import xnn_toolkit as xt
from xnn_toolkit.data import SyntheticParts
from xnn_toolkit.heads import NMFConcepts
from xnn_toolkit.viz import concept_gallery

lm = xt.load_model("bundled:vgg_synth")
images, parts = SyntheticParts(64, seed=SyntheticParts.TEST_SEED).render_batch(range(64))
x = lm.preprocessing.normalize(images)
layer = xt.default_read_layer(lm.model)
bank = xt.extract(
    lm.model, torch.utils.data.TensorDataset(x, parts.labels), [layer], progress=False
)
nmf = NMFConcepts(rank=4, random_state=0).fit(bank, layer=layer)
scores = nmf.transform(bank, layer=layer)  # N x r x h x w concept maps
print("concept maps", tuple(scores.shape), "reconstruction error", nmf.reconstruction_err_)

# %%
fig = concept_gallery(images[:8], scores[:8], ncols=4, title=f"four NMF concepts of {layer}")
plt.show()
