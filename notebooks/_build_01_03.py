"""Write notebooks 01 and 03 (without outputs) from the cell sources below.

    .venv/bin/python notebooks/_build_01_03.py

Edit the cells here, not in the .ipynb files; ``tests/test_notebooks.py`` executes every
notebook and checks that none is stored with outputs.
"""

from __future__ import annotations

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

NB01 = [
    new_markdown_cell("""\
# Explain a model: XNN heads, their heatmaps and metrics

A bundled VGG-style network trained on the synthetic part-annotated birds (`bundled:vgg_synth`)
is explained post hoc, as in the thesis (docs/methods: xnn, excitation, metrics): one-vs-all **XNN heads** on its
fully connected layer `fc6` (SRAE and the faithfulness-only NN baseline), **c-MWP heatmaps** of
every x-feature, and the **metrics**: faithfulness (F_reg, F_cls), orthogonality (O1, O2) and
Voronoi locality against the known part keypoints. The network itself is never changed."""),
    new_code_cell("""\
import torch
from torch.utils.data import TensorDataset

import xnn_toolkit as xt
from xnn_toolkit.data import load_dataset

torch.set_num_threads(1)  # small sizes: one thread is plenty
lm = xt.load_model("bundled:vgg_synth")
print(lm.name, "- test accuracy on its card:", lm.card["test_accuracy"])
print("layers:", xt.list_layers(lm.model)[-8:])

def images(split, n):
    \"\"\"Images in [0, 1], labels and part annotations of the synthetic birds.\"\"\"
    raw, parts = load_dataset("synthetic", split=split, n=n).render_batch(range(n))
    return raw, parts.labels, parts

raw_train, y_train, _ = images("train", 1000)
raw_test, y_test, parts = images("test", 100)
x_train, x_test = lm.preprocessing.normalize(raw_train), lm.preprocessing.normalize(raw_test)
bank_train = xt.extract(lm.model, TensorDataset(x_train, y_train), ["fc6"], progress=False)
bank_test = xt.extract(lm.model, TensorDataset(x_test, y_test), ["fc6"], progress=False)
print("fc6 activations:", bank_train.shape("fc6"), "logits:", tuple(bank_train.logits.shape))"""),
    new_markdown_cell("""\
## XNN heads
Every class gets a head with n = 5 x-features; all heads train together. SRAE adds the sparse
reconstruction and pull-away terms to the faithfulness loss; NN keeps faithfulness only."""),
    new_code_cell("""\
from xnn_toolkit.heads import XNN
from xnn_toolkit.metrics import f_cls, f_reg

heads = {
    kind: XNN(n_features=5, kind=kind, hidden=(64, 32), n_positive=60, n_negative=600,
              max_epochs=15, random_state=0, layer="fc6").fit(bank_train)
    for kind in ("srae", "nn")
}
for kind, head in heads.items():
    y_bar = head.predict(bank_test)
    print(f"{kind:5}  F_reg test {float(f_reg(y_bar, bank_test.logits[:, head.classes_]).mean()):.3f}"
          f"  F_cls test {100 * float(f_cls(y_bar, bank_test.logits, head.classes_).mean()):.1f} %")"""),
    new_markdown_cell("""\
## Heatmaps
Contrastive Excitation Backprop (c-MWP, read at the VGG's pool4) of the class logit — the
*1-heatmap* — and of each x-feature of the image's own class head, drawn in the thesis's
layout: x-features sorted by their contribution v_i E_i, written above each map."""),
    new_code_cell("""\
from xnn_toolkit.viz import xnn_figure
from xnn_toolkit.report import class_heatmaps, xfeature_heatmaps

read = xt.default_read_layer(lm.model)
m = 40  # images with heatmaps (4 per class)
one = class_heatmaps(lm.model, x_test[:m], y_test[:m], "cmwp", read)
maps = {kind: xfeature_heatmaps(lm.model, x_test[:m], y_test[:m], head, "fc6", read)
        for kind, head in heads.items()}

head = heads["srae"]
show = [0, 1, 2]
contrib = head.contributions(bank_test)[show]  # images x heads x n, v_i E_i
own = torch.tensor([head.classes_.tolist().index(int(c)) for c in y_test[show]])
contrib = contrib[torch.arange(len(show)), own]  # each image's own class head
xnn_figure(raw_test[show], one[show], maps["srae"][show], contrib,
           labels=[lm.class_names[int(c)] for c in y_test[show]])"""),
    new_markdown_cell("""\
## Metrics
Orthogonality of each head's x-feature heatmaps (0 is best), averaged over the classes; Voronoi
locality (entropy of the part histogram of the heatmap mass, lower is more local) for the
x-features and for the 1-heatmap baseline."""),
    new_code_cell("""\
from xnn_toolkit.metrics import locality, orthogonality, voronoi_part_probabilities

_, _, sub = images("test", m)  # the annotations of the same first m test images
labels = y_test[:m]
for kind, mp in maps.items():
    orth = [orthogonality(mp[labels == c]) for c in labels.unique()]
    o1 = sum(float(o.o1) for o in orth) / len(orth)
    o2 = sum(float(o.o2) for o in orth) / len(orth)
    loc = float(locality(voronoi_part_probabilities(mp, sub)).mean)
    print(f"{kind:9}  O1 {o1:.3f}  O2 {o2:.3f}  locality {loc:.3f}")
print(f"1-heatmap  locality {float(locality(voronoi_part_probabilities(one[:, None], sub)).mean):.3f}")"""),
    new_markdown_cell("""\
`xnn demo` runs all of this (and every other head and metric) at full size into an HTML report;
`xnn figures --model bundled:vgg_synth --xnn` writes the layout above as PNG, SVG and PDF."""),
]

NB03 = [
    new_markdown_cell("""\
# Concepts, class paths and class-specific gates

Three more post-hoc views of the bundled `vgg_synth` network, at small sizes:
**NMF concepts** of a conv layer (docs/methods/nmf.rst), **information-bottleneck class paths**
(§4: a channel mask per class and layer, their similarity and hit rate) and
**class-specific gates** (§5: a gate matrix learned on the frozen backbone)."""),
    new_code_cell("""\
%matplotlib inline
import torch
from torch.utils.data import TensorDataset

import xnn_toolkit as xt
from xnn_toolkit.data import load_dataset

torch.set_num_threads(1)
lm = xt.load_model("bundled:vgg_synth")
names = lm.class_names
read = xt.default_read_layer(lm.model)

def images(split, n):
    raw, parts = load_dataset("synthetic", split=split, n=n).render_batch(range(n))
    return raw, parts.labels

raw_train, y_train = images("train", 400)
raw_test, y_test = images("test", 80)
x_train, x_test = lm.preprocessing.normalize(raw_train), lm.preprocessing.normalize(raw_test)
acts = xt.extract(lm.model, TensorDataset(x_train, y_train), [read], progress=False)
print(read, acts.shape(read))"""),
    new_markdown_cell("""\
## NMF concepts
Factorise the (non-negative, post-ReLU) activations into r concepts; project the test images
with the basis fixed; colour each pixel by its strongest concept. Faithfulness: the layer is
replaced by its reconstruction inside the network."""),
    new_code_cell("""\
from xnn_toolkit.viz import concept_gallery
from xnn_toolkit.heads import NMFConcepts, nmf_faithfulness

nmf = NMFConcepts(rank=6, random_state=0).fit(acts.activations(read))
test_acts = xt.extract(lm.model, TensorDataset(x_test, y_test), [read], progress=False)
scores = nmf.transform(test_acts.activations(read))
faith = nmf_faithfulness(lm.model, x_test, nmf, layer=read)
print(f"reconstruction error {nmf.reconstruction_err_:.3f}, "
      f"prediction agreement {100 * faith.agreement:.1f} %")
concept_gallery(raw_test[:8], scores[:8], ncols=4, title=f"NMF concepts of {read}")"""),
    new_markdown_cell("""\
## Class paths
Channel masks per class on the frozen network (the official code's objective, one epoch), the
class x class path similarity (mean Jaccard over layers) and the hit rate on 2x2 composites of
four classes (chance: 25 %)."""),
    new_code_cell("""\
from xnn_toolkit.heads import ClassPaths
from xnn_toolkit.viz import hit_rate_figure, path_similarity_figure

paths = ClassPaths(objective="code", epochs=1, batch_size=32, min_images=2, random_state=0)
paths.fit(lm.model, (x_train, y_train))
on = {layer: float(p.float().sum(1).mean()) for layer, p in paths.paths_.items()}
print("channels on the path per class:", {k: round(v, 1) for k, v in on.items()})
hits = paths.hit_rates(lm.model, x_test, y_test, n_composites=12)
path_similarity_figure(paths.similarity(), [names[int(c)] for c in paths.classes_])"""),
    new_code_cell("""\
hit_rate_figure(hits)"""),
    new_markdown_cell("""\
## Class-specific gates
A gate matrix G (classes x filters of the last conv layer) and a new linear head, learned with
the backbone frozen; only the ungated (STD) path runs at test time."""),
    new_code_cell("""\
from xnn_toolkit.heads import ClassSpecificGates
from xnn_toolkit.viz import class_filter_gallery, gate_matrix_figure

gates = ClassSpecificGates(epochs=3, warmup=1, random_state=0).fit(lm.model, (x_train, y_train))
sc = gates.evaluate((x_test, y_test))
print(f"STD accuracy {100 * sc.std_accuracy:.1f} %, CSG accuracy {100 * sc.csg_accuracy:.1f} %, "
      f"L1 density {sc.density:.3f} in {tuple(round(b, 3) for b in sc.density_bounds)}")
gate_matrix_figure(gates.gates_, class_names=names)"""),
    new_code_cell("""\
class_filter_gallery(gates, x_test, y_test, 0, top=4, n_images=2, display=raw_test,
                     class_names=names)"""),
]


def build(cells: list, name: str) -> str:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python",
                                 "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    path = os.path.join(HERE, name)
    with open(path, "w", encoding="utf-8") as f:
        nbformat.write(nb, f)
    return path


if __name__ == "__main__":
    print(build(NB01, "01_explain_a_model.ipynb"))
    print(build(NB03, "03_concepts_paths_gates.ipynb"))
