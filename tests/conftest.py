from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long-horizon or large cases, run with `make test-slow`")
