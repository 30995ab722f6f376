"""A small, honest training loop: fresh optimiser every call (structural pruning replaces parameters),
masks re-applied after each step, NaN/inf loss stops with :class:`NonFiniteLossError`."""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, memory_format
from .validation import (
    ClassAwareError, Constraint, Interval, Options, check_batch, check_loader, check_params, run_model,
)
from .controller import NonFiniteLossError
from .lottery import MaskSet
from .progress import progress_bar

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
TRAIN_PARAMETERS: dict[str, Constraint] = {
    "epochs": Interval(0.0), "lr": Interval(0.0, low_open=True), "optimizer": Options(OPTIMIZERS),
    "schedule": Options(SCHEDULES),
}
"""The constraints of :func:`train`'s settings (the CLI checks its training keys against them)."""


class Distillation:
    """Knowledge distillation from a fixed teacher (Hinton, Vinyals & Dean, 2015), for fine-tuning a pruned model
    towards the dense one it came from.

    With it, :func:`train` minimises ``(1 - weight) * loss_fn(z_s, y) + weight * T^2 * KL(p_t || p_s)``, where
    ``p = softmax(z / T)`` of the teacher's and the student's logits on the same batch (``T^2`` keeps the soft term's
    gradients on the scale of the hard one's). The teacher runs in eval mode without gradients; its weights are never
    changed. Early stopping still judges ``loss_fn`` alone.

    >>> Distillation(nn.Linear(2, 2), weight=1.5)
    Traceback (most recent call last):
    ...
    classaware_plugin.core.validation.ClassAwareError: The 'weight' parameter must be a number in the range [0.0, 1.0]. Got 1.5 instead.
    """

    PARAMETERS: dict[str, Constraint] = {"weight": Interval(0.0, 1.0), "temperature": Interval(0.0, low_open=True)}

    def __init__(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0) -> None:
        check_params(self.PARAMETERS, {"weight": weight, "temperature": temperature})
        self.teacher, self.weight, self.temperature = teacher, float(weight), float(temperature)

    def soft_loss(self, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(p_teacher || p_student)`` over the batch ``x`` (mean over samples)."""
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
        finally:
            self.teacher.train(was_training)
        t = self.temperature
        return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                        reduction="batchmean", log_target=True) * t * t

    def __call__(self, loss: torch.Tensor, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The training loss: ``loss`` (the task loss of the batch) blended with the soft term."""
        if self.weight == 0.0:
            return loss
        return (1.0 - self.weight) * loss + self.weight * self.soft_loss(student_logits, x)


class EarlyStopping:
    """Stop a :func:`train` call once the validation loss has not improved for ``patience`` epochs in a row, and
    put back the weights of the best epoch (Keras' ``EarlyStopping(restore_best_weights=True)``).

    The loss is the training loss function evaluated on ``loader`` in eval mode at every epoch boundary and at the
    end of the call; an epoch improves when its loss is below the best so far by more than ``min_delta``. Its state
    travels in :func:`train`'s checkpoints, so a resumed call stops where an uninterrupted one would.
    """

    PARAMETERS: dict[str, Constraint] = {"patience": Interval(1, integer=True), "min_delta": Interval(0.0)}

    def __init__(self, loader: Iterable[Any], patience: int = 2, min_delta: float = 0.0) -> None:
        check_loader("loader", loader)
        check_params(self.PARAMETERS, {"patience": patience, "min_delta": min_delta})
        self.loader, self.patience, self.min_delta = loader, int(patience), float(min_delta)
        self.losses: list[float] = []
        self.best_epoch = 0  # 1-based index into ``losses``; 0 before the first evaluation
        self._best_weights: dict[str, torch.Tensor] | None = None

    @property
    def best(self) -> float:
        return self.losses[self.best_epoch - 1] if self.best_epoch else math.inf

    @property
    def stopped(self) -> bool:
        """Whether the last ``patience`` evaluations brought no improvement."""
        return self.best_epoch > 0 and len(self.losses) - self.best_epoch >= self.patience

    def update(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
        """Evaluate ``model`` once more; keep its weights when they are the best so far. True: stop now."""
        distributed.broadcast_buffers(model)  # under DDP: rank 0's BatchNorm statistics, as its next step would use
        value = validation_loss(model, self.loader, loss_fn)
        self.losses.append(value)
        if value < self.best - self.min_delta:
            self.best_epoch = len(self.losses)
            self._best_weights = copy.deepcopy(model.state_dict())
        return self.stopped

    def restore_best(self, model: nn.Module) -> None:
        """Load the best epoch's weights into ``model`` (nothing to do when the last epoch was the best)."""
        if self._best_weights is not None and self.best_epoch != len(self.losses):
            model.load_state_dict(self._best_weights)

    def state_dict(self) -> dict[str, Any]:
        return {"losses": list(self.losses), "best_epoch": self.best_epoch, "best_weights": self._best_weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.best_epoch = list(state["losses"]), int(state["best_epoch"])
        self._best_weights = state["best_weights"]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable[Any], batches: int) -> None:
    """Re-estimate every BatchNorm's running statistics over ``batches`` batches of ``loader`` (train mode, no
    gradients, a cumulative average; "adaptive BN", Li et al., EagleEye, ECCV 2020): the weights stay as they are,
    the statistics no longer carry the exponential average of the last training steps. The model's mode and each
    BatchNorm's momentum are restored; under torch.distributed every rank ends with rank 0's statistics.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> recalibrate_batchnorm(net, [(torch.ones(4, 2), torch.zeros(4))], batches=1)
        >>> int(net[1].num_batches_tracked)
        1
    """
    check_params({"batches": Interval(1, integer=True)}, {"batches": batches})
    check_loader("loader", loader, model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    was_training = model.training
    device = distributed.model_device(model)
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts alike
        model.train()
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            model(batch[0].to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    distributed.broadcast_buffers(model)


@torch.no_grad()
def validation_loss(model: nn.Module, loader: Iterable[Any],
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """The mean of ``loss_fn`` over ``loader``'s batches, weighted by batch size, in eval mode (the mode is restored);
    under torch.distributed, over every rank's loader."""
    check_loader("loader", loader, model)
    was_training = model.training
    model.eval()
    device = distributed.model_device(model)
    total, n = 0.0, 0
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            total += float(loss_fn(model(x), y)) * len(y)
            n += len(y)
    finally:
        model.train(was_training)
    total, n = (float(v) for v in distributed.all_reduce_sum([torch.tensor([total, float(n)])])[0])
    return total / max(n, 1)


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    check_params(TRAIN_PARAMETERS, {"optimizer": name})
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def train(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: float = 1.0,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    masks: MaskSet | None = None,
    progress: bool = True,
    desc: str = "training",
    schedule: str = "constant",
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
    resume: dict[str, Any] | None = None,
    early_stopping: EarlyStopping | None = None,
    sync_batchnorm: bool = False,
    channels_last: bool = True,
    distillation: Distillation | None = None,
) -> list[float]:
    """Train ``model`` for ``epochs`` (a fraction runs part of an epoch); return the mean loss per epoch.

    ``schedule='cosine'`` anneals the learning rate from ``lr`` to 0 over the call's steps (per step).

    ``checkpoint(state)`` is called at every epoch boundary before the last with everything that shapes the rest of
    the call (weights, optimiser and schedule, step, losses, the global torch RNG and the loader's generator);
    ``train(..., resume=state)`` with the same arguments continues from it exactly as if never interrupted.

    ``early_stopping``: evaluated at every epoch boundary and at the end; the call ends early once it says so and
    leaves the model with the weights of its best epoch. The schedule is not shortened (a cosine schedule is laid
    out over ``epochs``).

    Under torch.distributed (``loader`` being this rank's share, :func:`~.distributed.shard_loader`) the model
    trains through DistributedDataParallel (gradients averaged over ranks; ``sync_batchnorm``: BatchNorm statistics
    over the global batch, GPUs only), early stopping judges the loss over every rank's validation share, and the
    ranks end with identical weights and buffers.

    ``channels_last``: a convolutional model trains in channels-last memory format when its forward accepts it
    (:func:`~.memory_format.channels_last`); its weights are back in the default format when the call returns.

    ``distillation``: the training loss also pulls the model's outputs towards a teacher's (:class:`Distillation`).

    Raises :class:`NonFiniteLossError` on the first NaN or infinite loss, before the optimiser applies it.
    """
    check_params(TRAIN_PARAMETERS, {"epochs": epochs, "lr": lr, "schedule": schedule})
    if not isinstance(model, nn.Module):
        raise ClassAwareError(f"The 'model' parameter must be a torch.nn.Module. Got {type(model).__name__}.")
    if not callable(loss_fn):
        raise ClassAwareError(f"The 'loss_fn' parameter must be callable (logits, labels) -> loss. Got {loss_fn!r}.")
    check_loader("loader", loader, model)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    if masks is not None:
        masks.apply()
        masks.attach(opt)
    device = distributed.model_device(model)
    n_batches = len(loader)  # type: ignore[arg-type]
    total = max(1, int(round(epochs * n_batches))) if epochs > 0 else 0
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1)) if schedule == "cosine" else None
    losses: list[float] = []
    generator = getattr(loader, "generator", None)  # a DataLoader's shuffling (and worker seeding) generator
    done = 0
    if resume is not None:
        if (resume.get("early_stopping") is None) != (early_stopping is None):
            raise ClassAwareError("The training checkpoint was taken with early stopping "
                                  f"{'off' if resume.get('early_stopping') is None else 'on'}; this call has it "
                                  f"{'off' if early_stopping is None else 'on'}. Resume with the same arguments.")
        done = _restore(resume, model, opt, sched, generator, total)
        losses = list(resume["losses"])
        if early_stopping is not None:
            early_stopping.load_state_dict(resume["early_stopping"])
    start = done
    model.train()
    try:
        # Channels-last where the model allows it; then DistributedDataParallel under torch.distributed (the model
        # itself otherwise), on a normal exit every rank taking rank 0's buffers.
        with memory_format.channels_last(model, loader, channels_last) as fmt, \
                distributed.data_parallel(model, sync_batchnorm) as net:
            bar = progress_bar(range(done, total), desc=desc, total=total, initial=done, disable=not progress)
            it = iter(())
            running, seen = 0.0, 0
            stopped = False
            for _ in bar:
                if done != start and done % n_batches == 0:  # an epoch ended, none begun
                    # Finish the epoch's iterator first: a sampler may draw from its generator only when it runs out
                    # (RandomSampler does, when the data set is a multiple of the batch size), and the checkpoint must
                    # hold the generator as the next epoch will find it.
                    for _ in it:
                        pass
                    if early_stopping is not None and early_stopping.update(model, loss_fn):
                        stopped = True
                        break
                    if checkpoint is not None:
                        checkpoint({"step": done, "total": total, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict() if sched is not None else None,
                                    "losses": [*losses, running / seen] if seen else list(losses),
                                    "torch_rng": torch.get_rng_state(),
                                    "generator": generator.get_state() if generator is not None else None,
                                    "early_stopping": early_stopping.state_dict() if early_stopping is not None else None})
                try:
                    x, y = next(it)
                except StopIteration:
                    if seen:
                        losses.append(running / seen)
                    running, seen = 0.0, 0
                    it = iter(loader)
                    x, y = next(it)
                check_batch(done + 1, x, y, what="training step")
                x, y = fmt(x.to(device)), y.to(device)
                opt.zero_grad(set_to_none=True)
                out = run_model(net, x, done + 1, what="training step")
                if isinstance(out, torch.Tensor) and out.ndim == 2:
                    check_batch(done + 1, x, y, out.shape[1], what="training step")  # labels within the outputs
                loss = loss_fn(out, y)
                if distillation is not None:
                    loss = distillation(loss, out, x)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"The training loss became {value} at step {done + 1} of {total}.")
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                running += value
                seen += 1
                done += 1
            if seen:
                losses.append(running / seen)
        if early_stopping is not None and total:
            if not stopped and done > start:  # the last (possibly partial) epoch is judged too
                early_stopping.update(model, loss_fn)
            early_stopping.restore_best(model)
            if stopped:
                log.info("%s stopped early after epoch %d of %g: no better validation loss than epoch %d's (%.4g) "
                         "for %d epochs", desc, len(early_stopping.losses), epochs, early_stopping.best_epoch,
                         early_stopping.best, early_stopping.patience)
    finally:
        if masks is not None:
            masks.detach_all()
        model.eval()
    return losses



def _restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
             generator: torch.Generator | None, total: int) -> int:
    """Put a ``train`` call back where its checkpoint was taken; refuse a checkpoint of a different call."""
    if state.get("total") != total or (state.get("scheduler") is None) != (sched is None):
        raise ClassAwareError(
            f"The training checkpoint is of a call with {state.get('total')} steps"
            f"{'' if state.get('scheduler') is None else ' and a schedule'}; this call has {total}"
            f"{'' if sched is None else ' and a schedule'}. Resume with the same arguments."
        )
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if generator is not None and state["generator"] is not None:
        generator.set_state(state["generator"])
    return int(state["step"])
