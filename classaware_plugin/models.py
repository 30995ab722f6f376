"""Small models that train in minutes on a CPU, built by name.

``cifar_resnet`` (a CIFAR-style ResNet: 3x3 stem, three stages, 1x1 projection shortcuts),
``resnet18`` and ``mobilenet_v2`` from torchvision adapted to small inputs (stride-1 stem, no max-pool),
and ``mlp`` for tabular data. A model can also be named ``package.module:callable``.
"""
from __future__ import annotations

import importlib
import logging
import math
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .core.distributed import model_device
from .core.validation import (
    ClassAwareError, Constraint, Interval, check_choice, check_num_classes, check_number_list, check_params,
)

log = logging.getLogger(__name__)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None  # identity (no module: NNI's speed-up cannot replace nn.Identity)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) of He et al. for small images; ``width`` is the first stage's channels."""

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        check_params(MODEL_PARAMETERS["cifar_resnet"], {"depth": depth, "width": width})
        if (depth - 2) % 6 != 0:
            raise ClassAwareError(f"The 'depth' parameter must be 6n+2 (8, 14, 20, 32, 56, ...). Got {depth}.")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(cin, width * mult, stride))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def cifar_resnet(num_classes: int, in_channels: int = 3, depth: int = 8, width: int = 16) -> nn.Module:
    return CifarResNet(num_classes, in_channels, depth, width)


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (for 8-64 px inputs)."""
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    return m


def mobilenet_v2(num_classes: int, in_channels: int = 3, width_mult: float = 0.5) -> nn.Module:
    """torchvision MobileNetV2 with a stride-1 stem (for small inputs)."""
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    check_params(MODEL_PARAMETERS["mobilenet_v2"], {"width_mult": width_mult})
    m = tv_mobilenet_v2(num_classes=num_classes, width_mult=width_mult)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1, 1, bias=False)
    return m


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64, 32)) -> None:
        super().__init__()
        hidden = check_number_list("hidden", hidden, low=1, integer=True)
        if len(hidden) > 64 or max(hidden) > MAX_WIDTH:
            raise ClassAwareError(f"The 'hidden' parameter must list at most 64 layer widths of at most {MAX_WIDTH}. "
                                  f"Got {hidden!r}.")
        dims = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(torch.flatten(x, 1)))


def mlp(num_classes: int, in_features: int, hidden: Sequence[int] = (64, 32)) -> nn.Module:
    return MLP(in_features, num_classes, hidden)


MAX_WIDTH = 65536
"""The widest layer a built-in model may be asked for (a typo of a few digits must not allocate the machine away)."""
MODEL_PARAMETERS: dict[str, dict[str, Constraint]] = {
    "cifar_resnet": {"depth": Interval(8, 1202, integer=True), "width": Interval(1, 4096, integer=True)},
    "mobilenet_v2": {"width_mult": Interval(0.0, 8.0, low_open=True)},
}
"""The declared constraints of the built-in models' keyword arguments (``model.kwargs``)."""
MAX_INPUT_ELEMENTS = 64 * 1024 * 1024
"""The largest input (elements per sample) a model is built for."""

@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its builder, what it takes from the data (``image``: ``in_channels = input_shape[0]`` of a
    (channels, height, width) input; ``flat``: ``in_features`` = the product of ``input_shape``) and a description."""

    builder: Callable[..., nn.Module]
    inputs: str
    description: str


MODELS: dict[str, ModelEntry] = {}
"""The models ``build_model`` and the CLI's ``model.name`` know, by name (:func:`register_model`)."""


def register_model(name: str, builder: Callable[..., nn.Module], inputs: str = "image", description: str = "") -> None:
    """Make ``builder(num_classes=, in_channels=, **kwargs)`` (``inputs="image"``) or ``builder(num_classes=,
    in_features=, **kwargs)`` (``inputs="flat"``) available as ``name``. A name registered twice is replaced, with a
    warning."""
    check_choice("inputs", inputs, ("image", "flat"))
    if name in MODELS:
        log.warning("model %r registered again: the new builder replaces %r", name, MODELS[name].builder)
    MODELS[name] = ModelEntry(builder, inputs, description)


register_model("cifar_resnet", cifar_resnet, "image",
               "ResNet-(6n+2) for small images (He et al.); kwargs depth (8, 14, 20, ...), width")
register_model("resnet18", resnet18, "image",
               "torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool (8-64 px inputs)")
register_model("mobilenet_v2", mobilenet_v2, "image", "torchvision MobileNetV2 with a stride-1 stem; kwargs width_mult")
register_model("mlp", mlp, "flat", "a multi-layer perceptron on flattened inputs (tables); kwargs hidden (layer widths)")


def build_model(name: str, num_classes: int, input_shape: Sequence[int], /, **kwargs: Any) -> nn.Module:
    """Build a model by built-in name or ``package.module:callable`` for data of ``input_shape``.

    Image models take ``in_channels = input_shape[0]``; ``mlp`` takes the product of ``input_shape``.
    """
    check_num_classes(num_classes)
    if not isinstance(name, str):
        raise ClassAwareError(f"The 'name' parameter must be a model name (str). Got {type(name).__name__}.")
    input_shape = check_number_list("input_shape", input_shape, low=1, integer=True)
    if math.prod(input_shape) > MAX_INPUT_ELEMENTS:
        raise ClassAwareError(f"The 'input_shape' parameter {input_shape} has more than {MAX_INPUT_ELEMENTS:,} elements "
                              "per sample.")
    if name in MODELS and MODELS[name].inputs == "image" and len(input_shape) != 3:
        raise ClassAwareError(f"The 'input_shape' parameter must be (channels, height, width) for {name!r}. Got "
                              f"{input_shape}.")
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ClassAwareError(f"Cannot import model {name!r}: {e}") from e
        args: dict[str, Any] = {"num_classes": num_classes}
    elif name in MODELS:
        fn = MODELS[name].builder
        if MODELS[name].inputs == "flat":
            args = {"num_classes": num_classes, "in_features": math.prod(input_shape)}
        else:
            args = {"num_classes": num_classes, "in_channels": int(input_shape[0])}
    else:
        allowed = ", ".join(repr(k) for k in sorted(MODELS))
        raise ClassAwareError(
            f"The 'model' parameter must be one of {allowed} or 'package.module:callable'. Got {name!r} instead."
        )
    _check_kwargs(name, fn, kwargs, set(args))
    try:
        model = fn(**args, **kwargs)
    except TypeError as e:  # a builder taking **kwargs that passes them on to a constructor that refuses them
        raise ClassAwareError(f"Model {name!r} refused the arguments {kwargs!r}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"Model {name!r} returned a {type(model).__name__}, not a torch.nn.Module.")
    check_output_width(model, num_classes, input_shape)
    return model


def _check_kwargs(name: str, fn: Callable[..., Any], kwargs: dict[str, Any], fixed: set[str]) -> None:
    """Refuse model.kwargs the builder does not take (or that the job sets itself) before anything is built."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    taken = [k for k in kwargs if k in fixed]
    if taken:
        raise ClassAwareError(f"Model {name!r}: {taken} are set from the data and cannot be given in model.kwargs.")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if k not in fixed and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise ClassAwareError(
            f"Model {name!r} has no argument(s) {unknown} (model.kwargs). It takes: {', '.join(accepted) or 'none'}."
        )


@torch.no_grad()
def check_output_width(model: nn.Module, num_classes: int, input_shape: Sequence[int]) -> None:
    """Raise when ``model``'s output is not ``(batch, num_classes)`` for inputs of ``input_shape``."""
    was = model.training
    model.eval()
    try:
        out = model(torch.zeros(2, *input_shape, device=model_device(model)))
    finally:
        model.train(was)
    if out.ndim != 2 or out.shape[1] != num_classes:
        raise ClassAwareError(
            f"The model's output has shape {tuple(out.shape)} but the data has {num_classes} classes; "
            f"the output must be (batch, {num_classes})."
        )
