"""Where the work runs: the device, and several processes under ``torch.distributed``.

Nothing here changes a single-process run: every function is the identity (or a no-op) unless
``torch.distributed`` is initialised with more than one process. When it is (``torchrun``, or
``classaware-prune run --nproc N``):

- the statistics of a score (:class:`~classaware_plugin.core.statistics.BucketStatistics`) all-reduce their
  per-bucket sums and sample counts at the end of ``collect``: every rank gets the scores of the union of the
  ranks' calibration samples;
- :func:`~classaware_plugin.core.metrics.predict` (and so ``evaluate``, the FN rule, calibration) all-gathers labels
  and logits: every rank computes the same metrics over the whole split and takes the same accept / retry / stop
  decision; :func:`~classaware_plugin.core.training.validation_loss` all-reduces its sum and count;
- :func:`~classaware_plugin.core.training.train` runs the model through ``DistributedDataParallel``;
- the controller compares a fingerprint of the pruned shapes across ranks after every step
  (:func:`check_consistent`) and raises :class:`RanksDivergedError` if they differ.

:func:`shard_loader` gives each rank its share of a loader: training shards of one permutation drawn alike on every
rank (so the union of the ranks' k-th batches is the one-process run's k-th batch when the per-rank batch is the
global batch divided by the number of processes); evaluation shards with no sample repeated (exact counts).
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from .validation import ClassAwareError

log = logging.getLogger(__name__)

DEVICES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


class RanksDivergedError(RuntimeError):
    """The processes of a distributed run no longer agree (different pruned shapes, different decisions)."""


# ----------------------------------------------------------------------------- device
def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """``'auto'`` (CUDA when available, else CPU), ``'cpu'``, ``'cuda'`` or ``'cuda:N'`` as a :class:`torch.device`.

    Under ``torchrun`` with CUDA, ``'auto'`` and ``'cuda'`` mean this process's GPU (``LOCAL_RANK``). Refuses a CUDA
    device that this machine does not have, naming the devices it has.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not (spec in ("auto", "cpu", "cuda") or
                                         (spec.startswith("cuda:") and spec[5:].isdigit())):
        raise ClassAwareError(f"The device must be {DEVICES}. Got {spec!r}.")
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec in ("auto", "cuda"):
        index = local_rank() % max(count, 1)
    else:
        index = int(spec[5:])
    if index >= count:
        raise ClassAwareError(
            f"The device {spec!r} does not exist on this machine: it has "
            f"{'no CUDA device' if count == 0 else f'{count} CUDA device(s), cuda:0 to cuda:{count - 1}'}. "
            f"Use 'cpu' or 'auto'."
        )
    return torch.device("cuda", index)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- processes
def is_distributed() -> bool:
    """Whether ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``, set by torchrun; 0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """Rank 0, or a single process: the one that writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def init_from_env(device: torch.device) -> None:
    """Join the process group that torchrun's environment describes (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``...):
    NCCL when ``device`` is a GPU (made this process's current device), gloo otherwise."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _comm_device() -> torch.device:
    """Where collectives run: the current GPU for NCCL, the CPU otherwise (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The element-wise sum over ranks of each tensor (every rank passes tensors of the same shapes, in the same
    order). Returns new tensors on the devices and with the dtypes given; the inputs are left as they are."""
    if not is_distributed():
        return [t.clone() for t in tensors]
    if not tensors:
        return []
    dev = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].reshape(t.shape).to(t.device, t.dtype))
        i += t.numel()
    return out


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank concatenated along the first dimension, in rank order (the first dimension may differ
    between ranks; the others must agree). The result is on ``t``'s device."""
    if not is_distributed():
        return t
    dev = _comm_device()
    n = torch.tensor([t.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(int(s) for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t.to(dev)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (what rank 0 decided, e.g. whether a file exists)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, masks): DDP's forward broadcasts them before
    each step, so after the last step they differ by that step's update."""
    if not is_distributed():
        return
    for b in model.buffers():
        if b.is_floating_point() or b.dtype in (torch.int64, torch.int32, torch.bool):
            t = b.detach().to(_comm_device())
            dist.broadcast(t, src=0)
            b.data.copy_(t.to(b.device))


def model_signature(model: nn.Module) -> str:
    """A fingerprint of a model's structure: every parameter's and buffer's name and shape, and the number of
    non-zero entries of pruning masks (``*_mask`` buffers of torch.nn.utils.prune)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if name.endswith("_mask"):
            h.update(f"={int(torch.count_nonzero(t))}".encode())
    return h.hexdigest()


def check_consistent(value: Any, what: str) -> None:
    """Raise :class:`RanksDivergedError` unless every rank passes an equal ``value`` (e.g. :func:`model_signature`)."""
    if not is_distributed():
        return
    values = all_gather_objects(value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RanksDivergedError(
            f"The processes diverged: {what} on rank(s) {differ} differs from rank 0's. Every rank must see the same "
            "model, configuration and calibration statistics; this is a bug or a nondeterministic operation, not "
            "something to tune."
        )


# ----------------------------------------------------------------------------- loaders
class ShardSampler(Sampler[int]):
    """This rank's share of ``n`` samples: positions ``rank, rank + world, ...`` of an order of all ``n``.

    ``shuffle``: the order is ``torch.randperm(n, generator=generator)``, drawn exactly as :class:`RandomSampler`
    draws it (one permutation per epoch and one more when the epoch's iterator runs out), so ranks whose generators
    share a seed share the permutation, and the draws match a one-process run's. ``pad``: the order is extended by its
    first entries to a multiple of ``world`` so every rank has the same number of samples (training: DDP needs the
    same number of steps everywhere); without it no sample is repeated (evaluation: exact counts, uneven shares).
    """

    def __init__(self, n: int, rank: int, world: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, pad: bool = False) -> None:
        if shuffle and generator is None:
            raise ClassAwareError("A shuffling ShardSampler needs a generator seeded alike on every rank.")
        if not 0 <= rank < world:
            raise ClassAwareError(f"The rank must lie in [0, {world}). Got {rank}.")
        self.n, self.rank, self.world, self.shuffle, self.generator, self.pad = n, rank, world, shuffle, generator, pad

    def __len__(self) -> int:
        if self.pad:
            return math.ceil(self.n / self.world)
        return len(range(self.rank, self.n, self.world))

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=self.generator).tolist() if self.shuffle else list(range(self.n))
        if self.pad and self.n % self.world:
            order += order[: self.world - self.n % self.world]
        yield from order[self.rank::self.world]
        if self.shuffle:  # RandomSampler's end-of-epoch draw: the generator moves on exactly as in one process
            torch.randperm(self.n, generator=self.generator)


def shard_loader(loader: DataLoader, train: bool = False, rank_: int | None = None,
                 world: int | None = None) -> DataLoader:
    """The same loader over this rank's share of the data (the loader itself in a single process).

    ``train=True``: a shuffled, padded share (:class:`ShardSampler`) drawn from ``loader.generator`` (which must be
    seeded alike on every rank), with the per-rank batch ``batch_size // world`` so the global batch stays what it
    was; the batch size must then be a multiple of the number of processes. ``train=False``: an ordered share with
    no sample repeated, at the loader's batch size. Workers, collate function and pinning are kept.
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if world == 1:
        return loader
    bs = loader.batch_size
    if bs is None:
        raise ClassAwareError("shard_loader needs a loader with a batch_size (not a custom batch_sampler).")
    if train:
        if bs % world:
            raise ClassAwareError(
                f"The training batch size {bs} must be a multiple of the {world} processes: each process takes "
                f"batch_size / {world} samples of every batch. Choose a batch size divisible by {world}.")
        if loader.generator is None:
            raise ClassAwareError("shard_loader(train=True) needs a loader with a seeded generator "
                                  "(DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(seed))).")
        bs //= world
    sampler = ShardSampler(len(loader.dataset), rank_, world, shuffle=train,  # type: ignore[arg-type]
                           generator=loader.generator if train else None, pad=train)
    return DataLoader(loader.dataset, batch_size=bs, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      generator=loader.generator, persistent_workers=loader.persistent_workers)


@contextmanager
def data_parallel(model: nn.Module, sync_batchnorm: bool = False) -> Iterator[nn.Module]:
    """``with data_parallel(model) as net:`` train through ``net``, ``model`` wrapped in DistributedDataParallel
    (``model`` itself in a single process). On exit every rank gets rank 0's buffers (:func:`broadcast_buffers`).

    ``sync_batchnorm``: BatchNorm statistics over the global batch (:class:`torch.nn.SyncBatchNorm`, GPUs only) for
    the duration of the block; the user's BatchNorm modules, which share their parameters and running statistics
    with the synchronised ones, are put back on exit.
    """
    if not is_distributed():
        yield model
        return
    dev = model_device(model)
    originals: dict[tuple[nn.Module, str], nn.Module] = {}
    if sync_batchnorm:
        if dev.type != "cuda":
            raise ClassAwareError("sync_batchnorm needs CUDA (torch.nn.SyncBatchNorm runs on GPUs only); the model is "
                                  f"on {dev}. Turn it off on CPU.")
        originals = {(parent, name): child for parent in model.modules() for name, child in parent.named_children()
                     if isinstance(child, nn.modules.batchnorm._BatchNorm)}
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    try:
        yield nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    finally:
        for (parent, name), child in originals.items():
            setattr(parent, name, child)
    broadcast_buffers(model)  # not after an error: the other ranks may not be here to take part
