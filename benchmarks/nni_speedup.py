"""NNI's flow with ClassAwarePruner on torchvision models: params and MACs before and after ModelSpeedup, and the
masked-vs-sped-up output difference. ``python -m benchmarks.nni_speedup`` writes results/nni_speedup.json."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import classaware_plugin.nni as cnni
from classaware_plugin.export import atomic_write_text
from classaware_plugin.torch_pruning import count_params_macs
from nni.compression.speedup import ModelSpeedup


def measure(arch: str, granularity: str, ratio: float = 0.5) -> dict:
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    calib = DataLoader(TensorDataset(torch.randn(64, 3, 32, 32), torch.arange(64) % 10), batch_size=16)
    params0, macs0 = count_params_macs(model, x[:1])
    pruner = cnni.ClassAwarePruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": ratio, "granularity": granularity}],
                                   important_classes=[3], calib_loader=calib)
    _, masks = pruner.compress()
    with torch.no_grad():
        masked = model(x)
    pruner.unwrap_model()
    ModelSpeedup(model, x, masks).speedup_model()
    with torch.no_grad():
        diff = float((model(x) - masked).abs().max())
    params1, macs1 = count_params_macs(model, x[:1])
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"model": arch, "granularity": granularity, "sparse_ratio": ratio, "params_before": params0,
            "params_after": params1, "nonzero_params_after": nonzero, "macs_before": macs0, "macs_after": macs1,
            "masked_vs_sped_up_max_abs_diff": diff}


def main() -> None:
    warnings.filterwarnings("ignore")
    rows = [measure(a, g) for a in ("resnet18", "mobilenet_v2") for g in ("out_channel", "default")]
    atomic_write_text(Path(__file__).parent / "results" / "nni_speedup.json", json.dumps(rows, indent=1))
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
