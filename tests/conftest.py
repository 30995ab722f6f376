from __future__ import annotations

import logging

import pytest
import torch

from classaware_plugin.core import set_quiet

set_quiet(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)
    yield


def require_fashion_or_skip() -> None:
    """Skip with a how-to when Fashion-MNIST is absent; in CI (CLASSAWARE_REQUIRE_FASHION=1) fail instead."""
    import os

    from classaware_plugin.data import FASHION_MNIST_DIR

    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        return
    msg = "Fashion-MNIST not installed: apt-get install dataset-fashion-mnist"
    if os.environ.get("CLASSAWARE_REQUIRE_FASHION") == "1":
        pytest.fail(msg)
    pytest.skip(msg)
