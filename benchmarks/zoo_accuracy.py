"""Figures of the mixer zoo: recurrent vs fp64 naive at T=2048, fp32-vs-fp64 drift, state bytes, exactness.

    .venv/bin/python benchmarks/zoo_accuracy.py [--steps 65536] [--only retnet,mamba]

Prints one Markdown table (the closing-note table of the core and zoo issues); no assertions, just numbers.
"""
from __future__ import annotations

import argparse
import copy

import torch

from afedge.mixers import MIXERS
from afedge.parity.drift import mixer_drift
from afedge.parity.metrics import max_rel

T, B, D = 2048, 2, 32


def step_vs_naive(name: str) -> tuple[float, float]:
    """(max rel of token-by-token step, of the chunked parallel form) vs the fp64 naive reference at T=2048."""
    torch.manual_seed(0)
    m = MIXERS.get(name)(D).eval()
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = copy.deepcopy(m).double().naive(x.double())
        state, ys = m.init_state(B), []
        for t in range(T):
            y, state = m.step(x[:, t], state)
            ys.append(y)
        par, _ = m(x, m.init_state(B), 64)
    return max_rel(torch.stack(ys, 1), ref), max_rel(par, ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=65_536, help="drift horizon (checkpoints at 1k, 8k and this)")
    ap.add_argument("--only", help="comma-separated mixer names")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only.split(",") if args.only else MIXERS.names()
    marks = tuple(sorted({1024, 8192, args.steps} & set(range(1, args.steps + 1))))
    print(f"| family | step vs fp64 naive (T={T}) | chunked parallel vs naive | drift "
          + " | drift ".join(f"{k:,}" for k in marks) + " | state bytes / layer (B=1) | exact |")
    print("|---" * (5 + len(marks)) + "|")
    for name in names:
        m = MIXERS.get(name)(D)
        step_err, par_err = step_vs_naive(name)
        drift = mixer_drift(name, args.steps, marks)
        nbytes = sum(s.nbytes for s in m.state_slots(1))
        print(f"| {name} | {step_err:.2e} | {par_err:.2e} | " + " | ".join(f"{drift[k]:.2e}" for k in marks)
              + f" | {nbytes} | {'yes' if m.exact else 'approximate'} |", flush=True)


if __name__ == "__main__":
    main()
