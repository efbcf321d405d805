"""The dense form of grouped 1x1 convolutions is the same mathematics: outputs, gradients and checkpoints (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dkd_tune.models.grouped_pointwise import BlockDiagonalPointwise, densify_grouped_pointwise
from dkd_tune.models.registry import create_model


def test_shufflenet_v1_run_dense_equals_grouped_in_float64():
    torch.manual_seed(0)
    grouped = create_model("ShuffleV1", num_classes=100).double().train()
    dense = copy.deepcopy(grouped)
    replaced = densify_grouped_pointwise(dense)
    # Every grouped 1x1 convolution of the network, and nothing else (the depthwise 3x3 stay).
    expected = sum(
        1 for m in grouped.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups > 1
    )
    assert replaced == expected > 20
    assert not any(isinstance(m, BlockDiagonalPointwise) for m in grouped.modules())
    assert grouped.state_dict().keys() == dense.state_dict().keys()  # checkpoints keep their layout

    images = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out_grouped, out_dense = grouped(images), dense(images)
    torch.testing.assert_close(out_dense, out_grouped, rtol=0, atol=1e-6)
    out_grouped.square().sum().backward()
    out_dense.square().sum().backward()
    for (name, a), (_, b) in zip(grouped.named_parameters(), dense.named_parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-6, msg=name)


def test_a_grouped_checkpoint_loads_into_the_dense_form_and_back():
    grouped = create_model("ShuffleV1", num_classes=10)
    dense = create_model("ShuffleV1", num_classes=10)
    densify_grouped_pointwise(dense)
    dense.load_state_dict(grouped.state_dict())
    grouped.load_state_dict(dense.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dense.eval()(images), grouped.eval()(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_name", ["resnet8x4", "wrn_16_2"])
def test_networks_without_grouped_pointwise_convolutions_are_left_alone(model_name):
    model = create_model(model_name, num_classes=100)
    assert densify_grouped_pointwise(model) == 0
