"""What a method can do is an attribute of its class, and every caller reads it."""

import pytest
import torch

from xnn_toolkit import load_model
from xnn_toolkit.attribution import available_methods, get_method
from xnn_toolkit.data import load_dataset
from xnn_toolkit.errors import InputError
from xnn_toolkit.report.heatmaps import class_heatmaps, class_method
from xnn_toolkit.report.scoring import ScoringConfig, score_dataset


def test_capabilities_are_class_attributes():
    own = {get_method(n).name for n in available_methods() if get_method(n).reads_own_layer}
    assert {"cam", "saliency", "integrated_gradients", "occlusion"} <= own
    assert not {"mwp", "cmwp", "gradcam", "gradcam++"} & own
    filters = {
        get_method(n).name for n in available_methods() if get_method(n).explains == "filter"
    }
    assert filters == {"activmap", "gradmap"}


def test_cam_with_a_read_layer_works_in_heatmaps_and_scoring_alike():
    lm = load_model("bundled:resnet_synth")
    ds = load_dataset("synthetic", n=2, size=64)
    x = torch.stack([ds[i][0] for i in range(2)])
    x = lm.preprocessing.normalize(x)
    maps = class_heatmaps(lm.model, x, torch.tensor([0, 1]), "cam", layer="layer3")
    assert maps.shape[0] == 2 and torch.isfinite(maps).all()
    cfg = ScoringConfig(methods=("cam",), metrics=("pointing_game",), layer="layer3", n=2)
    res = score_dataset(lm, ds, cfg)
    assert res.value("pointing_game", "cam") is not None


def test_filter_methods_are_refused_alike():
    with pytest.raises(InputError, match="maps one filter"):
        class_method("gradmap")
    lm = load_model("bundled:resnet_synth")
    ds = load_dataset("synthetic", n=2, size=64)
    with pytest.raises(InputError, match="maps one filter"):
        score_dataset(lm, ds, ScoringConfig(methods=("gradmap",), metrics=("pointing_game",), n=2))
