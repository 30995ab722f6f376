"""Save, load and export pruned models (framework-neutral; used by both adapters and the CLI).

- ``save_model``: the whole pickled module (structure included), written atomically; read it back with
  ``load_model`` (:mod:`classaware_plugin.files`, re-exported here), which loads it with ``weights_only=True``.
- ``export_onnx``: ONNX file (torch.export-based exporter, legacy fallback) checked against onnxruntime; returns the
  max abs difference.
- ``export_torchscript``: traced TorchScript file, reloaded and compared.
"""
from __future__ import annotations

import copy
import errno
import glob
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .core.validation import ClassAwareError, run_model
from .files import load_model

__all__ = ["TEMP_SUFFIX", "atomic_save", "atomic_write", "atomic_write_text", "cpu_copy", "export_onnx", "export_torchscript",
           "leftover_temp_files", "load_model", "save_model"]

log = logging.getLogger(__name__)


TEMP_SUFFIX = ".partial"
"""Ends the name of the temporary file an atomic write renames into place (``.NAME.<random>.partial``)."""


def leftover_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary files that atomic writes of ``path`` left behind when the process was killed mid-write (only names
    of the form ``atomic_write`` creates, so a user's own files beside ``path`` never match)."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in the same folder, then an atomic rename onto ``path``.

    A crash at any moment leaves either the old file or the new one, never a half-written one; so does a full disk,
    which raises an ``OSError`` that says so. The file gets the permissions an ordinary ``open(path, "w")`` would
    give it (mkstemp's are owner-only).
    """
    path = _writable(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as e:
        raise ClassAwareError(f"Cannot write {str(path)!r}: {e.strerror or e}. Choose a writable location.") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"No space left on the device while writing {path} ({os.strerror(e.errno)}); "
                                   f"{'its previous version is intact' if path.exists() else 'nothing was written'}. "
                                   "Free some space, then resume") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _writable(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path whose folder exists (created), or a :class:`ClassAwareError` that names it: a directory, or a
    folder that cannot be created."""
    if not isinstance(path, (str, os.PathLike)):
        raise ClassAwareError(f"The 'path' parameter must be a file path. Got {type(path).__name__}.")
    path = Path(path)
    if path.is_dir():
        raise ClassAwareError(f"Cannot write {str(path)!r}: it is a directory. Give the path of a file in it.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClassAwareError(f"Cannot write {str(path)!r}: its folder cannot be created ({e.strerror or e}). Choose a "
                              "writable location.") from None
    return path


def _check_model(model: Any, example_inputs: Any = None) -> None:
    """A module (and, given an example, one it can run on) or a :class:`ClassAwareError` naming the parameter."""
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor):
            raise ClassAwareError(f"The 'example_inputs' parameter must be a tensor. Got {type(example_inputs).__name__}.")
        with torch.no_grad():
            run_model(model.eval(), example_inputs, 1, what="'example_inputs' batch")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save`` written atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """A text file written atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """The whole module, written atomically from the CPU (loads on a machine without the GPU it was trained on)."""
    _check_model(model)
    atomic_save(cpu_copy(model), path)


def cpu_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it is on the CPU, else a copy moved there (the original stays where it is)."""
    from .core.distributed import model_device

    return model if model_device(model).type == "cpu" else copy.deepcopy(model).cpu()


EXPORTERS = ("auto", "dynamo", "legacy")
PROTOBUF_LIMIT = 1_800_000_000
"""Bytes of weights above which the ONNX file keeps them beside it (``NAME.data``): one protobuf holds at most 2 GB."""


@torch.no_grad()
def export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike[str],
                exporter: str = "auto") -> float:
    """Export to ONNX (dynamic batch) and return max |torch - onnxruntime| on ``example_inputs``.

    ``exporter='auto'`` uses PyTorch's current exporter (``torch.onnx.export(dynamo=True)``, built on torch.export)
    and falls back to the legacy TorchScript-based one, logging why, when the model cannot be exported that way;
    ``'dynamo'`` or ``'legacy'`` forces one. The file is written atomically.
    """
    from .core.validation import check_choice

    check_choice("exporter", exporter, EXPORTERS)
    _check_model(model)
    model = cpu_copy(model).eval()  # exported from the CPU, where onnxruntime checks it
    _check_model(model, example_inputs.cpu() if isinstance(example_inputs, torch.Tensor) else example_inputs)
    example_inputs = example_inputs.cpu()
    path = _writable(path)
    # Written and checked in a temporary folder beside ``path``, then renamed into place: a crash or a full disk
    # leaves the previous export (or none), never a half-written one.
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX))
    try:
        diff = _export_onnx(model, example_inputs, tmp / path.name, exporter)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):  # the .onnx last: its data before it
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return diff


def _export_onnx(model: nn.Module, example_inputs: torch.Tensor, path: Path, exporter: str) -> float:
    import onnxruntime as ort

    names = {"input_names": ["input"], "output_names": ["logits"]}
    used = "legacy"
    if exporter != "legacy":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # One self-contained file, unless the weights exceed what one protobuf may hold (2 GB).
                large = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > PROTOBUF_LIMIT
                torch.onnx.export(model, (example_inputs,), str(path), dynamo=True, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=large, **names)
            used = "dynamo"
        except Exception as e:  # noqa: BLE001 - torch.export's failures are many and version-dependent
            if exporter == "dynamo":
                raise
            log.warning("ONNX: torch.export could not export %s (%s: %s); using the legacy exporter",
                        type(model).__name__, type(e).__name__, " ".join(str(e).split())[:200])
    if used == "legacy":
        for f in path.parent.iterdir():  # what the failed export left in the temporary folder
            f.unlink()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its own deprecation notice: the fallback is deliberate
            torch.onnx.export(model, (example_inputs,), str(path), dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              dynamo=False, **names)
    log.debug("ONNX: %s written with the %s exporter", path, used)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ours = model(example_inputs).numpy()
    theirs = sess.run(None, {"input": example_inputs.numpy()})[0]
    return float(np.abs(ours - theirs).max())


@torch.no_grad()
def export_torchscript(model: nn.Module, example_inputs: torch.Tensor, path: str | os.PathLike[str]) -> float:
    """Trace to TorchScript, save (atomically), reload, and return max |eager - reloaded|."""
    _check_model(model, example_inputs)
    model.eval()
    traced = torch.jit.trace(model, example_inputs)
    path = _writable(path)
    atomic_write(path, lambda tmp: traced.save(tmp))
    loaded = torch.jit.load(str(path))
    return float((model(example_inputs) - loaded(example_inputs)).abs().max())
