"""Long-horizon drift of one mixer: fp32 `step` against fp64 `step` of the same weights, token by token."""
from __future__ import annotations

import copy

import torch

from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel


def mixer_drift(name: str, steps: int, checkpoints: tuple[int, ...], d_model: int = 32,
                seed: int = 0) -> dict[int, float]:
    """Worst max-relative error of fp32 vs fp64 outputs up to each checkpoint (inf once fp32 goes non-finite).

    Inputs x_t ~ N(0, 1), (1, d_model) per step; both precisions start from the mixer's initial state."""
    torch.manual_seed(seed)
    m32 = MIXERS.get(name)(d_model).eval()
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(steps, 1, d_model, generator=torch.Generator().manual_seed(seed + 7))
    s32, s64 = m32.init_state(1), tuple(s.double() for s in m64.init_state(1))
    worst, out = 0.0, {}
    with torch.no_grad():
        for t in range(steps):
            y32, s32 = m32.step(x[t], s32)
            y64, s64 = m64.step(x[t].double(), s64)
            worst = max(worst, max_rel(y32, y64))
            if t + 1 in checkpoints:
                out[t + 1] = worst if all(torch.isfinite(s).all() for s in s32) else float("inf")
    return out
