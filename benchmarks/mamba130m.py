"""The 130M-shape Mamba (random weights) through every host runtime: export once, then `afedge bench`.

The zoo Mamba at the mamba-130m shape: d_model 768, 24 layers, vocab 50280, d_state 16, expand 2, d_conv 4, no MLP,
tied embeddings; 129.1M parameters. Exported with `afedge.pipeline.export_bundle` for `host`, then measured with
the same code as `afedge bench`. Usage (the README's performance table):

    nice -n 0 .venv/bin/python benchmarks/mamba130m.py --runtimes onnx,executorch,tvm
    .venv/bin/python benchmarks/readme_table.py benchmarks/results/mamba130m.json benchmarks/results/default.json

`--scan segsum` exports the segment-sum chunked form instead of the sequential one (to compare prefill).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab_size": 50280, "d_model": 768, "n_layers": 24, "mixer": "mamba", "mlp_ratio": 0.0,
         "mixer_kwargs": {"d_state": 16, "expand": 2, "d_conv": 4}}


def export(out: Path, runtimes: list[str], scan: str, prefill_len: int, chunk: int, steps: int,
           quant: str | None, target: str = "host", verify: bool = True) -> dict:
    """Export the bundle (if it is not there yet); returns per-runtime export seconds."""
    from afedge import LM, LMConfig, to_recurrent
    from afedge.pipeline import export_bundle
    from afedge.target import load_target
    from afedge.tokenizer import byte_tokenizer
    cfg = LMConfig(**SHAPE | {"mixer_kwargs": SHAPE["mixer_kwargs"] | {"scan": scan}})
    program = to_recurrent(LM(cfg), chunk, prefill_len)
    times: dict[str, float] = {}
    last = [time.perf_counter(), None]

    def progress(msg: str) -> None:
        now = time.perf_counter()
        if last[1]:
            times[last[1]] = round(now - last[0], 1)
        last[:] = [now, msg]
        print(f"export: {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as tmp:  # random weights: the byte tokenizer (ids 0..255 of the 50280)
        tok = Path(tmp) / "tokenizer.json"
        byte_tokenizer().save(str(tok))
        export_bundle(program, load_target(target), out, runtimes, quant, verify=verify, steps=steps,
                      progress=progress, tokenizer=tok,
                      source={"kind": "benchmark", "script": "benchmarks/mamba130m.py", "shape": SHAPE, "scan": scan})
    progress("done")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtimes", default="onnx,executorch,tvm", help="exporters (default onnx,executorch,tvm)")
    ap.add_argument("--scan", default="sequential", choices=("sequential", "segsum"))
    ap.add_argument("--prefill-len", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--quant", help="quantization scheme (default: the host profile's, fp32), e.g. int8")
    ap.add_argument("--target", default="host", help="host, or a profile file of your own (NAME.toml)")
    ap.add_argument("--bundle", type=Path, help="bundle directory (default out/bench/mamba130m-<scan>)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="report directory")
    ap.add_argument("--name", help="report name (default mamba130m, or mamba130m-segsum)")
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--gate-steps", type=int, default=32, help="decode steps of the export's parity gate")
    ap.add_argument("--no-verify", action="store_true",
                    help="write the bundle even if the parity gate refuses it (for timing a plan the gate rejects)")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER,
                    help="after --: arguments for `afedge bench` (default: its defaults)")
    a = ap.parse_args()
    suffix = a.scan + (f"-{a.quant}" if a.quant else "")
    bundle = a.bundle or ROOT / "out" / "bench" / f"mamba130m-{suffix}"
    if not (bundle / "manifest.json").is_file():
        t = time.perf_counter()
        times = export(bundle, a.runtimes.split(","), a.scan, a.prefill_len, a.chunk_size, a.gate_steps, a.quant,
                       a.target, verify=not a.no_verify)
        print(json.dumps({"export_s": times, "total_s": round(time.perf_counter() - t, 1),
                          "load_average": os.getloadavg()}), flush=True)
    if a.export_only:
        return
    name = a.name or ("mamba130m" if suffix == "sequential" else f"mamba130m-{suffix}")
    from afedge.cli import main as afedge
    extra = [x for x in a.bench_args if x != "--"]
    sys.exit(afedge(["bench", str(bundle), "--out", str(a.results / f"{name}.md"), *extra]))


if __name__ == "__main__":
    main()
