"""Atomic writes: ordinary permissions, no temporary file left behind, the old file kept when writing fails."""
from __future__ import annotations

import os
import stat

import pytest

from classaware_plugin.export import atomic_write, atomic_write_text


def test_atomic_write_gives_ordinary_permissions_and_leaves_no_temp(tmp_path):
    mask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "report.md", "hello")
    finally:
        os.umask(mask)
    assert (tmp_path / "report.md").read_text() == "hello"
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_failed_write_keeps_the_old_file(tmp_path):
    atomic_write_text(tmp_path / "state.txt", "old")

    def broken(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "state.txt", broken)
    assert (tmp_path / "state.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.txt"]


def test_onnx_export_uses_torch_export_and_falls_back_with_a_reason(tmp_path, monkeypatch, caplog):
    import logging

    import torch

    from classaware_plugin.export import export_onnx

    from .helpers import TinyNet

    model, x = TinyNet().eval(), torch.randn(4, 1, 6, 6)
    calls = []
    real = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    assert export_onnx(model, x, tmp_path / "a.onnx") < 1e-5
    assert calls == [True]  # the current exporter, no fallback needed

    def dynamo_fails(*args, **kwargs):
        calls.append(kwargs.get("dynamo"))
        if kwargs.get("dynamo"):
            raise RuntimeError("unsupported operator for the test")
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    with caplog.at_level(logging.WARNING, logger="classaware_plugin.export"):
        assert export_onnx(model, x, tmp_path / "b.onnx") < 1e-5
    assert calls == [True, False]
    assert "unsupported operator for the test" in caplog.text and "legacy exporter" in caplog.text
    with pytest.raises(RuntimeError, match="unsupported operator"):
        export_onnx(model, x, tmp_path / "c.onnx", exporter="dynamo")
    with pytest.raises(ValueError, match="'exporter'"):
        export_onnx(model, x, tmp_path / "d.onnx", exporter="tf")


def test_latency_probe_measures_a_reduction_against_its_dense_copy():
    from classaware_plugin.speed import LatencyProbe

    from .helpers import TinyNet

    dense = TinyNet()
    probe = LatencyProbe(dense, (1, 6, 6), batch_size=8, runtime="torch", repeats=3)
    value = probe(dense)
    assert isinstance(value, float) and value > 0
    assert probe.dense is not dense  # a copy: pruning the model in place cannot change the reference
    with pytest.raises(ValueError, match="'runtime'"):
        LatencyProbe(dense, (1, 6, 6), runtime="tensorrt")


def test_onnxruntime_sessions_are_measured_without_spin_waiting(monkeypatch):
    """Dense and pruned run interleaved in one process; a session's spinning idle workers would steal a core from the
    other session (measured: a pruned ResNet-18 1.5-2x slower), so every measured session must have spinning off."""
    import onnxruntime as ort

    from classaware_plugin.speed import speedup

    from .helpers import TinyNet

    seen = []
    real = ort.InferenceSession

    def spy(path, opts=None, **kw):
        if opts is not None:  # the export's own correctness check opens a session without options
            seen.append(opts.get_session_config_entry("session.intra_op.allow_spinning"))
        return real(path, opts, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    out = speedup(TinyNet(), TinyNet(), (1, 6, 6), batch_size=4, runtimes=("onnxruntime",), repeats=2, warmup=1)
    assert out["onnxruntime"]["speedup"] > 0
    assert seen == ["0", "0"]


def test_an_onnx_export_that_fails_midway_keeps_the_previous_file(tmp_path, monkeypatch):
    """pruned.onnx is written in a temporary folder beside it and renamed into place once onnxruntime has checked
    it: an export that dies half-way (here the legacy exporter after writing a truncated file) leaves the previous
    export untouched and nothing else."""
    import torch

    from classaware_plugin.export import export_onnx

    model, x = torch.nn.Sequential(torch.nn.Linear(4, 3)), torch.randn(2, 4)
    assert export_onnx(model, x, tmp_path / "pruned.onnx") < 1e-5
    before = (tmp_path / "pruned.onnx").read_bytes()

    def dies(model, args, f, **kw):
        with open(f, "wb") as out:
            out.write(before[: len(before) // 3])
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(torch.onnx, "export", dies)
    with pytest.raises(RuntimeError, match="killed mid-export"):
        export_onnx(model, x, tmp_path / "pruned.onnx", exporter="legacy")
    assert (tmp_path / "pruned.onnx").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pruned.onnx"]


def test_a_full_disk_is_said_in_one_sentence_and_keeps_the_old_file(tmp_path):
    import errno

    atomic_write_text(tmp_path / "state.txt", "old")

    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"No space left on the device while writing .*state.txt.*previous version is "
                                      r"intact.*Free some space, then resume"):
        atomic_write(tmp_path / "state.txt", full)
    assert (tmp_path / "state.txt").read_text() == "old"
