"""A small, honest training loop: fresh optimiser every call (structural pruning replaces parameters),
masks re-applied after each step, NaN/inf loss stops with :class:`NonFiniteLossError`."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._validation import ClassAwareError, check_batch, check_choice, check_non_empty_loader, check_number
from .controller import NonFiniteLossError
from .lottery import MaskSet
from .progress import progress_bar

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    check_choice("optimizer", name, OPTIMIZERS)
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
) -> list[float]:
    """Train ``model`` for ``epochs`` (a fraction runs part of an epoch); return the mean loss per epoch.

    ``schedule='cosine'`` anneals the learning rate from ``lr`` to 0 over the call's steps (per step).

    ``checkpoint(state)`` is called at every epoch boundary before the last with everything that shapes the rest of
    the call (weights, optimiser and schedule, step, losses, the global torch RNG and the loader's generator);
    ``train(..., resume=state)`` with the same arguments continues from it exactly as if never interrupted.

    Raises :class:`NonFiniteLossError` on the first NaN or infinite loss, before the optimiser applies it.
    """
    check_non_empty_loader("loader", loader)
    check_number("epochs", epochs, low=0.0)
    check_number("lr", lr, low=0.0, low_open=True)
    check_choice("schedule", schedule, SCHEDULES)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    if masks is not None:
        masks.apply()
        masks.attach(opt)
    device = next(model.parameters()).device
    n_batches = len(loader)  # type: ignore[arg-type]
    total = max(1, int(round(epochs * n_batches))) if epochs > 0 else 0
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1)) if schedule == "cosine" else None
    losses: list[float] = []
    generator = getattr(loader, "generator", None)  # a DataLoader's shuffling (and worker seeding) generator
    done = 0
    if resume is not None:
        done = _restore(resume, model, opt, sched, generator, total)
        losses = list(resume["losses"])
    start = done
    model.train()
    try:
        bar = progress_bar(range(done, total), desc=desc, total=total, initial=done, disable=not progress)
        it = iter(())
        running, seen = 0.0, 0
        for _ in bar:
            if checkpoint is not None and done != start and done % n_batches == 0:  # an epoch ended, none begun
                checkpoint({"step": done, "total": total, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict() if sched is not None else None,
                            "losses": [*losses, running / seen] if seen else list(losses),
                            "torch_rng": torch.get_rng_state(),
                            "generator": generator.get_state() if generator is not None else None})
            try:
                x, y = next(it)
            except StopIteration:
                if seen:
                    losses.append(running / seen)
                running, seen = 0.0, 0
                it = iter(loader)
                x, y = next(it)
            check_batch(done + 1, x, y, what="training step")
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
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
