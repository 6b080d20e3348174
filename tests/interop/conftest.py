"""Shared fixtures of the interop tests: the bundled model and a few annotated images."""

import pytest
import torch

from xnn_toolkit.data.synthetic import SyntheticParts
from xnn_toolkit.models import load_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def bundled():
    return load_model("bundled:vgg_synth")


@pytest.fixture(scope="module")
def batch(bundled):
    """Six normalised 64 px images, their labels and object masks."""
    ds = SyntheticParts(6, size=64, seed=3, num_classes=10)
    images, ann = ds.render_batch(range(6))
    return bundled.preprocessing.normalize(images), ann.labels, ann.object_mask
