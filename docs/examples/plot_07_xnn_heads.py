"""
XNN / SRAE heads in the paper layout
====================================

A tiny SRAE explanation head on the bundled VGG trained on the synthetic birds (see
:doc:`/methods/xnn`): five x-features per class, fit on the ``fc6`` activations, then each
x-feature's c-MWP heatmap in the thesis's figure layout — the image, the heatmap of the
explained logit (the "1-heatmap"), then the x-features sorted by their contribution
:math:`v_i E_i(Z)`, written above each.
"""

import matplotlib.pyplot as plt
import torch

import xnn_toolkit as xt
from xnn_toolkit.attribution import Class, ContrastiveExcitationBackprop, HeadOutput
from xnn_toolkit.data import SyntheticParts
from xnn_toolkit.heads import XNN
from xnn_toolkit.viz import xnn_figure

lm = xt.load_model("bundled:vgg_synth")
data = SyntheticParts(400, seed=SyntheticParts.TRAIN_SEED)
images, parts = data.render_batch(range(400))
x = lm.preprocessing.normalize(images)
bank = xt.extract(
    lm.model, torch.utils.data.TensorDataset(x, parts.labels), ["fc6"], progress=False
)
c = int(parts.labels[0])  # explain the class of the first image
heads = XNN(
    n_features=5,
    kind="srae",
    hidden=(64,),
    classes=[c],
    n_positive=30,
    n_negative=300,
    max_epochs=15,
).fit(bank)

# %%
# c-MWP heatmaps of the class logit and of each x-feature of that class's head, for two
# images of the class, with the contributions :math:`v_i E_i(Z)` of the x-features.
show = torch.nonzero(parts.labels == c).flatten()[:2]
cmwp = ContrastiveExcitationBackprop(lm.model)
one = cmwp.attribute(x[show], Class(c)).heatmap
head = heads.as_target_module(0)
feats = torch.stack(
    [cmwp.attribute(x[show], HeadOutput("fc6", head, i)).heatmap for i in range(5)], 1
)
contrib = heads.contributions(bank.activations("fc6")[show])[:, 0]
fig = xnn_figure(images[show], one, feats, contrib, labels=[lm.class_names[c]] * len(show))
plt.show()
