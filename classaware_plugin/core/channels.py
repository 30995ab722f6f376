"""Class-conditional channel Fisher statistics: squared per-sample channel-gate values, per bucket.

Every channel of a *gate* gets a multiplicative per-sample gate ``z = 1`` (shape ``(N, C, 1, ...)``) on its output.
A gate is a module that produces channels (conv, linear, norm layers) whose output is not normalised by a norm
layer that directly follows: for ``conv -> BatchNorm`` the gate is after the BatchNorm, so removing the channel
removes its shift too (Molchanov et al., CVPR 2019). In eval mode samples are independent, so one forward and one
backward of the *summed* per-sample loss give, for every sample ``n`` and channel ``k``,

    s_{n,k} = d l_n / d z_{n,k} = sum_{h,w} a_{n,k,h,w} * d l_n / d a_{n,k,h,w}

exactly (Group Fisher pruning's per-sample channel value); only activation gradients are computed, no weight
gradients. Per bucket the sum of ``s^2`` and the sample count are kept, and a channel's score is
``I_k = sum_b omega_b * mean_{n in b} s_{n,k}^2`` (``weighting='balanced'``) or, with ``'count'`` and every omega 1,
the class-agnostic Fisher score ``mean_n s_{n,k}^2``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .distributed import model_device
from .statistics import BucketStatistics, bucket_masks
from .validation import run_model

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d, nn.LayerNorm)


def channel_dim(module: nn.Module, out: torch.Tensor) -> int:
    """The dimension of ``module``'s output that holds its channels: the last for ``nn.Linear`` and ``nn.LayerNorm``
    (channels-last tensors, as in ConvNeXt's blocks), 1 otherwise. A LayerNorm subclass whose output has its width
    in dimension 1 normalises a channels-first tensor (torchvision's ``LayerNorm2d``, ConvNeXt's downsampling)."""
    last = out.ndim - 1
    if isinstance(module, nn.LayerNorm) and type(module) is not nn.LayerNorm and out.ndim > 2:
        width = module.normalized_shape[-1]
        return 1 if out.shape[1] == width else last
    return last if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def find_gates(model: nn.Module, example: torch.Tensor) -> tuple[list[tuple[str, nn.Module]], dict[nn.Module, nn.Module]]:
    """The gate modules of ``model`` (with names) and, for every channel module that ran, the gate of its channels.

    One probe forward on ``example`` records which producer's output a norm layer consumes directly: such a
    producer's channels are gated after that norm (``conv -> BatchNorm``: the BatchNorm's output).
    """
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, PRODUCERS + NORMS)]
    produced: dict[int, nn.Module] = {}
    keep_alive: list[torch.Tensor] = []  # outputs stay alive during the probe, so their ids are not reused
    follower: dict[nn.Module, nn.Module] = {}

    def on_output(m: nn.Module, _: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            produced[id(out)] = m
            keep_alive.append(out)

    def on_input(m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            src = produced.get(id(args[0]))
            if isinstance(src, PRODUCERS) and src not in follower:
                follower[src] = m

    handles = [m.register_forward_hook(on_output) for _, m in named]
    handles += [m.register_forward_pre_hook(on_input) for _, m in named if isinstance(m, NORMS)]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            run_model(model, example, 1, what="calibration batch")
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    ran = {id(m) for m in produced.values()}
    gates = [(n, m) for n, m in named if id(m) in ran and m not in follower]
    gate_of = {m: follower.get(m, m) for _, m in named if id(m) in ran}
    return gates, gate_of


@dataclass
class ChannelScores:
    """Channel scores per gate module (larger = keep) and, for every channel module, its gate.

    ``for_module(conv)`` is the score of the conv's output channels (its BatchNorm's gate when one follows).
    """

    values: dict[nn.Module, torch.Tensor]
    gate_of: dict[nn.Module, nn.Module] = field(default_factory=dict)

    def gate(self, module: nn.Module) -> nn.Module | None:
        return self.gate_of.get(module)

    def for_module(self, module: nn.Module) -> torch.Tensor | None:
        gate = self.gate_of.get(module)
        return None if gate is None else self.values.get(gate)


class ChannelFisher(BucketStatistics):
    """Per-bucket sums of squared per-sample channel-gate values ``s_{n,k}^2`` (see the module docstring).

    Args:
        important_classes: the important classes (each its own bucket; the other classes share one).
        num_classes: the model's output width.
        loss: the per-sample loss the gates are differentiated through (``'ce'`` or ``'margin'``), as for
            :class:`~classaware_plugin.core.statistics.BucketStatistics`.

    Example:
        >>> stats = ChannelFisher(important_classes=[3], num_classes=10)
        >>> stats.collect(model, loader)                                  # doctest: +SKIP
        >>> stats.scores(omega=1.0).for_module(model.conv1)               # doctest: +SKIP
    """

    def reset(self) -> None:
        super().reset()
        self.gate_of_: dict[nn.Module, nn.Module] = {}
        self.gate_names_: dict[str, str] = {}

    def update(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Accumulate one batch: one forward and one backward (activation gradients only)."""
        device = model_device(model)
        inputs, targets = self._batch(inputs, targets, device)
        if not self.modules_:
            gates, self.gate_of_ = find_gates(model, inputs[:2])
            names = {id(m): n for n, m in model.named_modules()}
            self.gate_names_ = {names[id(k)]: names[id(v)] for k, v in self.gate_of_.items()}
            self._begin(gates)
        else:
            self._begin(self.modules_)
        z: dict[nn.Module, torch.Tensor] = {}

        def gate(m: nn.Module, _: Any, out: torch.Tensor) -> torch.Tensor:
            dim = channel_dim(m, out)
            shape = [out.shape[0]] + [1] * (out.ndim - 1)
            shape[dim] = out.shape[dim]
            z[m] = torch.ones(shape, dtype=out.dtype, device=out.device, requires_grad=True)
            return out * z[m]

        handles = [m.register_forward_hook(gate) for _, m in self.modules_]
        try:
            with torch.enable_grad():
                loss = self._loss(model, inputs, targets)
                used = [m for _, m in self.modules_ if m in z]
                grads = torch.autograd.grad(loss.sum(), [z[m] for m in used], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        masks = bucket_masks(targets, self.important_classes)
        present = [b for b, mask in masks.items() if bool(mask.any())]
        onehot = torch.stack([masks[b] for b in present]).float()  # (buckets, N): one matmul sums every bucket
        for m, g in zip(used, grads):
            if g is None:
                continue
            s2 = g.detach().reshape(g.shape[0], -1).float().pow(2)  # (N, C): squared per-sample gate values
            for b, row in zip(present, onehot @ s2):
                self._add(b, m, "channel", row)
        self._end(masks)

    def scores(self, omega: float | Mapping[int, float] = 1.0, rest_weight: float = 1.0,
               weighting: str = "balanced") -> ChannelScores:
        """``I_k = sum_b factor_b * sum_{n in b} s_{n,k}^2`` per gate, with every channel module mapped to its gate."""
        values = {m: t["channel"] for m, t in self.combined(omega, rest_weight, weighting).items()}
        return ChannelScores(values, dict(self.gate_of_))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "gate_of": dict(self.gate_names_)}

    def load_state_dict(self, state: Mapping[str, Any], model: nn.Module) -> None:
        super().load_state_dict(state, model)
        by_name = dict(model.named_modules())
        self.gate_names_ = dict(state["gate_of"])
        self.gate_of_ = {by_name[k]: by_name[v] for k, v in self.gate_names_.items()}


def rounded_channels(width: int, kept: float, round_to: int | None, down: bool = False) -> int:
    """Channels a layer of ``width`` keeps when it should keep ``kept``: with ``round_to``, the nearest multiple of
    it (``down``: the multiple below), at least one multiple and at most ``width``. Nearest, so that a small step
    leaves a layer alone instead of taking a whole block from it. Shared by the Torch-Pruning and NNI paths."""
    if not round_to or round_to == 1:
        return max(1, min(width, int(kept)))
    blocks = int(kept // round_to) if down else int(kept / round_to + 0.5)
    return max(min(round_to, width), min(width, blocks * round_to))
