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
