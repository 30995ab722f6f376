"""Several processes for one run.

- ``torchrun --nproc-per-node N -m classaware_plugin.cli run ...`` (one machine or many: torchrun's own flags): each
  process joins the process group (:func:`join`: NCCL on CUDA, gloo on the CPU) and runs the whole job on its share
  of the data; rank 0 alone writes files.
- ``classaware-prune run --nproc N ...`` checks the configuration, prepares the run directory and writes its
  ``config.yaml`` in the calling process, then starts N processes on this machine through ``torch.distributed.run``
  (:func:`launch`), each continuing that run directory.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..core.validation import ClassAwareError

log = logging.getLogger(__name__)

LAUNCHED = "CLASSAWARE_LAUNCHED"
"""Set by :func:`launch` for its processes: the run directory was prepared by the launching process."""


def under_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_splittable(cfg: dict[str, Any], processes: int) -> None:
    """Refuse, before any work, a configuration that cannot be split over ``processes``."""
    bs = cfg["data"]["batch_size"]
    if bs % processes:
        raise ClassAwareError(
            f"data.batch_size={bs} must be a multiple of the {processes} processes (each takes batch_size / "
            f"{processes} samples of every training batch, so the global batch stays {bs}). Choose e.g. "
            f"data.batch_size={bs - bs % processes or processes}.")
    device = distributed.resolve_device(cfg["device"])
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and processes > gpus:
        raise ClassAwareError(f"{processes} processes on device {cfg['device']!r} need {processes} GPUs on this machine; "
                              f"it has {gpus}. Use --nproc {gpus} or device: cpu.")


def join(cfg: dict[str, Any]) -> None:
    """Join the process group torchrun describes (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...): NCCL when the run's
    device is CUDA (each process on GPU ``LOCAL_RANK``), gloo otherwise. Processes other than rank 0 log warnings
    only and show no progress bars."""
    import torch.distributed as dist

    from ..core.progress import set_quiet

    world = int(os.environ["WORLD_SIZE"])
    check_splittable(cfg, world)
    device = distributed.resolve_device(cfg["device"])
    distributed.init_from_env(device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("classaware_plugin").setLevel(logging.WARNING)
        set_quiet(True)
    log.info("process group: %d processes (%s), device %s", world, dist.get_backend(), device)


def leave() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, run_dir: Path, run_flags: list[str], main_flags: list[str]) -> int:
    """Run ``classaware-prune run --resume run_dir`` in ``nproc`` processes on this machine (torchrun's standalone
    mode: a free port, no other machine). A process that fails ends the others; the run directory keeps what rank 0
    wrote, so the same command with ``--resume`` continues it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # torchrun's loggers set their own level (WARNING) on import: its notices (OMP_NUM_THREADS, signals sent to the
    # other processes) are not ours to print; its errors still show.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "classaware_plugin.cli",
                       *main_flags, "run", "--resume", str(run_dir), *run_flags])
    os.environ[LAUNCHED] = "1"
    try:
        run(args)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
        print(f"error: {failed} of the {nproc} processes failed and the rest were stopped (a failing process's own "
              f"message is above). The run directory keeps what it completed; continue with: classaware-prune run "
              f"--resume {run_dir} --nproc {nproc}", file=sys.stderr)
        # 2 when every process refused a mistake of the user's (as a single process would exit), else 1
        return 2 if all(f.exitcode == 2 for f in e.failures.values()) else 1
    finally:
        os.environ.pop(LAUNCHED, None)
    return 0
