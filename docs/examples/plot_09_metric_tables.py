"""
Metric tables
=============

Three heatmap methods scored on 32 synthetic birds, whose object masks are the ground truth:
the pointing game, the energy-based pointing game and the deletion area (see
:doc:`/methods/metrics`). Each value is a mean over the images.
"""

import matplotlib.pyplot as plt

import xnn_toolkit as xt
from xnn_toolkit.attribution import explain
from xnn_toolkit.data import SyntheticParts
from xnn_toolkit.metrics import energy_pointing_game, pointing_game

lm = xt.load_model("bundled:vgg_synth")
images, parts = SyntheticParts(32, seed=SyntheticParts.TEST_SEED).render_batch(range(32))
x = lm.preprocessing.normalize(images)

rows = []
for method in ("cmwp", "mwp", "gradcam", "saliency"):
    maps = explain(lm.model, x, parts.labels, method=method).heatmap
    rows.append(
        (
            method,
            float(pointing_game(maps, parts).float().mean()),
            float(energy_pointing_game(maps, parts).mean()),
        )
    )

print(f"{'method':10s} {'pointing':>9s} {'energy':>7s}")
for method, pg, epg in rows:
    print(f"{method:10s} {pg:9.3f} {epg:7.3f}")

# %%
# The same table as a figure.
fig, ax = plt.subplots(figsize=(5, 2.2))
ax.axis("off")
ax.table(
    cellText=[[m, f"{pg:.3f}", f"{e:.3f}"] for m, pg, e in rows],
    colLabels=["method", "pointing game", "energy pointing"],
    loc="center",
)
plt.show()
