"""torch.distributed: 2 CPU processes (gloo) against one process over the same samples, and the helpers alone."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from classaware_plugin.core import ClassAwareError, evaluate, train, validation_loss
from classaware_plugin.core.channels import ChannelFisher
from classaware_plugin.core.distributed import (
    RanksDivergedError, ShardSampler, check_consistent, model_signature, resolve_device, shard_loader,
)
from classaware_plugin.core.statistics import WeightStatistics

from .helpers import TinyNet

WORLD = 2


def _data(n: int = 90, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.arange(n) % 3
    x[y == 1] += 0.5
    return TensorDataset(x, y)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 3))


def _tiny() -> nn.Module:
    torch.manual_seed(2)
    return TinyNet().eval()


def _stats(model: nn.Module, loader, kind: str) -> dict:
    s = ChannelFisher([1], 3) if kind == "channel" else WeightStatistics([1], 3)
    s.collect(model, loader)
    return s.state_dict()


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        ds = _data()
        results: dict = {}
        # statistics over this rank's (unrepeated) share of the calibration set
        val = shard_loader(DataLoader(ds, batch_size=16))
        results["batches"] = [(x.clone(), y.clone()) for x, y in val]
        results["channel"] = _stats(_tiny(), val, "channel")
        results["weight"] = _stats(_tiny(), val, "weight")
        # evaluation and validation loss over every rank's share
        ev = evaluate(_tiny(), val, [1], 3)
        results["eval"] = (ev.confusion.tolist(), ev.auc[1], ev.num_samples)
        results["val_loss"] = validation_loss(_tiny(), val, nn.CrossEntropyLoss())
        # one epoch of data-parallel training: per-rank batch 16, global 32 (no BatchNorm: exactly the 1-process step)
        tr = shard_loader(DataLoader(TensorDataset(*ds[:64]), batch_size=32, shuffle=True,
                                     generator=torch.Generator().manual_seed(5)), train=True)
        model = _mlp()
        train(model, tr, nn.CrossEntropyLoss(), epochs=2, lr=1e-2, progress=False)
        results["mlp"] = model.state_dict()
        results["generator"] = tr.generator.get_state()
        # a BatchNorm model: the ranks end with identical weights and buffers
        tiny = _tiny()
        train(tiny, shard_loader(DataLoader(ds, batch_size=16, shuffle=True,
                                            generator=torch.Generator().manual_seed(6)), train=True),
              nn.CrossEntropyLoss(), epochs=1, lr=1e-2, progress=False)
        results["tiny"] = tiny.state_dict()
        # a latency target: rank 0 measures, every rank takes its number
        from classaware_plugin.speed import LatencyProbe

        results["latency"] = LatencyProbe(_tiny(), (1, 6, 6), batch_size=4, runtime="torch", repeats=3)(_tiny())
        # the ranks agree on a structure, and notice when they do not
        check_consistent(model_signature(tiny), "the model")
        try:
            check_consistent(rank, "the rank")
        except RanksDivergedError as e:
            results["diverged"] = str(e)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(f"file://{d}/rendezvous", d), nprocs=WORLD, join=True)
        return [torch.load(Path(d) / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _close(a[k], b[k], rtol)
        elif isinstance(a[k], torch.Tensor):
            torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-7)
        else:
            assert a[k] == b[k], k


def _union_loader(ranks: list[dict]) -> list:
    """Every rank's batches, in one process: the same samples in the same batches."""
    return [b for r in ranks for b in r["batches"]]


@pytest.mark.parametrize("kind", ["channel", "weight"])
def test_statistics_over_two_processes_equal_one_process_over_the_same_samples(ranks, kind):
    one = _stats(_tiny(), _union_loader(ranks), kind)
    for r in ranks:
        _close(r[kind], one)
    assert ranks[0][kind]["counts"] == {"1": 30, "-1": 60}  # 90 samples, every third of class 1, none twice


def test_evaluation_and_validation_loss_cover_every_rank(ranks):
    ds = _data()
    ev = evaluate(_tiny(), DataLoader(ds, batch_size=16), [1], 3)
    for r in ranks:
        assert r["eval"][0] == ev.confusion.tolist() and r["eval"][2] == 90
        assert r["eval"][1] == pytest.approx(ev.auc[1], abs=1e-9)
        assert r["val_loss"] == pytest.approx(validation_loss(_tiny(), DataLoader(ds, batch_size=16),
                                                              nn.CrossEntropyLoss()), rel=1e-6)


def test_data_parallel_training_takes_the_one_process_steps(ranks):
    ds = _data()
    model = _mlp()
    loader = DataLoader(TensorDataset(*ds[:64]), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(5))
    train(model, loader, nn.CrossEntropyLoss(), epochs=2, lr=1e-2, progress=False)
    for r in ranks:
        _close(r["mlp"], model.state_dict(), rtol=1e-4)
        assert torch.equal(r["generator"], loader.generator.get_state())  # shuffling state as in one process


def test_ranks_end_training_identical_and_notice_divergence(ranks):
    for k, v in ranks[0]["tiny"].items():
        assert torch.equal(v, ranks[1]["tiny"][k]), k
    assert not torch.equal(ranks[0]["tiny"]["fc.weight"], _tiny().state_dict()["fc.weight"])  # it did train
    assert "rank(s) [1]" in ranks[0]["diverged"] and "the rank" in ranks[1]["diverged"]
    assert ranks[0]["latency"] == ranks[1]["latency"] > 0  # measured once (rank 0), so every rank decides alike


# ----------------------------------------------------------------------------- helpers in one process
def test_shard_sampler_eval_shares_cover_every_sample_once():
    shares = [list(ShardSampler(10, r, 3)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(10))
    assert [len(ShardSampler(10, r, 3)) for r in range(3)] == [len(s) for s in shares] == [4, 3, 3]


def test_shard_sampler_train_shares_are_padded_and_follow_random_sampler():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    shares = [list(ShardSampler(10, r, 4, shuffle=True, generator=torch.Generator().manual_seed(3), pad=True))
              for r in range(4)]
    assert {len(s) for s in shares} == {3}
    order = list(RandomSampler(range(10), generator=g1))
    assert [i for k in range(3) for s in shares for i in s[k:k + 1]][:10] == order
    list(ShardSampler(10, 0, 4, shuffle=True, generator=g2, pad=True))
    assert torch.equal(g1.get_state(), g2.get_state())  # the generator moved on as RandomSampler moves it


def test_shard_loader_refuses_what_cannot_be_split():
    ds = _data(8)
    with pytest.raises(ClassAwareError, match="batch size 5 must be a multiple of the 2 processes"):
        shard_loader(DataLoader(ds, batch_size=5, generator=torch.Generator()), train=True, rank_=0, world=2)
    with pytest.raises(ClassAwareError, match="seeded generator"):
        shard_loader(DataLoader(ds, batch_size=4), train=True, rank_=0, world=2)
    with pytest.raises(ClassAwareError, match=r"rank must lie in \[0, 2\)"):
        ShardSampler(8, 2, 2)
    loader = DataLoader(ds, batch_size=4)
    assert shard_loader(loader) is loader  # one process: unchanged


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(ClassAwareError, match=r"'auto', 'cpu', 'cuda' or 'cuda:N'. Got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ClassAwareError, match=r"'cuda:7' does not exist on this machine"):
        resolve_device("cuda:7")


def test_model_signature_sees_shapes_and_masks():
    a, b = _tiny(), _tiny()
    assert model_signature(a) == model_signature(b)
    prune.l1_unstructured(b.fc, "weight", amount=0.5)
    c = _tiny()
    prune.l1_unstructured(c.fc, "weight", amount=0.25)
    assert len({model_signature(a), model_signature(b), model_signature(c)}) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (this machine has none)")
def test_statistics_training_evaluation_calibration_and_export_run_on_a_gpu(tmp_path):
    from classaware_plugin.core import ClassDependentLoss, calibrate
    from classaware_plugin.export import export_onnx

    model = _tiny().to(resolve_device("cuda"))
    loader = DataLoader(_data(), batch_size=16)
    ChannelFisher([1], 3).collect(model, loader)
    WeightStatistics([1], 3).collect(model, loader)
    train(model, loader, ClassDependentLoss([1], class_counts=[30, 30, 30]), epochs=1, progress=False)
    ev = evaluate(model, loader, [1], 3)
    calibrate(model, loader, [1], {1: max(ev.fn[1] - 1, 0)})
    assert export_onnx(model, torch.randn(2, 1, 6, 6), tmp_path / "m.onnx") < 1e-4
    assert next(model.parameters()).is_cuda  # exported from a CPU copy, the model stays where it was
