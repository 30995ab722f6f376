"""Documentation that cannot go stale: every code block of README.md and docs/ runs here.

Per page, in order: ``python`` blocks run in one namespace (a later block may use an earlier one's names); ``bash``
blocks run command by command in a temporary folder (``pip install`` and ``python -m pytest`` lines are skipped: this
environment is the installed package, and this is the test run); ``yaml`` blocks must parse, and a configuration or
a pruner config must be accepted. Everything runs on the small embedded data.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
SKIPPED_COMMANDS = ("pip install", "python -m pytest")


def blocks(page: Path) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(page.read_text())]


def test_every_page_has_runnable_blocks_of_known_kinds():
    kinds = {kind for page in PAGES for kind, _ in blocks(page)}
    assert kinds <= {"python", "bash", "yaml"}, kinds  # a block of another kind would not be run: refuse it here
    assert sum(len(blocks(p)) for p in PAGES) >= 10


def _commands(code: str) -> list[str]:
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        command = line.split("  #")[0].strip()
        if not command or command.startswith("#"):
            continue
        parts = [p for p in command.split(" && ") if not p.strip().startswith(SKIPPED_COMMANDS)]
        if parts:
            out.append(" && ".join(parts))
    return out


def _run_yaml(code: str, tmp_path: Path) -> None:
    """A block whose first line is ``# NAME.yaml`` is also saved as that file, for the blocks after it."""
    named = re.match(r"#\s*([\w.-]+\.ya?ml)\s*$", code.splitlines()[0]) if code.strip() else None
    if named:
        (tmp_path / named.group(1)).write_text(code)
    data = yaml.safe_load(code)
    assert isinstance(data, dict), code
    if "pruner" in data:
        import classaware_plugin.nni as cnni

        spec = cnni.load_config_file(data)
        assert spec["pruner"]["class_name"] in cnni.available_pruners()
    else:
        from classaware_plugin.cli.config import load_config

        path = tmp_path / "config.yaml"
        path.write_text(code)
        load_config(path)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_the_code_blocks_of_the_page_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore"}
    for kind, code in blocks(page):
        if kind == "python":
            exec(compile(code, f"{page.name} block", "exec"), namespace)  # noqa: S102 - the documentation's own code
        elif kind == "yaml":
            _run_yaml(code, tmp_path)
        else:
            for command in _commands(code):
                done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                      timeout=900, executable="/bin/bash")
                assert done.returncode == 0, f"{page.name}: {command}\n{done.stderr[-2000:]}"
    assert sys.modules  # the page ran to its end
