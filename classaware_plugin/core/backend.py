"""The backend contract of :class:`~classaware_plugin.core.FNConstrainedPruning`, and the part every
model-holding backend shares: fine-tune, evaluate, snapshot and restore a model, count what it costs.

A new backend subclasses :class:`PruningBackend` (anything) or :class:`ModelBackend` (a model pruned in place);
the optional methods have defaults here, so the controller and the job call them without asking.
"""
from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .distributed import model_signature
from .validation import ClassAwareError, check_loader
from .metrics import Evaluation, evaluate, predict
from .modelstate import restore_module, snapshot_module

Counter = Callable[[nn.Module, torch.Tensor], tuple[int, int]]
"""``counter(model, example_inputs) -> (parameters, MACs)``, e.g. :func:`classaware_plugin.measure.count_params_macs`."""


class PruningBackend(abc.ABC):
    """What the controller drives. ``measure()`` returns at least the key the target refers to."""

    @abc.abstractmethod
    def prune(self, fraction: float) -> None:
        """Remove about ``fraction`` of what remains; raise :class:`NothingToPrune` when nothing can be removed."""

    @abc.abstractmethod
    def finetune(self) -> None: ...

    @abc.abstractmethod
    def evaluate(self) -> Evaluation: ...

    def predict(self) -> tuple[Any, Any]:
        """Validation ``(labels, logits)`` as numpy arrays; needed by ``FNConstraint(operating_point='calibrated')``
        and by :class:`~classaware_plugin.core.FNGuarantee`."""
        raise NotImplementedError(f"{type(self).__name__} has no predict(): use FNConstraint(operating_point='argmax').")

    def predict_certification(self) -> tuple[Any, Any]:
        """Certification-split ``(labels, logits)``: data that chose nothing, read only by the certified rule
        (:class:`~classaware_plugin.core.FNGuarantee`)."""
        raise ClassAwareError(
            f"{type(self).__name__} has no certification split, which the certified rule (FNGuarantee) tests on. Give "
            "the backend cert_loader= (a part of the validation data that nothing else sees), or use the count rule "
            "(FNConstraint).")

    @abc.abstractmethod
    def snapshot(self) -> Any: ...

    @abc.abstractmethod
    def restore(self, state: Any) -> None: ...

    @abc.abstractmethod
    def measure(self) -> dict[str, float]: ...

    def max_fraction(self, key: str, target: float) -> float:
        """The largest step worth taking towards ``measure()[key] >= target`` (default: no limit)."""
        return 1.0

    def finalize(self) -> Any:
        """Called once after the loop on the last compliant state (e.g. NNI's speed-up). Default: nothing."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the model (default: nothing)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Counterpart of :meth:`state_dict`."""

    def signature(self) -> str:
        """A fingerprint of the pruned structure that the ranks of a distributed run compare after every step
        (default: :func:`~.distributed.model_signature` of ``self.model`` when the backend has one)."""
        model = getattr(self, "model", None)
        return model_signature(model) if isinstance(model, nn.Module) else ""


class ModelBackend(PruningBackend):
    """Base of the model backends: subclasses add ``prune(fraction)``.

    Snapshots are deep copies restored *in place* (the caller's reference to ``model`` stays valid), so channel
    counts, masks held as module state and weights come back bit for bit.

    With a ``counter`` and ``example_inputs`` the dense model's parameters and MACs are counted once, and
    :meth:`measure` reports ``params``, ``macs``, ``macs_reduction``, ``params_reduction`` (and
    ``latency_reduction`` with a ``latency_probe``) of :meth:`measured_model`, cached while :meth:`measure_key` is
    unchanged. Backends that measure something else (sparsity) override :meth:`measure`. ``cert_loader`` is the
    certified rule's held-out split (:class:`~classaware_plugin.core.FNGuarantee`).
    """

    def __init__(
        self,
        model: nn.Module,
        val_loader: Iterable[Any],
        important_classes: Sequence[int],
        finetune: Callable[[nn.Module], None] | None,
        example_inputs: torch.Tensor | None = None,
        counter: Counter | None = None,
        latency_probe: Callable[[nn.Module], float] | None = None,
        cert_loader: Iterable[Any] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
        check_loader("val_loader", val_loader, model)
        self.model = model
        self.val_loader = val_loader
        self.cert_loader = cert_loader  # the certified rule's held-out split: nothing but its test reads it
        self.important_classes = list(important_classes)
        self._finetune = finetune
        self.example_inputs = example_inputs
        self.counter = counter
        self.latency_probe = latency_probe  # probe(model) -> speed-up over the dense model
        self.dense_params: int | None = None
        self.dense_macs: int | None = None
        if counter is not None and example_inputs is not None:
            self.dense_params, self.dense_macs = counter(model, example_inputs)
        self._measured: tuple[Any, dict[str, float]] | None = None

    def finetune(self) -> None:
        if self._finetune is not None:
            self._finetune(self.model)

    def evaluate(self) -> Evaluation:
        return evaluate(self.model, self.val_loader, self.important_classes)

    def predict(self) -> tuple[Any, Any]:
        return predict(self.model, self.val_loader)

    def predict_certification(self) -> tuple[Any, Any]:
        if self.cert_loader is None:
            return super().predict_certification()
        return predict(self.model, self.cert_loader)

    def snapshot(self) -> Any:
        return snapshot_module(self.model)

    def restore(self, state: Any) -> None:
        restore_module(self.model, state)  # the measure cache is keyed by the architecture: still valid

    # ----------------------------------------------------------------- measuring
    def measured_model(self) -> nn.Module:
        """The model whose cost :meth:`measure` counts (NNI: the model its speed-up would produce)."""
        return self.model

    def measure_key(self) -> Any:
        """What :meth:`measure`'s cache is valid for (default: the parameter shapes)."""
        return tuple(tuple(p.shape) for p in self.model.parameters())

    def measure(self) -> dict[str, float]:
        if self.counter is None or self.example_inputs is None or self.dense_macs is None or self.dense_params is None:
            raise NotImplementedError(f"{type(self).__name__} has no counter: pass counter= and example_inputs=, or "
                                      "override measure().")
        key = self.measure_key()
        if self._measured is None or self._measured[0] != key:
            model = self.measured_model()
            params, macs = self.counter(model, self.example_inputs)
            out: dict[str, float] = {"params": params, "macs": macs, "macs_reduction": self.dense_macs / max(macs, 1),
                                     "params_reduction": self.dense_params / max(params, 1)}
            if self.latency_probe is not None:
                out["latency_reduction"] = self.latency_probe(model)
            self._measured = (key, out)
        return {**self._measured[1], **self.extra_measures()}

    def extra_measures(self) -> dict[str, float]:
        """Keys a subclass adds to every :meth:`measure` (NNI: its sparse ratio)."""
        return {}

    def max_fraction(self, key: str, target: float) -> float:
        """The channel fraction that should about reach a MACs or parameter ``target`` (both shrink about as
        (1 - f)^2 when f of every layer's channels go); 0.95 otherwise."""
        if key in ("macs_reduction", "params_reduction"):
            m = self.measure()
            if m[key] < target:
                return min(0.95, max(1e-3, 1.0 - math.sqrt(m[key] / target)))
        return 0.95

    def invalidate(self) -> None:
        """Forget cached measurements (after a restore or a load)."""
        self._measured = None

    # ----------------------------------------------------------------- persistence (exact resume)
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the model's own state: the dense model's counts (the reference of every
        reduction, which a resumed backend must not re-measure from the already-pruned model) and whatever a
        subclass adds (:meth:`extra_state`)."""
        return {"dense_params": self.dense_params, "dense_macs": self.dense_macs, **self.extra_state()}

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
