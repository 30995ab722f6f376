"""Channels-last memory format for training a convolutional model (:func:`~.training.train`): oneDNN's convolutions
are faster on it. Measured on this project's 2-core CPU: a training step of ResNet-8 (28x28), torchvision ResNet-18
and MobileNetV2 (64x64) at batch 64 takes 0.80x / 0.92x / 0.85x the time of the default format.

A model with a strided 1x1 convolution of fewer than 16 input channels per group also stays in the default format:
oneDNN's backward-weights kernel for that case in channels-last (nhwc, "reduce to unit stride") writes past its
workspace (uxlfoundation/oneDNN#6035, open; torch 2.14's oneDNN 3.12). Measured here (AVX2, torch 2.14.1): a
Conv2d(7, 16, 1, stride=2) in channels-last gives weight gradients up to 60x off with 2 threads and corrupts the
heap with 1 (``free(): invalid next size``, an abort in the middle of fine-tuning); 2-7 input channels crash, 8 and
more were correct. A pruned ResNet's shortcut convolutions reach such widths. 16 is the largest input-channel
block of oneDNN's x64 1x1 kernels (AVX-512; 8 on AVX2), so the guard holds on either.

Evaluation passes (validation loss, prediction) stay in the default format: converting the model there as well
(0.85x the time of an evaluation pass) made a run resumed from a mid-training checkpoint differ from the
uninterrupted run (integration_tests/test_cli.py), for a reason not found; exact resume comes first."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def _sample(loader: Iterable[Any]) -> torch.Tensor | None:
    """One input of ``loader.dataset`` taken by index (a loader's shuffling generator is not touched), or None."""
    try:
        sample = loader.dataset[0][0]  # type: ignore[attr-defined]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    return sample if isinstance(sample, torch.Tensor) and sample.dim() == 3 else None


ONEDNN_MIN_STRIDED_1X1_CHANNELS = 16
"""A strided 1x1 convolution with fewer input channels per group than this keeps the model in the default format
(oneDNN#6035: wrong weight gradients or heap corruption in channels-last; see the module docstring)."""


def unsafe_for_channels_last(model: nn.Module) -> str | None:
    """The name of the first convolution of ``model`` that oneDNN's channels-last backward pass gets wrong (a 1x1
    kernel with a stride above 1 and fewer than :data:`ONEDNN_MIN_STRIDED_1X1_CHANNELS` input channels per group),
    or None."""
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) != (1, 1)
                and m.in_channels // m.groups < ONEDNN_MIN_STRIDED_1X1_CHANNELS):
            return name
    return None


def _to_channels_last(model: nn.Module, sample: torch.Tensor) -> bool:
    """Put ``model`` in channels-last format if it has 2-d convolutions, is in the default format, has none that
    oneDNN mishandles there (:func:`unsafe_for_channels_last`) and its forward runs on ``sample`` given
    channels-last (eval mode, no gradient: nothing in the model changes); return whether it did."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()) or not weights or not weights[0].is_contiguous():
        return False
    unsafe = unsafe_for_channels_last(model)
    if unsafe is not None:
        log.debug("training in the default memory format: %r is a strided 1x1 convolution with fewer than %d input "
                  "channels, whose channels-last backward pass oneDNN gets wrong (oneDNN#6035)", unsafe,
                  ONEDNN_MIN_STRIDED_1X1_CHANNELS)
        return False
    model.to(memory_format=torch.channels_last)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample[None].to(weights[0].device).contiguous(memory_format=torch.channels_last))
    except RuntimeError as exc:
        model.to(memory_format=torch.contiguous_format)
        log.info("running the model in the default memory format: its forward refuses channels-last input (%s)", exc)
        return False
    finally:
        model.train(was_training)
    return True


def _channels_last_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


@contextmanager
def channels_last(model: nn.Module, loader: Iterable[Any], enabled: bool = True
                  ) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Run ``model`` over ``loader`` in channels-last format when it can: a model with 2-d convolutions whose
    forward accepts such input (tried on one sample of ``loader.dataset``; a model that ``.view``s a feature map
    keeps the default format, and so does everything else). Yields the function to pass each input batch through;
    the model's weights are back in the default format on exit (parameters stay the same objects, so optimisers and
    hooks that hold them keep working)."""
    sample = _sample(loader) if enabled else None
    converted = sample is not None and _to_channels_last(model, sample)
    try:
        yield _channels_last_input if converted else _unchanged
    finally:
        if converted:
            model.to(memory_format=torch.contiguous_format)
