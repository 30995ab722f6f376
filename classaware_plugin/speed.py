"""How fast a model runs: median latency in PyTorch and in onnxruntime, and the speed-up of a pruned model over its
dense original, measured interleaved in one process so that load on the machine affects both alike.

Used by the CLI's report and by ``python -m benchmarks speed``.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core.distributed import broadcast_object, is_main, model_device
from .export import cpu_copy
from .core.validation import Constraint, Interval, Options, check_choice, check_number, check_params

RUNTIMES = ("onnxruntime", "torch")

ROUND_TO = 8
"""Default channel rounding of structured pruning: pruned layers keep a multiple of 8 channels. Why 8: CPU and GPU
kernels work on channel blocks (8 fp32 lanes of AVX2, oneDNN's nChw8c/16c layouts, tensor-core tiles of 8), so
a layer left with an odd count runs padded or on a slow path. Measured in ``benchmarks/results/speed.md``."""
ROUND_TO_CONSTRAINT = Interval(1, 256, integer=True, nullable=True)
"""What ``round_to`` may be in every structured path (``None``: keep any channel count)."""


def _timed(run: Callable[[], Any]) -> float:
    t = time.perf_counter()
    run()
    return (time.perf_counter() - t) * 1000


def _runner(model: nn.Module, x: torch.Tensor, runtime: str, tmp: Path, name: str) -> Callable[[], Any]:
    """A no-argument call that runs ``model`` on ``x`` in ``runtime`` (ONNX exported into ``tmp`` and checked)."""
    model = model.eval()
    if runtime == "torch":  # on the model's device (a GPU is waited for, so the time is the forward pass's)
        device = model_device(model)
        x = x.to(device)

        def run_torch() -> Any:
            with torch.inference_mode():
                out = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return out
        return run_torch
    import onnxruntime as ort

    from .export import export_onnx

    path = tmp / f"{name}.onnx"
    # The legacy exporter: seconds faster per model than torch.export, and onnxruntime optimises either graph alike.
    export_onnx(model, x[: min(len(x), 4)], path, exporter="legacy")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # No spin-waiting: after a run, a session's idle workers spin for a while, and with two sessions interleaved the
    # one that just ran steals a core from the other. Measured (ResNet-18 64x64 at 3.2x fewer MACs, batch 64, 2 cores):
    # the pruned model took 72 ms interleaved with spinning against 36-50 ms alone or interleaved without, which
    # made the speed-up 2.1x instead of 3.1x. A deployed model runs alone in its process, where this does not arise.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: sess.run(None, feed)


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 30, runtime: str = "torch",
               warmup: int = 3) -> float:
    """Median latency (ms) of one forward pass on ``example`` (its batch size) in ``runtime``."""
    check_choice("runtime", runtime, RUNTIMES)
    check_number("repeats", repeats, low=1, integer=True)
    with tempfile.TemporaryDirectory() as tmp:
        run = _runner(model, example, runtime, Path(tmp), "model")
        for _ in range(warmup):
            run()
        return statistics.median(_timed(run) for _ in range(repeats))


@torch.no_grad()
def speedup(dense: nn.Module, pruned: nn.Module, input_shape: Sequence[int], batch_size: int = 64,
            runtimes: Sequence[str] = RUNTIMES, repeats: int = 15, warmup: int = 3) -> dict[str, dict[str, float]]:
    """Per runtime: median latency (ms) of ``dense`` and ``pruned`` on one random batch, measured interleaved
    (dense, pruned, dense, ...), and ``speedup = dense / pruned`` (above 1: the pruned model is faster)."""
    check_number("batch_size", batch_size, low=1, integer=True)
    check_number("repeats", repeats, low=1, integer=True)
    for r in runtimes:
        check_choice("runtime", r, RUNTIMES)
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0))
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in runtimes:
            runs = [_runner(m, x, runtime, Path(tmp), n) for m, n in ((dense, "dense"), (pruned, "pruned"))]
            for run in runs:
                for _ in range(warmup):
                    run()
            times: list[list[float]] = [[], []]
            for _ in range(repeats):
                for i, run in enumerate(runs):
                    times[i].append(_timed(run))
            d, p = statistics.median(times[0]), statistics.median(times[1])
            out[runtime] = {"dense_ms": d, "pruned_ms": p, "speedup": d / p, "batch_size": batch_size}
    return out


class LatencyProbe:
    """``probe(model) -> dense latency / model latency`` on this machine, measured interleaved with a copy of the
    dense model every time (so that load on the machine affects both alike): what a latency target is checked
    against. Timing is not deterministic, so neither are decisions taken on it (nor a resumed run's)."""

    PARAMETERS: dict[str, Constraint] = {"runtime": Options(RUNTIMES), "batch_size": Interval(1, integer=True),
                                         "repeats": Interval(1, integer=True)}

    def __init__(self, dense: nn.Module, input_shape: Sequence[int], batch_size: int = 64,
                 runtime: str = "onnxruntime", repeats: int = 10) -> None:
        import copy

        check_params(self.PARAMETERS, {"runtime": runtime, "batch_size": batch_size, "repeats": repeats})
        self.dense = copy.deepcopy(dense).cpu().eval()
        self.input_shape, self.batch_size, self.runtime, self.repeats = tuple(input_shape), batch_size, runtime, repeats

    def __call__(self, model: nn.Module) -> float:
        """The measured speed-up. Under torch.distributed rank 0 measures (on the CPU, from copies when the models
        are elsewhere) and every rank gets its number, so all take the same decision."""
        value = None
        if is_main():
            result = speedup(self.dense, cpu_copy(model), self.input_shape, batch_size=self.batch_size,
                             runtimes=(self.runtime,), repeats=self.repeats)
            value = result[self.runtime]["speedup"]
        return float(broadcast_object(value))
