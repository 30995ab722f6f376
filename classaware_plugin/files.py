"""Loading the files users hand us: one function per kind of file, safe by default, with errors that say what is wrong.

Safety. ``torch.load(weights_only=False)`` runs whatever the file's pickle asks for, so a planted checkpoint can
execute code. Every loader here reads with ``weights_only=True`` and allows, besides what PyTorch allows itself
(tensors, containers, numbers), only *classes* that are ``torch.nn.Module`` subclasses (or ``torch.nn.utils.prune``
methods) defined in PyTorch, torchvision or this package, plus ``functools.partial``. A file that names anything
else is refused before a byte of it is unpickled, with the names it holds. To load it anyway:

- you trust the file: ``trusted=True`` (CLI: ``--trust-checkpoint``), which unpickles it in full;
- it holds your own model classes: ``allow_modules=("mypkg.",)`` or ``torch.serialization.add_safe_globals``.

Kinds: :func:`load_model` (a whole pickled module), :func:`load_checkpoint` (a module or a state_dict loaded into
an architecture you build), :func:`load_object` (anything else of ours: run states, masks, TP states).
"""
from __future__ import annotations

import functools
import importlib
import os
import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.validation import ClassAwareError

TRUSTED_MODULES = ("torch.nn.", "torchvision.models.", "torchvision.ops.", "classaware_plugin.")
"""Module prefixes whose ``nn.Module`` classes a file may name without ``trusted=True``."""

_SAFE_EXTRAS = {"functools.partial": functools.partial}


class CheckpointError(ClassAwareError):
    """A file that does not exist, cannot be read, or does not hold what was expected."""


class UntrustedCheckpointError(CheckpointError):
    """A file that names objects outside the allowed classes and was not marked as trusted."""


def _resolve(name: str) -> Any:
    """The object a pickle global ``module.qualname`` names (only called for names under a trusted prefix)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _allowed(name: str, prefixes: tuple[str, ...]) -> Any:
    """The class ``name`` resolves to when a file may name it without trust, else ``None``."""
    if name in _SAFE_EXTRAS:
        return _SAFE_EXTRAS[name]
    if not name.startswith(prefixes):
        return None
    obj = _resolve(name)
    if isinstance(obj, type) and (issubclass(obj, nn.Module) or issubclass(obj, torch.nn.utils.prune.BasePruningMethod)):
        return obj
    return None


def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        raise CheckpointError(f"The {what} {str(path)!r} does not exist.")
    if not path.is_file():
        raise CheckpointError(f"The {what} {str(path)!r} is a directory, not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"The {what} {str(path)!r} is empty (0 bytes); it was not written completely.")


def load_object(path: str | os.PathLike[str], *, what: str = "file", trusted: bool = False,
                allow_modules: Iterable[str] = ()) -> Any:
    """Read a ``torch.save`` file. Refuses, before unpickling, a file that names objects outside the allowed classes
    unless ``trusted``; turns every read failure into a :class:`CheckpointError` naming the file and ``what``."""
    path = Path(path)
    _check_file(path, what)
    if trusted:
        return _read(path, what, weights_only=False)
    prefixes = TRUSTED_MODULES + tuple(allow_modules)
    safe: list[Any] = []
    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] != b"\x80":  # torch.save writes a zip archive (or, before torch 1.6, a pickle: protocol byte 0x80)
            raise CheckpointError(
                f"The {what} {str(path)!r} is not a PyTorch file: neither the zip archive torch.save writes nor a "
                f"pickle (it begins with {head!r})."
            )
    if is_zip:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # noqa: BLE001 - any failure here means the file is not a readable checkpoint
            raise CheckpointError(f"The {what} {str(path)!r} is not a readable PyTorch file ({_why(e)}).") from None
        refused = []
        for name in names:
            obj = _allowed(name, prefixes)
            (refused.append(name) if obj is None else safe.append(obj))
        if refused:
            shown = ", ".join(sorted(refused)[:6]) + (", ..." if len(refused) > 6 else "")
            raise UntrustedCheckpointError(
                f"The {what} {str(path)!r} names objects that loading would create or call: {shown}. Only PyTorch, "
                "torchvision and classaware_plugin module classes load without trust, because unpickling a file can "
                "run code. If you trust this file, pass trusted=True (CLI: --trust-checkpoint); for your own model "
                "classes, allow_modules=('yourpackage.',) or torch.serialization.add_safe_globals."
            )
    with torch.serialization.safe_globals(safe):
        return _read(path, what, weights_only=True)


def _read(path: Path, what: str, *, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        if weights_only and "weights_only" in str(e):
            raise UntrustedCheckpointError(
                f"The {what} {str(path)!r} holds objects that a weights-only load refuses ({_why(e)}). If you trust "
                "this file, pass trusted=True (CLI: --trust-checkpoint)."
            ) from None
        raise CheckpointError(f"The {what} {str(path)!r} is not a readable PyTorch file ({_why(e)}).") from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, IndexError, KeyError,
            TypeError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"The {what} {str(path)!r} is not a readable PyTorch file ({_why(e)}).") from None


def _why(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def load_model(path: str | os.PathLike[str], map_location: str = "cpu", *, trusted: bool = False,
               allow_modules: Iterable[str] = ()) -> nn.Module:
    """A whole module saved by :func:`classaware_plugin.export.save_model` (or ``torch.save(model)``), in eval mode."""
    obj = load_object(path, what="model file", trusted=trusted, allow_modules=allow_modules)
    if not isinstance(obj, nn.Module):
        raise CheckpointError(
            f"The model file {str(path)!r} holds a {_describe(obj)}, not a whole torch.nn.Module. A state_dict needs "
            "its architecture: use load_checkpoint(path, build) (CLI: model.checkpoint with model.name)."
        )
    return obj.to(map_location).eval()


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
"""Keys under which training scripts commonly nest the weights in a checkpoint dict."""


def load_checkpoint(path: str | os.PathLike[str], build: Callable[[], nn.Module], *, trusted: bool = False,
                    allow_modules: Iterable[str] = ()) -> nn.Module:
    """A model checkpoint: a whole module, a state_dict, or a dict nesting one under a key of
    :data:`STATE_DICT_KEYS`. A state_dict is loaded strictly into ``build()``; mismatches are reported by name."""
    obj = load_object(path, what="model checkpoint", trusted=trusted, allow_modules=allow_modules)
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        nested = [k for k in STATE_DICT_KEYS if k in obj]
        if nested:
            obj = obj[nested[0]]
            if isinstance(obj, nn.Module):
                return obj
    if not _is_state_dict(obj):
        raise CheckpointError(
            f"The model checkpoint {str(path)!r} holds a {_describe(obj)}; expected a torch.nn.Module, a state_dict "
            f"(names -> tensors) or a dict with one under {' / '.join(map(repr, STATE_DICT_KEYS))}."
        )
    model = build()
    load_weights(model, obj, source=f"The model checkpoint {str(path)!r}")
    return model


def load_weights(model: nn.Module, state: Mapping[str, Any], *, source: str = "The state_dict") -> None:
    """``model.load_state_dict(state)`` (strict), with missing / unexpected / mismatched keys named in the error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(
            f"{source} does not fit the model {type(model).__name__}: {'; '.join(parts)}. It was saved from another "
            "architecture or another width/depth: set model.name and model.kwargs to the ones it was trained with."
        )
    model.load_state_dict(state)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _describe(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)[:5]
        return f"{type(obj).__name__} with keys {keys}{' ...' if len(obj) > 5 else ''}"
    return type(obj).__name__
