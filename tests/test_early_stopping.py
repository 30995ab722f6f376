"""Early stopping in the core training loop: when it stops, which weights it leaves, and exact resume."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from classaware_plugin.core import ClassAwareError, EarlyStopping, train, validation_loss


def _problem(flip_val: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    train_dl = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    # Labels of validation opposite to training: every epoch of training makes the validation loss worse.
    val_dl = DataLoader(TensorDataset(x, 1 - y if flip_val else y), batch_size=32)
    return train_dl, val_dl


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def test_stops_after_patience_epochs_without_improvement_and_keeps_the_best_weights():
    train_dl, val_dl = _problem(flip_val=True)
    loss = nn.CrossEntropyLoss()
    one_epoch = _model()
    torch.manual_seed(5)
    train(one_epoch, train_dl, loss, epochs=1, lr=0.1, progress=False)
    model = _model()
    stopper = EarlyStopping(val_dl, patience=2)
    torch.manual_seed(5)
    train_dl.generator.manual_seed(1)
    losses = train(model, train_dl, loss, epochs=10, lr=0.1, progress=False, early_stopping=stopper)
    assert len(losses) == 3 and len(stopper.losses) == 3  # epoch 1 best, epochs 2 and 3 worse: stop
    assert stopper.best_epoch == 1 and stopper.losses[1] > stopper.losses[0] and stopper.losses[2] > stopper.losses[0]
    for a, b in zip(model.state_dict().values(), one_epoch.state_dict().values()):
        assert torch.equal(a, b)  # the weights after epoch 1, not after epoch 3
    assert validation_loss(model, val_dl, loss) == pytest.approx(stopper.best)
    assert not model.training


def test_runs_every_epoch_while_validation_improves():
    train_dl, val_dl = _problem(flip_val=False)
    stopper = EarlyStopping(val_dl, patience=1)
    losses = train(_model(), train_dl, nn.CrossEntropyLoss(), epochs=4, lr=0.05, progress=False, early_stopping=stopper)
    assert len(losses) == 4 and len(stopper.losses) == 4 and stopper.best_epoch == 4
    assert all(b < a for a, b in zip(stopper.losses, stopper.losses[1:]))


def test_min_delta_counts_a_small_gain_as_none():
    train_dl, val_dl = _problem(flip_val=False)
    stopper = EarlyStopping(val_dl, patience=1, min_delta=10.0)
    train(_model(), train_dl, nn.CrossEntropyLoss(), epochs=5, lr=0.05, progress=False, early_stopping=stopper)
    assert len(stopper.losses) == 2 and stopper.best_epoch == 1


@pytest.mark.parametrize("stopping", [True, False], ids=["early-stopping", "all-epochs"])
@pytest.mark.parametrize("kill_after", [1, 2])
def test_a_resumed_call_stops_where_an_uninterrupted_one_does(kill_after, stopping):
    # 64 samples in batches of 16: RandomSampler draws from the loader's generator when an epoch's iterator runs
    # out, after the epoch's last batch; the checkpoint must see that draw (it did not before this test).
    train_dl, val_dl = _problem(flip_val=True)
    loss = nn.CrossEntropyLoss()

    def run(resume=None, kill=None, model=None):
        model = model or _model()
        saved = []

        def checkpoint(state):
            saved.append(state)
            if kill is not None and len(saved) == kill:
                raise KeyboardInterrupt

        if resume is None:
            torch.manual_seed(5)
            train_dl.generator.manual_seed(1)
        stopper = EarlyStopping(val_dl, patience=2) if stopping else None
        try:
            train(model, train_dl, loss, epochs=10, lr=0.1, progress=False, early_stopping=stopper,
                  checkpoint=checkpoint, resume=resume)
        except KeyboardInterrupt:
            pass
        return model, stopper, saved

    whole, whole_stopper, _ = run()
    _, _, saved = run(kill=kill_after)
    resumed, stopper, _ = run(resume=saved[-1])
    if stopping:
        assert stopper.losses == whole_stopper.losses and stopper.best_epoch == whole_stopper.best_epoch
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_taken_without_early_stopping():
    train_dl, val_dl = _problem(flip_val=False)
    saved = []
    train(_model(), train_dl, nn.CrossEntropyLoss(), epochs=2, progress=False, checkpoint=saved.append)
    with pytest.raises(ClassAwareError, match="early stopping off; this call has it on"):
        train(_model(), train_dl, nn.CrossEntropyLoss(), epochs=2, progress=False, resume=saved[0],
              early_stopping=EarlyStopping(val_dl))


@pytest.mark.parametrize("kwargs,named", [({"patience": 0}, "patience"), ({"patience": 1.5}, "patience"),
                                          ({"min_delta": -1.0}, "min_delta")])
def test_bad_arguments_are_refused(kwargs, named):
    _, val_dl = _problem(flip_val=False)
    with pytest.raises(ClassAwareError, match=named):
        EarlyStopping(val_dl, **kwargs)
