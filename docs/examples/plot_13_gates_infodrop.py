"""
Class-specific gates and information dropout
============================================

Two more heads on the bundled synthetic-bird VGG, each fitted briefly on 240 images:

- the class-specific gate matrix :math:`G` of the last conv layer (classes down, filters across,
  filters ordered by the class they are most open for; see :doc:`/methods/gates`);
- information-dropout noise on the default layers, whose KL per position is the information
  heatmap (see :doc:`/methods/infodrop`).
"""

import matplotlib.pyplot as plt
import torch

import xnn_toolkit as xt
from xnn_toolkit.data import load_dataset
from xnn_toolkit.heads import ClassSpecificGates, InformationDropout
from xnn_toolkit.viz import gate_matrix_figure, information_heatmap_figure

lm = xt.load_model("bundled:vgg_synth")
data = load_dataset(
    "synthetic", split="train", n=240, annotations=False, preprocessing=lm.preprocessing
)
gates = ClassSpecificGates(epochs=3, warmup=1, batch_size=32, random_state=0).fit(lm.model, data)
fig = gate_matrix_figure(gates.gates_, class_names=lm.class_names, title="gate matrix G")
plt.show()

# %%
info = InformationDropout(epochs=2, batch_size=32, random_state=0).fit(lm.model, data)
test = load_dataset("synthetic", split="test", n=4, annotations=False)
raw = torch.stack([test[i][0] for i in range(4)])  # images in [0, 1]
labels = torch.tensor([test[i][1] for i in range(4)])
x = lm.preprocessing.normalize(raw)
maps = info.information_heatmaps(lm.model, x, labels, size=tuple(raw.shape[-2:]))
fig = information_heatmap_figure(raw, maps, row_labels=[lm.class_names[c] for c in labels])
plt.show()
