"""
A scoring run
=============

:func:`xnn_toolkit.score_dataset` scores methods over a dataset into per-image rows and
aggregates, written to a folder (CSV and JSON) that a rerun resumes. Here: c-MWP and Grad-CAM
on 16 synthetic birds. The same run from the command line is
``xnn score --model bundled:vgg_synth --methods cmwp,gradcam --n 16 --out scores``.
"""

import tempfile

import matplotlib.pyplot as plt

import xnn_toolkit as xt
from xnn_toolkit.data import load_dataset

lm = xt.load_model("bundled:vgg_synth")
data = load_dataset("synthetic", n=16)  # with part annotations: object masks for the metrics
out = tempfile.mkdtemp()
config = xt.ScoringConfig(
    methods=("cmwp", "gradcam"), metrics=("pointing_game", "energy_pointing_game")
)
result = xt.score_dataset(lm, data, config, out=out, progress=False)
for row in result.aggregate:
    print(row)

# %%
# Per-image energy pointing, one box per method.
per = {}
for row in result.per_image:
    per.setdefault(row["method"], []).append(row["energy_pointing_game"])
fig, ax = plt.subplots(figsize=(4, 3))
ax.boxplot(list(per.values()), tick_labels=list(per.keys()))
ax.set_ylabel("energy pointing game")
plt.show()
