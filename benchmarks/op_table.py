"""The per-operator table that benchmarks/ort_profile.py and benchmarks/et_profile.py print."""
from __future__ import annotations


def print_ops(method: str, wall_ms: float, ops: list[tuple[str, float, int]], top: int) -> None:
    """ops: [(op kind, mean ms per run, operators per run)], largest first."""
    own = sum(ms for _, ms, _ in ops)
    print(f"{method}: {wall_ms:.2f} ms per run (wall), {own:.2f} ms in {sum(n for *_, n in ops)} operators")
    for kind, ms, n in ops[:top]:
        print(f"  {kind:46s} {ms:8.2f} ms  {ms / own:6.1%}  {n}")
