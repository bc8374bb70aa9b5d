"""Prefill block / chunk sizes for a Mamba layer stack: ONNX Runtime tokens/s per (prefill_len, chunk_size).

A slice of the 130M shape (d_model 768, expand 2, d_state 16; few layers, byte vocabulary), so every export takes
seconds; the per-layer cost is what the block and chunk sizes change. Usage:
    .venv/bin/python benchmarks/prefill_sweep.py --layers 2 --sizes 64:16,64:8,64:4,64:2,64:1,256:4
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.exporting import EXPORTERS, load_plugins
from afedge.rewrite import RecurrentProgram
from afedge.runtimes.onnxruntime import OrtSession
from afedge.session import ProgramInfo
from afedge.target import load_target


def ort_prefill_tok_s(program: RecurrentProgram, threads: int, tokens: int, out: Path) -> tuple[float, float]:
    """(chunked prefill tok/s over `tokens`, step ms) of the program's ONNX graphs."""
    load_plugins()
    art = EXPORTERS.get("onnx")().export(program, load_target("host"), "fp32", out)[0]
    sess = OrtSession({m: out / f for m, f in art.files.items()}, ProgramInfo.of(program), threads)
    ids = np.random.default_rng(0).integers(0, program.vocab_size, (1, tokens), dtype=np.int64)
    sess.prefill(ids, sess.init_state())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        sess.prefill(ids, sess.init_state())
        times.append(time.perf_counter() - t)
    st, tok, steps = sess.init_state(), np.zeros(1, dtype=np.int64), []
    for _ in range(20):
        t = time.perf_counter()
        _, st = sess.step(tok, st)
        steps.append(time.perf_counter() - t)
    return tokens / float(np.median(times)), float(np.median(steps[3:])) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sizes", default="64:16,64:8,64:4,64:2,64:1")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scan", default="segsum", help="the mamba mixer's in-chunk scan: segsum or sequential")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = LM(LMConfig(vocab_size=256, d_model=768, n_layers=a.layers, mixer="mamba", mlp_ratio=0,
                        mixer_kwargs={"d_state": 16, "expand": 2, "d_conv": 4, "scan": a.scan}))
    print(f"load average {os.getloadavg()}; {a.layers} layers, {a.scan} scan, {a.threads} threads, {a.tokens} tokens")
    for size in a.sizes.split(","):
        n, c = map(int, size.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            tok_s, step_ms = ort_prefill_tok_s(to_recurrent(model, c, n), a.threads, a.tokens, Path(tmp))
            print(f"prefill_len {n:4d} chunk {c:3d}: prefill {tok_s:8.1f} tok/s, step {step_ms:.3f} ms "
                  f"(export+run {time.perf_counter() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
