"""Parameter checks shared by every public entry point.

Errors read like scikit-learn's: they name the parameter, what is allowed and what was received,
and they are raised before any work is done.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ClassAwareError(ValueError):
    """Base class of the errors this package raises for bad input."""


def _fmt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:100]}... ({type(value).__name__})"


def check_int_list(name: str, values: Any, *, low: int, high: int | None, min_len: int = 1) -> list[int]:
    """Validate a list of distinct integers in ``[low, high)`` and return it as a list."""
    if isinstance(values, (int,)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise ClassAwareError(f"The '{name}' parameter must be a list of integers. Got {_fmt(values)} instead.")
    try:
        out = list(values)
    except TypeError:  # an iterable type that cannot iterate this value (a 0-d tensor)
        raise ClassAwareError(f"The '{name}' parameter must be a list of integers. Got {_fmt(values)} instead.") from None
    if len(out) < min_len:
        raise ClassAwareError(f"The '{name}' parameter must hold at least {min_len} value(s). Got {_fmt(out)} instead.")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ClassAwareError(f"The '{name}' parameter must hold integers. Got {_fmt(v)} in {_fmt(out)}.")
        upper = "inf" if high is None else str(high)
        if v < low or (high is not None and v >= high):
            raise ClassAwareError(
                f"The '{name}' parameter must hold integers in the range [{low}, {upper}). Got {v} in {_fmt(out)}."
            )
    if len(set(out)) != len(out):
        raise ClassAwareError(f"The '{name}' parameter must not repeat a value. Got {_fmt(out)} instead.")
    return [int(v) for v in out]


def check_number_list(name: str, values: Any, *, low: float = 0.0, integer: bool = False, min_len: int = 1) -> list:
    """Validate a list (or 1-D tensor or array) of finite numbers ``>= low`` with at least ``min_len`` entries."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        if getattr(values, "ndim", 1) != 1:
            raise ClassAwareError(f"The '{name}' parameter must be a 1-D list of numbers. Got an array of shape "
                                  f"{tuple(values.shape)}.")
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise ClassAwareError(f"The '{name}' parameter must be a list of numbers. Got {_fmt(values)} instead.")
    out = list(values)
    if len(out) < min_len:
        raise ClassAwareError(f"The '{name}' parameter must list at least {min_len} numbers. Got {_fmt(out)}.")
    kind = "integers" if integer else "numbers"
    for v in out:
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not math.isfinite(v) or v < low:
            raise ClassAwareError(f"The '{name}' parameter must hold finite {kind} >= {low:g}. Got {_fmt(v)} in "
                                  f"{_fmt(out)}.")
    return out


MAX_CLASSES = 1_000_000
"""The most classes a model may have here (per-class statistics and metrics are dense over the classes)."""


def check_num_classes(value: Any, name: str = "num_classes") -> int:
    """A number of classes: an integer in ``[2, MAX_CLASSES]``."""
    return int(check_number(name, value, low=2, high=MAX_CLASSES, integer=True))


def check_important_classes(values: Any, num_classes: int | None) -> list[int]:
    """Validate ``important_classes`` against the number of classes (when known)."""
    if num_classes is not None:
        check_num_classes(num_classes)
    return check_int_list("important_classes", values, low=0, high=num_classes)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    what: str = "parameter",
) -> float:
    """Validate a finite number in a (possibly open) interval and return it. ``what`` names the kind of setting in
    the message (``'parameter'``, or ``'configuration key'`` for the CLI)."""
    kind = "an integer" if integer else "a number"
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ClassAwareError(f"The '{name}' {what} must be {kind} in the range {rng}. Got {_fmt(value)} instead.")
    if not math.isfinite(float(value)):
        raise ClassAwareError(f"The '{name}' {what} must be {kind} in the range {rng}. Got {_fmt(value)} instead.")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        raise ClassAwareError(f"The '{name}' {what} must be {kind} in the range {rng}. Got {_fmt(value)} instead.")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any], what: str = "parameter") -> Any:
    """Validate that ``value`` is one of ``choices``."""
    if isinstance(value, bool) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ClassAwareError(f"The '{name}' {what} must be one of {allowed}. Got {_fmt(value)} instead.")
    return value


@dataclass(frozen=True)
class Interval:
    """A number in ``[low, high]`` (each end open or closed, ``None``: unbounded), optionally an integer."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    nullable: bool = False

    def check(self, name: str, value: Any, what: str = "parameter") -> Any:
        if value is None and self.nullable:
            return None
        return check_number(name, value, low=self.low, high=self.high, low_open=self.low_open,
                            high_open=self.high_open, integer=self.integer, what=what)

    def describe(self) -> str:
        """What is allowed, in words (the configuration reference prints it)."""
        lo, hi = "(" if self.low_open else "[", ")" if self.high_open else "]"
        rng = f"{lo}{'-inf' if self.low is None else _num_text(self.low)}, {'inf' if self.high is None else _num_text(self.high)}{hi}"
        return f"{'integer' if self.integer else 'number'} in {rng}{_or_null(self)}"


@dataclass(frozen=True)
class Options:
    """One of a fixed set of values."""

    choices: tuple[Any, ...]
    nullable: bool = False

    def check(self, name: str, value: Any, what: str = "parameter") -> Any:
        if value is None and self.nullable:
            return None
        return check_choice(name, value, self.choices, what=what)

    def describe(self) -> str:
        return "one of " + ", ".join(str(c) for c in self.choices) + _or_null(self)


@dataclass(frozen=True)
class PerClass:
    """One value for every important class, or a mapping ``class -> value``; each value satisfies ``each`` (which
    classes a mapping may name is checked where the important classes are known)."""

    each: Interval
    nullable: bool = False

    def check(self, name: str, value: Any, what: str = "parameter") -> Any:
        if value is None and self.nullable:
            return None
        if isinstance(value, Mapping):
            for v in value.values():
                self.each.check(name, v, what)
            return value
        return self.each.check(name, value, what)

    def describe(self) -> str:
        return f"{self.each.describe()}, or {{class: value}}{_or_null(self)}"


def check_class_keys(name: str, value: Any, important_classes: Sequence[int]) -> None:
    """A per-class mapping (:class:`PerClass`) may name important classes only."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(important_classes))
        if unknown:
            raise ClassAwareError(f"The '{name}' parameter names classes {unknown} that are not important classes "
                                  f"{list(important_classes)}.")


@dataclass(frozen=True)
class InstanceOf:
    """An object of one of ``types``."""

    types: tuple[type, ...]
    nullable: bool = False

    def check(self, name: str, value: Any, what: str = "parameter") -> Any:
        if (value is None and self.nullable) or isinstance(value, self.types):
            return value
        raise ClassAwareError(f"The '{name}' {what} must be {self.describe()}. Got {_fmt(value)} instead.")

    def describe(self) -> str:
        names = {"bool": "true or false", "str": "text", "dict": "a mapping", "list": "a list"}
        return " or ".join(names.get(t.__name__, t.__name__) for t in self.types) + _or_null(self)


def _or_null(c: Any) -> str:
    return ", or null" if c.nullable else ""


def _num_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


Constraint = Interval | Options | PerClass | InstanceOf
"""What a public class declares per parameter in its ``PARAMETERS`` mapping (scikit-learn's
``_parameter_constraints`` in spirit): checked by :func:`check_params`, and by the CLI for the configuration keys
that feed that parameter, so the rule and its message exist once."""


def check_params(constraints: Mapping[str, Constraint], values: Mapping[str, Any]) -> None:
    """Check each of ``values`` that ``constraints`` declares."""
    for name, value in values.items():
        if name in constraints:
            constraints[name].check(name, value)


def check_non_empty_loader(name: str, loader: Any) -> None:
    """Reject a loader with no batches (``len`` is used when the loader has one)."""
    try:
        n = len(loader)
    except TypeError:
        return
    if n == 0:
        raise ClassAwareError(f"The '{name}' parameter must yield at least one batch. Got an empty loader.")


def check_loader(name: str, loader: Any, model: Any = None, num_classes: int | None = None) -> None:
    """Refuse, before any work, a loader that yields nothing, whose first batch is not ``(inputs, labels)`` tensors
    with integer labels (in ``[0, num_classes)``, or the model's output width when a ``model`` is given), or whose
    inputs the model cannot take. The message names the parameter. Peeking at the first batch leaves the loader's
    shuffling (its generator, or torch's global one) where it was."""
    import torch

    if loader is None or isinstance(loader, (str, bytes)):
        raise ClassAwareError(f"The '{name}' parameter must be a loader of (inputs, labels) batches. Got {loader!r}.")
    check_non_empty_loader(name, loader)
    generator = getattr(loader, "generator", None)
    states = (torch.get_rng_state(), generator.get_state() if isinstance(generator, torch.Generator) else None)
    try:
        first = next(iter(loader), None)
    except TypeError:
        raise ClassAwareError(f"The '{name}' parameter must be an iterable of (inputs, labels) batches. Got "
                              f"{type(loader).__name__}.") from None
    finally:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            generator.set_state(states[1])
    if first is None:
        raise ClassAwareError(f"The '{name}' parameter must yield at least one batch. Got an empty loader.")
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise ClassAwareError(f"The '{name}' parameter must yield (inputs, labels) batches. Its first batch is a "
                              f"{type(first).__name__}.")
    x, y = first[0], first[1]
    try:
        check_batch(1, x, y, num_classes)
    except ClassAwareError as e:
        raise ClassAwareError(f"The '{name}' parameter: {e}") from None
    if model is None:
        return
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            from .distributed import model_device  # distributed imports this module

            device = model_device(model)
            out = run_model(model, x[:2].to(device), 1, what=f"'{name}' batch")
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and num_classes is None and y.numel() and (
            int(y.min()) < 0 or int(y.max()) >= out.shape[1]):
        raise ClassAwareError(f"The '{name}' parameter holds labels outside [0, {out.shape[1]}) for a model with "
                              f"{out.shape[1]} outputs: {sorted(set(y[(y < 0) | (y >= out.shape[1])].tolist()))[:5]}.")


def check_batch(index: int, inputs: Any, targets: Any, num_classes: int | None = None, what: str = "batch") -> None:
    """Refuse a batch whose labels are not integer class indices (float, one-hot, out of range) or whose inputs hold
    NaN/inf, naming the batch (1-based) and the offending value."""
    import torch

    where = f"{what.capitalize()} {index}"
    if not isinstance(targets, torch.Tensor) or not isinstance(inputs, torch.Tensor):
        raise ClassAwareError(
            f"{where} must be (inputs, labels) tensors. Got ({type(inputs).__name__}, {type(targets).__name__})."
        )
    if inputs.ndim == 0:
        raise ClassAwareError(f"{where} has 0-dimensional inputs; expected a batch (batch, ...).")
    _check_labels(where, "has labels", targets, inputs.shape[0], num_classes)
    if inputs.dtype.is_floating_point and not bool(torch.isfinite(inputs).all()):
        raise ClassAwareError(f"{where} has NaN or inf in its inputs; clean the data (no score or metric is computed).")


def _check_labels(where: str, verb: str, targets: Any, n: int, num_classes: int | None) -> None:
    import torch

    if not isinstance(targets, torch.Tensor):
        raise ClassAwareError(f"{where} must be a tensor of class indices. Got {type(targets).__name__}.")
    if targets.ndim != 1 or targets.shape[0] != n:
        raise ClassAwareError(
            f"{where} {verb} of shape {tuple(targets.shape)} for {n} inputs; expected ({n},) class indices "
            "(one-hot labels: use y.argmax(1))."
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ClassAwareError(
            f"{where} {verb} of dtype {targets.dtype} (float labels would be truncated); expected integer class "
            "indices (torch.long)."
        )
    if num_classes is not None and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        bad = targets[(targets < 0) | (targets >= num_classes)]
        raise ClassAwareError(f"{where} {verb} outside [0, {num_classes}): {sorted(set(bad.tolist()))[:5]}.")


def check_labels(name: str, targets: Any, n: int, num_classes: int | None = None) -> None:
    """Refuse labels that are not ``n`` integer class indices in ``[0, num_classes)``, naming the parameter."""
    _check_labels(f"The '{name}' parameter", "holds labels", targets, n, num_classes)


def run_model(model: Any, inputs: Any, index: int, what: str = "batch") -> Any:
    """``model(inputs)``; a batch the model cannot take (wrong channels or size) is reported with its shape."""
    try:
        return model(inputs)
    except RuntimeError as e:
        if "size" not in str(e) and "shape" not in str(e) and "channels" not in str(e):
            raise
        raise ClassAwareError(
            f"The model cannot run on {what} {index} (inputs of shape {tuple(inputs.shape)}): "
            f"{' '.join(str(e).split())[:300]}"
        ) from None
