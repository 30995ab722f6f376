"""The part of a pruning backend every framework shares: fine-tune, evaluate, snapshot and restore a model."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import nn

from .metrics import Evaluation, evaluate
from .modelstate import restore_module, snapshot_module


class ModelBackend:
    """Base of the backends: subclasses add ``prune(fraction)`` and ``measure()``.

    Snapshots are deep copies restored *in place* (the caller's reference to ``model`` stays valid), so channel
    counts, masks held as module state and weights come back bit for bit.
    """

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any],
        important_classes: Sequence[int],
        finetune: Callable[[nn.Module], None] | None,
    ) -> None:
        self.model = model
        self.val_loader = val_loader
        self.important_classes = list(important_classes)
        self._finetune = finetune

    def finetune(self) -> None:
        if self._finetune is not None:
            self._finetune(self.model)

    def evaluate(self) -> Evaluation:
        return evaluate(self.model, self.val_loader, self.important_classes)

    def snapshot(self) -> Any:
        return snapshot_module(self.model)

    # ----------------------------------------------------------------- persistence (exact resume)
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model's own state: the dense model's counts (the reference of every
        reduction, which a resumed backend must not re-measure from the already-pruned model) and whatever a
        subclass adds (:meth:`extra_state`)."""
        return {"dense_params": getattr(self, "dense_params", None), "dense_macs": getattr(self, "dense_macs", None),
                **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after the backend was built on the checkpointed model)."""
        for key in ("dense_params", "dense_macs"):
            if state.get(key) is not None:
                setattr(self, key, state[key])
        self.load_extra_state(state)
        self.invalidate()

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Counterpart of :meth:`extra_state`."""

    def invalidate(self) -> None:
        """Forget cached measurements (after a restore or a load)."""

    def restore(self, state: Any) -> None:
        restore_module(self.model, state)
