"""The one answer to "where does this model live?" (xnn_toolkit._device.model_device)."""

import pytest
import torch
from torch import nn

from xnn_toolkit._device import model_device
from xnn_toolkit.errors import InputError


def test_model_device_reads_parameters_then_buffers_then_the_argument():
    assert model_device(nn.Linear(2, 2)) == torch.device("cpu")
    bn = nn.BatchNorm1d(3, affine=False)  # buffers only
    assert model_device(bn) == torch.device("cpu")
    assert model_device(nn.ReLU()) == torch.device("cpu")
    assert model_device(nn.ReLU(), "meta") == torch.device("meta")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")


def test_model_device_refuses_another_device_type_than_the_model():
    with pytest.raises(InputError, match=r"model.to\('meta'\) first"):
        model_device(nn.Linear(2, 2), "meta")
    assert model_device(nn.Linear(2, 2), "cpu") == torch.device("cpu")
