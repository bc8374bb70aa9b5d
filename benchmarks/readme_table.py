"""The README's performance table from `afedge bench` JSON results, against the bar of issue 9 (llama.cpp and
transformers on a 2-core AVX2 machine, 130M-shape Mamba, fp32).

    .venv/bin/python benchmarks/readme_table.py benchmarks/results/mamba130m.json [benchmarks/results/default.json]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# The bar (issue 9): fp32 on "this kind of machine" (2 cores, AVX2, ~29 GB/s), measured elsewhere, not in our run.
BAR = {"llama.cpp f32": (42.0, 218.0), "transformers generate f32": (15.0, 92.0),
       "PyTorch eager step loop": (19.0, None)}


def _f(x, fmt=".1f") -> str:
    return "—" if x is None else format(x, fmt)


def table(res: dict) -> list[str]:
    cfg, mach, roof = res["model"]["config"], res["machine"], res["roofline"]
    lines = [f"**{cfg['mixer']} x{cfg['n_layers']}, d_model {cfg['d_model']}, vocab {cfg['vocab_size']} "
             f"({res['model']['parameters'] / 1e6:.1f}M parameters, fp32)**: {mach['cpu']}, {mach['cores']} cores, "
             f"load average {mach['load_before'][0]} → {mach['load_after'][0]}, {mach['time']}; bandwidth "
             f"{roof['bandwidth_gb_s']} GB/s → decode roofline {roof['decode_upper_bound_tok_s']:.1f} tok/s.", "",
             "| runtime | decode tok/s | ms/token smallest → largest ctx (growth) | peak RSS growth | roofline | "
             f"prefill tok/s ({res['settings']['prompt_len']}) | token-by-token | chunked ÷ tbt | TTFT ms | "
             "vs PyTorch eager (decode / prefill) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runtimes"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {r.get('status')}: {r.get('reason', '')} |||||||||")
            continue
        dec = [d for d in r.get("decode") or [] if d.get("median_ms")]
        p, g, up = r.get("prefill") or {}, r.get("growth") or {}, r.get("speedup_vs_torch") or {}
        span = (f"{dec[0]['median_ms']:.2f} @{dec[0]['context']} → {dec[-1]['median_ms']:.2f} @{dec[-1]['context']} "
                f"({_f(g.get('latency'), '.3f')}×)") if dec else "—"
        lines.append(f"| {r['name']} | {_f(r.get('decode_tok_s'))} | {span} | {_f(g.get('memory'), '.3f')}× | "
                     f"{_f(r.get('roofline_ratio'), '.0%')} | {_f(p.get('chunked_tok_s'))} | "
                     f"{_f(p.get('token_by_token_tok_s'))} | {_f(p.get('speedup'))}× | "
                     f"{_f(r.get('ttft_ms'), '.0f')} | "
                     f"{_f(up.get('decode'), '.2f')}× / {_f(up.get('prefill'), '.2f')}× |")
    return lines


def bar_lines() -> list[str]:
    lines = ["| the bar (issue 9, another run) | decode tok/s | prefill tok/s (512) |", "|---|---|---|"]
    lines += [f"| {k} | {v[0]:.0f} | {_f(v[1], '.0f')} |" for k, v in BAR.items()]
    return lines


def main(paths: list[str]) -> None:
    out = []
    for p in paths:
        out += table(json.loads(Path(p).read_text())) + [""]
    print("\n".join(out + bar_lines()))


if __name__ == "__main__":
    main(sys.argv[1:])
