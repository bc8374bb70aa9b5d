"""Long-horizon drift: fp32 `step` vs fp64 `step` of the same mixer stays bounded, with no NaN/Inf.

The default run covers 1,024 steps; `make test-slow` runs 65,536 (`pytest -m slow tests/test_drift.py`).
"""
from __future__ import annotations

import pytest

from afedge.mixers import MIXERS
from afedge.parity.drift import mixer_drift
from afedge.tolerances import DRIFT_MAX_REL


@pytest.mark.parametrize("name", MIXERS.names())
def test_drift_1k(name):
    errs = mixer_drift(name, 1024, (1024,))
    assert errs[1024] <= DRIFT_MAX_REL, (name, errs)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIXERS.names())
def test_drift_64k(name):
    errs = mixer_drift(name, 65_536, (1024, 8192, 65_536))
    print(f"drift {name}: " + ", ".join(f"{k}: {v:.2e}" for k, v in errs.items()))
    assert errs[65_536] <= DRIFT_MAX_REL, (name, errs)
