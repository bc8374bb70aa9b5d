"""ONNX Runtime session options on a bundle's `onnx` artifact: step ms and chunked prefill tok/s per variant,
interleaved in rounds so that a change in the machine's load hits every variant alike.

    nice -n 0 .venv/bin/python benchmarks/ort_options.py out/bench/mamba130m-sequential --rounds 3
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from afedge.bundle import load_bundle
from afedge.runtimes.onnxruntime import OrtSession


def variants() -> dict[str, dict]:
    """name -> overrides of the `[onnx]` options OrtSession reads (runtimes/onnxruntime.py); "threads" aside."""
    return {
        "default": {},
        "spin": {"session_config": {"session.intra_op.allow_spinning": "1"}},
        "extended": {"graph_optimization_level": "ORT_ENABLE_EXTENDED"},
        "1-thread": {"threads": 1},
        "iobinding": {"iobinding": True},
    }


def measure(bundle, overrides: dict, threads: int, steps: int, prompt: int) -> tuple[float, float]:
    """(median step ms, chunked prefill tok/s over `prompt` tokens) with the profile's [onnx] options + overrides."""
    art = bundle.artifact("onnx")
    options = bundle.manifest["target"]["profile"].get("onnx", {}) | {k: v for k, v in overrides.items()
                                                                      if k != "threads"}
    sess = OrtSession({m: bundle.file(f) for m, f in art.files.items()}, bundle.info,
                      overrides.get("threads", threads), art.arch, options)
    tokens = np.random.default_rng(0).integers(0, 256, (1, prompt), dtype=np.int64)
    sess.prefill(tokens, sess.init_state())
    t = time.perf_counter()
    sess.prefill(tokens, sess.init_state())
    tok_s = prompt / (time.perf_counter() - t)
    st, tok, samples = sess.init_state(), np.zeros(1, dtype=np.int64), []
    for i in range(steps + 3):
        t = time.perf_counter()
        _, st = sess.step(tok, st)
        if i >= 3:
            samples.append(time.perf_counter() - t)
    sess.close()
    return float(np.median(samples)) * 1e3, tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma-separated variant names")
    a = ap.parse_args()
    bundle = load_bundle(a.bundle)
    vs = variants()
    if a.only:
        vs = {k: v for k, v in vs.items() if k in a.only.split(",")}
    results: dict[str, list] = {k: [] for k in vs}
    for r in range(a.rounds):
        print(f"round {r}: load average {os.getloadavg()}", flush=True)
        for name, o in vs.items():
            results[name].append(measure(bundle, o, a.threads, a.steps, a.prompt))
            print(f"  {name:10s} step {results[name][-1][0]:7.2f} ms  prefill {results[name][-1][1]:7.1f} tok/s",
                  flush=True)
    print("median over rounds:")
    for name, rs in results.items():
        print(f"  {name:10s} step {np.median([x[0] for x in rs]):7.2f} ms  prefill "
              f"{np.median([x[1] for x in rs]):7.1f} tok/s")


if __name__ == "__main__":
    main()
