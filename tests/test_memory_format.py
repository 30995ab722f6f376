"""Memory format: convolutional models train channels-last when their forward allows it."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.core import train


class ConvNet(nn.Module):
    def __init__(self, flatten_by_view: bool = False) -> None:
        super().__init__()
        # no bias before BatchNorm: its gradient is rounding noise, which Adam would amplify differently per format
        self.conv = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3))
        self.head = nn.Linear(8 * 6 * 6, 3)
        self.flatten_by_view = flatten_by_view
        self.formats: list[bool] = []  # per training forward: was the feature map channels-last?
        self.eval_formats: list[bool] = []  # the same per forward in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv(x)
        (self.formats if self.training else self.eval_formats).append(
            z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous())
        # .view needs a contiguous (NCHW) feature map: such a model cannot run channels-last
        return self.head(z.view(z.size(0), -1) if self.flatten_by_view else z.flatten(1))


def loader(seed: int = 0, size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 1, size, size, generator=g), torch.randint(0, 3, (48,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))


def fit(model: nn.Module, channels_last: bool, size: int = 8) -> tuple[nn.Module, DataLoader]:
    torch.manual_seed(0)
    data = loader(size=size)
    train(model, data, nn.functional.cross_entropy, epochs=2, lr=1e-2, progress=False, channels_last=channels_last)
    return model, data


def test_a_conv_net_trains_channels_last_to_the_same_weights_and_comes_back_in_the_default_format():
    torch.manual_seed(0)
    start = ConvNet()
    fast, fast_data = fit(copy.deepcopy(start), channels_last=True)
    plain, plain_data = fit(copy.deepcopy(start), channels_last=False)
    assert fast.formats and all(fast.formats)
    assert plain.formats and not any(plain.formats)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        assert a.is_contiguous(), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # the format probe takes its sample by index: the shuffling is the one the default format sees
    assert torch.equal(fast_data.generator.get_state(), plain_data.generator.get_state())


def test_a_model_whose_forward_refuses_channels_last_input_trains_in_the_default_format(caplog):
    torch.manual_seed(0)
    start = ConvNet(flatten_by_view=True)
    with caplog.at_level(logging.INFO, logger="classaware_plugin.core.memory_format"):
        model, _ = fit(copy.deepcopy(start), channels_last=True)
    assert model.formats and not any(model.formats)
    assert "default memory format" in caplog.text
    reference, _ = fit(copy.deepcopy(start), channels_last=False)
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch", [torch.randn(32, 20), torch.randn(32, 1, 8, 8)])
def test_models_without_2d_convolutions_are_left_alone(batch):
    model = nn.Sequential(nn.Flatten(), nn.Linear(batch[0].numel(), 3))
    data = DataLoader(TensorDataset(batch, torch.randint(0, 3, (32,))), batch_size=16)
    train(model, data, nn.functional.cross_entropy, epochs=1, progress=False)
    assert all(p.is_contiguous() for p in model.parameters())



class StridedShortcutNet(nn.Module):
    """A pruned ResNet's shortcut in miniature: a 1x1 convolution with stride 2 on ``width`` channels."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(width, 16, 1, stride=2, bias=False)
        self.head = nn.Linear(16, 3)
        self.formats: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.shortcut(torch.relu(self.stem(x)))
        if self.training:
            self.formats.append(z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous())
        return self.head(z.mean((2, 3)))


@pytest.mark.parametrize("width, channels_last", [(5, False), (7, False), (16, True)])
def test_a_strided_1x1_convolution_on_few_channels_trains_in_the_default_format(width, channels_last):
    """oneDNN#6035: in channels-last, the backward pass of a strided 1x1 convolution with fewer input channels than
    its kernel's block gives wrong weight gradients (2 threads: up to 60x off at 5 and 7 channels here) or corrupts
    the heap (1 thread). Such a model must train in the default format, to the same weights; from 16 channels on the
    fast format is kept."""
    torch.manual_seed(0)
    start = StridedShortcutNet(width)
    fast, _ = fit(copy.deepcopy(start), channels_last=True, size=16)
    plain, _ = fit(copy.deepcopy(start), channels_last=False, size=16)
    assert fast.formats and all(f == channels_last for f in fast.formats)
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
