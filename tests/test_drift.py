"""Long-horizon drift: fp32 `step` vs fp64 `step` of the same mixer stays bounded, with no NaN/Inf.

The default run covers 1,024 steps; `make test-slow` runs 65,536 (`pytest -m slow tests/test_drift.py`).
"""
from __future__ import annotations

import copy

import pytest
import torch

from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel
from afedge.tolerances import DRIFT_MAX_REL

D = 32


def drift(name: str, steps: int, checkpoints: tuple[int, ...]) -> dict[int, float]:
    """Max relative error of fp32 vs fp64 outputs up to each checkpoint."""
    torch.manual_seed(0)
    m32 = MIXERS.get(name)(D).eval()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(steps, 1, D, generator=torch.Generator().manual_seed(7))
    s32, s64 = m32.init_state(1), tuple(s.double() for s in m64.init_state(1))
    worst, out = 0.0, {}
    with torch.no_grad():
        for t in range(steps):
            y32, s32 = m32.step(x[t], s32)
            y64, s64 = m64.step(x[t].double(), s64)
            worst = max(worst, max_rel(y32, y64))
            if t + 1 in checkpoints:
                out[t + 1] = worst
    assert all(torch.isfinite(s).all() for s in s32), f"{name}: non-finite state after {steps} steps"
    return out


@pytest.mark.parametrize("name", MIXERS.names())
def test_drift_1k(name):
    errs = drift(name, 1024, (1024,))
    assert errs[1024] <= DRIFT_MAX_REL, (name, errs)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIXERS.names())
def test_drift_64k(name):
    errs = drift(name, 65_536, (1024, 8192, 65_536))
    print(f"drift {name}: " + ", ".join(f"{k}: {v:.2e}" for k, v in errs.items()))
    assert errs[65_536] <= DRIFT_MAX_REL, (name, errs)
