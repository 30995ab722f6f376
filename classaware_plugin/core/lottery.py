"""Lottery-ticket primitives for the paper-faithful mode: rewind snapshots and masks kept at zero.

Pruned weights must stay exactly zero during retraining. Gradient hooks are not enough (weight
decay and Adam's moments move a weight whose gradient is zero), so :class:`MaskSet` re-applies its
masks after every optimiser step through ``Optimizer.register_step_post_hook``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .validation import ClassAwareError


class RewindSnapshot:
    """A copy of every parameter (and buffer) keyed by qualified module and tensor name.

    Example:
        >>> snap = RewindSnapshot.capture(model)     # doctest: +SKIP
        >>> ...train...; snap.rewind(model, masks)   # doctest: +SKIP
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = dict(tensors)

    @classmethod
    def capture(cls, model: nn.Module) -> RewindSnapshot:
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()})

    def tensor(self, module_name: str, tensor_name: str) -> torch.Tensor:
        key = f"{module_name}.{tensor_name}" if module_name else tensor_name
        if key not in self.tensors and key.endswith("_orig"):
            key = key[: -len("_orig")]  # torch.nn.utils.prune renamed weight -> weight_orig after the snapshot
        if key not in self.tensors:
            raise ClassAwareError(f"The rewind snapshot has no tensor {key!r}.")
        return self.tensors[key]

    def rewind(self, model: nn.Module, masks: MaskSet | None = None) -> None:
        """Copy the snapshot back into ``model`` (same architecture), then re-apply ``masks``."""
        missing, unexpected = model.load_state_dict(self.tensors, strict=False)
        if missing or unexpected:
            raise ClassAwareError(
                f"The rewind snapshot does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        if masks is not None:
            masks.apply()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)


class MaskSet:
    """Binary masks on parameters, keyed by ``(module, tensor name)``; 1 = kept, 0 = pruned."""

    def __init__(self, masks: Mapping[tuple[nn.Module, str], torch.Tensor] | None = None) -> None:
        self.masks: dict[tuple[nn.Module, str], torch.Tensor] = {}
        for (m, n), mask in (masks or {}).items():
            self.set(m, n, mask)
        self._handles: list[Any] = []

    def set(self, module: nn.Module, name: str, mask: torch.Tensor) -> None:
        p = getattr(module, name)
        if mask.shape != p.shape:
            raise ClassAwareError(f"A mask of shape {tuple(mask.shape)} does not fit {name} of shape {tuple(p.shape)}.")
        self.masks[(module, name)] = mask.detach().to(device=p.device, dtype=torch.bool)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned weight in place."""
        for (m, n), mask in self.masks.items():
            getattr(m, n).mul_(mask.to(getattr(m, n).dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Re-apply the masks after every ``optimizer.step()``."""
        self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply()))

    def detach_all(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def counts(self) -> tuple[int, int]:
        """(pruned, total) over the masked tensors."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return total - kept, total

    def sparsity(self) -> float:
        pruned, total = self.counts()
        return pruned / total if total else 0.0

    def clone(self) -> MaskSet:
        return MaskSet({k: v.clone() for k, v in self.masks.items()})

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        names = {id(m): n for n, m in model.named_modules()}
        return {f"{names[id(m)]}.{n}" if names[id(m)] else n: mask.clone() for (m, n), mask in self.masks.items()}

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, torch.Tensor]) -> MaskSet:
        modules = dict(model.named_modules())
        out = cls()
        for key, mask in state.items():
            mod_name, _, tensor = key.rpartition(".")
            if mod_name not in modules:
                raise ClassAwareError(f"The saved masks name module {mod_name!r}, which the model does not have.")
            out.set(modules[mod_name], tensor, mask)
        return out
