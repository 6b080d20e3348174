"""
With Quantus, Captum and pytorch-grad-cam
=========================================

The three bridges of :doc:`/guide/peers`, each in its direction: pytorch-grad-cam's Score-CAM
through the toolkit's own call, a Quantus metric scoring c-MWP through
:func:`xnn_toolkit.interop.quantus_explain_func`, and c-MWP handed to Captum's
``infidelity`` and ``sensitivity_max`` as a Captum ``Attribution``.
"""

import matplotlib.pyplot as plt
import quantus
import torch
from captum.metrics import infidelity, sensitivity_max

import xnn_toolkit as xt
from xnn_toolkit.attribution import explain
from xnn_toolkit.data import SyntheticParts
from xnn_toolkit.interop import quantus_explain_func
from xnn_toolkit.interop.captum import ExcitationBackpropAttribution

torch.manual_seed(0)
lm = xt.load_model("bundled:vgg_synth")
model = lm.model
images, ann = SyntheticParts(4, size=64, seed=0).render_batch(range(4))
x, y = lm.preprocessing.normalize(images), ann.labels

# %%
# pytorch-grad-cam's Score-CAM, same call and result type as the toolkit's methods.
scorecam = explain(model, x, y, method="scorecam", batch_size=64).heatmap  # 4 x 64 x 64

# %%
# A Quantus metric on c-MWP.
sparseness = quantus.Sparseness(disable_warnings=True)(
    model=model,
    x_batch=x.numpy(),
    y_batch=y.numpy(),
    explain_func=quantus_explain_func("cmwp"),
    device="cpu",
)
print("Quantus Sparseness of c-MWP per image:", [round(float(s), 3) for s in sparseness])

# %%
# c-MWP where Captum expects an ``Attribution``: its channel sum is the c-MWP heatmap.
cmwp = ExcitationBackpropAttribution(model)
maps = cmwp.attribute(x, target=y)


def perturb(inputs):
    noise = 0.05 * torch.randn_like(inputs)
    return noise, inputs - noise


infid = infidelity(model, perturb, x, maps, target=y, n_perturb_samples=2)
sens = sensitivity_max(cmwp.attribute, x, target=y, n_perturb_samples=2)
print("Captum infidelity:", infid.tolist())
print("Captum sensitivity_max:", sens.tolist())

# %%
fig, axes = plt.subplots(2, 4, figsize=(8, 4))
for i in range(4):
    axes[0, i].imshow(images[i].permute(1, 2, 0))
    axes[0, i].imshow(scorecam[i], cmap="jet", alpha=0.5)
    axes[1, i].imshow(images[i].permute(1, 2, 0))
    axes[1, i].imshow(maps[i].sum(0).clamp(min=0), cmap="jet", alpha=0.5)
axes[0, 0].set_ylabel("Score-CAM")
axes[1, 0].set_ylabel("c-MWP (Captum)")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
plt.tight_layout()
plt.show()
