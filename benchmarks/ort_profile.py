"""Where ONNX Runtime spends a bundle's step and prefill: kernel time per op type from ORT's own profiler.

    nice -n 0 .venv/bin/python benchmarks/ort_profile.py out/bench/m130-onnx --runs 5
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
from op_table import print_ops


def profile(path: str, feed: dict, runs: int, threads: int) -> tuple[float, list[tuple[str, float, int]]]:
    """(mean wall ms per run, [(op type, mean kernel ms per run, nodes)]) over `runs` runs after one warm-up."""
    import onnxruntime as ort

    from afedge.runtimes.onnxruntime import SESSION_CONFIG
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    for k, v in SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess.run(None, feed)
    import time
    t = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feed)
    wall = (time.perf_counter() - t) / runs * 1e3
    events = json.load(open(sess.end_profiling()))
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"] / 1e3
            count[e["args"]["op_name"]] += 1
    return wall, [(op, ms / (runs + 1), count[op] // (runs + 1)) for op, ms in total.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=10)
    a = ap.parse_args()
    from afedge.bundle import load_bundle
    b = load_bundle(a.bundle)
    art, info = b.artifact("onnx"), b.info
    state = {f"state.{s.name}": x for s, x in zip(info.spec.slots, info.spec.init_numpy())}
    feeds = {"step": {"token": np.zeros(info.batch, dtype=np.int64)} | state,
             "prefill": {"tokens": np.zeros((info.batch, info.prefill_len), dtype=np.int64)} | state}
    print(f"load average {os.getloadavg()}")
    for method in ("step", "prefill"):
        print_ops(method, *profile(str(b.file(art.files[method])), feeds[method], a.runs, a.threads), a.top)


if __name__ == "__main__":
    main()
