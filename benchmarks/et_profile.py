"""Where ExecuTorch spends a bundle's step and prefill: operator time inside the delegate, from ETDump.

    nice -n 0 .venv/bin/python benchmarks/et_profile.py out/bench/m130-8da4w --runs 10

Each XNNPACK operator event (`Fully Connected (NC, QDU8, F32, QB4W) GEMM #12`) is grouped by its kind; the wall
time less the operators' own times is what the method call and the delegate add around them.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

from op_table import print_ops

# ExecuTorch's own events around the operators (loading, the method call, the delegate call itself)
DRIVER_EVENTS = ("Program::load_method", "Method::init", "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")


def profile(pte: Path, method: str, inputs: tuple, runs: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(mean wall ms per run, [(event kind, mean ms per run, events per run)]) over `runs` runs after 2 warm-ups."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    module = portable_lib._load_for_executorch(str(pte), enable_etdump=True, debug_buffer_size=0)
    for _ in range(2):
        module.run_method(method, inputs)
    t = time.perf_counter()
    for _ in range(runs):
        module.run_method(method, inputs)
    wall = (time.perf_counter() - t) / runs * 1e3
    out = Path(tempfile.mkdtemp())
    module.write_etdump_result_to_file(str(out / "run.etdp"), str(out / "debug.bin"))
    df = Inspector(etdump_path=str(out / "run.etdp")).to_dataframe()
    df["kind"] = df["event_name"].map(lambda s: re.sub(r"\s*#\d+$", "", str(s)))
    df["ms"] = df["raw"].map(lambda r: sum(r) / len(r) if len(r) else 0.0)
    g = df.groupby("kind")["ms"].agg(["sum", "count"]).sort_values("sum", ascending=False)
    return wall, [(kind, float(row["sum"]), int(row["count"])) for kind, row in g.iterrows()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=16)
    a = ap.parse_args()
    import torch

    from afedge.bundle import load_bundle
    from afedge.runtimes.executorch import set_threads
    torch.set_num_threads(1)   # torch only builds the inputs; its OpenMP threads must not spin on XNNPACK's cores
    set_threads(a.threads)
    b = load_bundle(a.bundle)
    art, info = b.artifact("executorch"), b.info
    state = tuple(torch.from_numpy(x) for x in info.spec.init_numpy())
    inputs = {"step": (torch.zeros(info.batch, dtype=torch.int64), *state),
              "prefill": (torch.zeros((info.batch, info.prefill_len), dtype=torch.int64), *state)}
    print(f"load average {os.getloadavg()}")
    for method in ("step", "prefill"):
        wall, kinds = profile(b.file(art.files[method]), method, inputs[method], a.runs)
        print_ops(method, wall, [k for k in kinds if k[0] not in DRIVER_EVENTS], a.top)


if __name__ == "__main__":
    main()
