"""Each framework is needed only by its adapter: imports checked in fresh interpreters.

The core, the data and model helpers, the CLI with the Torch-Pruning backend and plain-PyTorch unstructured
pruning must not load NNI; the core and the unstructured path must not load Torch-Pruning either. A missing
framework is simulated by ``sys.modules[name] = None`` (then ``import name`` raises ImportError).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

LOADED = ("bad = sorted({m.split('.')[0] for m, mod in sys.modules.items() if mod is not None} & set(FORBIDDEN)); "
          "print(bad); sys.exit(1 if bad else 0)")


def _run(code: str, forbidden: tuple[str, ...] = (), missing: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prelude = f"import sys\nFORBIDDEN = {forbidden!r}\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in missing)
    body = prelude + textwrap.dedent(code) + "\n" + (LOADED if forbidden else "")
    return subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=600)


def test_core_and_helpers_load_neither_framework():
    out = _run("""
        import classaware_plugin, classaware_plugin.core, classaware_plugin.data, classaware_plugin.models
        import classaware_plugin.files, classaware_plugin.export, classaware_plugin.speed, classaware_plugin.measure
        import classaware_plugin.cli.main, classaware_plugin.cli.config, classaware_plugin.cli.job
    """, forbidden=("nni", "torch_pruning"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_unstructured_pruning_runs_without_either_framework():
    # Both frameworks made unimportable: the unstructured path must not even try them.
    out = _run("""
        import torch
        from torch import nn
        from classaware_plugin.core import FNConstrainedPruning, FNConstraint, make_score
        from classaware_plugin.unstructured import UnstructuredBackend, make_permanent
        torch.manual_seed(0)
        x = torch.randn(64, 8); y = (x[:, 0] > 0).long()
        batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        backend = UnstructuredBackend(model, make_score("fisher", [1], num_classes=2), batches, [1], batches, None)
        loop = FNConstrainedPruning(backend, FNConstraint([1], abs_tol=64, max_accuracy_drop=None), target=0.5,
                                    target_key="sparsity", step=0.3)
        result = loop.run()
        make_permanent(model)
        assert result.stop_reason == "target_reached", result.stop_reason
    """, forbidden=("nni", "torch_pruning"), missing=("nni", "torch_pruning"))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_cli_with_the_torch_pruning_backend_never_loads_nni(tmp_path):
    out = _run(f"""
        from classaware_plugin.cli.main import main
        code = main(["run", "--quiet", "--out", {str(tmp_path / 'run')!r}, "--set", "training.epochs=1",
                     "--set", "model.kwargs={{depth: 8, width: 8}}", "--set", "pruning.finetune_epochs=0.2",
                     "--set", "pruning.max_steps=1", "--set", "export.onnx=false", "--set", "pruning.round_to=null",
                     "--set", "constraint.rule=count"])  # one epoch: the dense model may miss every 3
        assert code == 0, code
    """, forbidden=("nni",), missing=("nni",))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("backend,module,install", [("nni", "nni", "pip install 'classaware-plugin[nni]'"),
                                                     ("torch-pruning", "torch_pruning", "pip install torch-pruning")])
def test_a_backend_whose_framework_is_missing_names_what_to_install(tmp_path, backend, module, install):
    out = _run(f"""
        from classaware_plugin.cli.main import main
        raise SystemExit(main(["run", "--quiet", "--out", {str(tmp_path / 'run')!r}, "--set", "pruning.backend={backend}"]))
    """, missing=(module,))
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"pruning.backend={backend}" in out.stderr and install in out.stderr, out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before any work


def test_importing_an_adapter_without_its_framework_names_what_to_install():
    out = _run("import classaware_plugin.nni", missing=("nni",))
    assert out.returncode != 0 and "pip install 'classaware-plugin[nni]'" in out.stderr, out.stderr
    out = _run("import classaware_plugin.torch_pruning", missing=("torch_pruning",))
    assert out.returncode != 0 and "pip install torch-pruning" in out.stderr, out.stderr
