"""Bench reports: JSON (everything), Markdown (the tables) and a PNG (latency and memory against context)."""
from __future__ import annotations

import json
import os
from pathlib import Path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _f(x, fmt: str = ".2f", unit: str = "", none: str = "—") -> str:
    return none if x is None else format(x, fmt) + unit


def _mib(b) -> str:
    return "—" if not b else f"{b / 2**20:.0f}"


def markdown(res: dict) -> str:
    m, mach, roof = res["model"], res["machine"], res["roofline"]
    cfg = m["config"]
    lines = [f"# afedge bench: {res['bundle']}", "",
             f"Model: {cfg['mixer']} x{cfg['n_layers']}, d_model {cfg['d_model']}, vocab {cfg['vocab_size']}, "
             f"{m['parameters']:,} parameters, state {m['state_bytes']:,} bytes; prefill block {m['prefill_len']} "
             f"(chunk {m['chunk_size']}). Target `{res['target']}` "
             f"({'measured on its device' if res['measured_on_target'] else 'NOT measured on its device'}).",
             "",
             f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['arch']}; nice {mach['nice']}; load average "
             f"(1/5/15 min) {mach['load_before']} before, {mach['load_after']} after; {mach['time']}.",
             "",
             f"Roofline: {roof['bandwidth']['method']}: **{roof['bandwidth_gb_s']} GB/s**; a decode step reads "
             f"{roof['weight_bytes_per_token'] / 1e6:.1f} MB of weights + {roof['state_bytes_per_token'] / 1e6:.2f} MB "
             f"of state -> upper bound **{roof['decode_upper_bound_tok_s']} tok/s**."
             + "".join(f" {r['name']} ({q['scheme']}): {q['weight_bytes_per_token'] / 1e6:.1f} MB -> "
                       f"**{q['decode_upper_bound_tok_s']} tok/s**."
                       for r in res["runtimes"] if (q := r.get("roofline"))),
             ""]
    s = res["settings"]
    ctxs = sorted(set(s["contexts"]) | set(s.get("reference_contexts") or []))
    lines += [f"Settings: threads {res['runtimes'][0].get('threads') if res['runtimes'] else '?'}, "
              f"{s['steps']} timed steps per context (3 warm-up), prompt {s['prompt_len']} tokens, "
              f"chunked prefill median of {s['repeats']}.", ""]
    if rw := res.get("reached_with"):
        lines += [f"Decode contexts reached once by **{rw['artifact']}**'s chunked prefill "
                  f"({sum(x['feed_s'] for x in rw['reached']):.1f} s) and handed to every runtime (`--reach-with`): "
                  f"the peak RSS per context is decode's alone.", ""]
    lines += ["## Decode and prefill", "",
              "| runtime | status | decode tok/s | roofline | vs torch eager (decode / best prefill) "
              "| prefill chunked tok/s "
              "| token-by-token tok/s | chunked ÷ tbt | TTFT ms | peak RSS MiB | state KiB | artifact MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runtimes"]:
        p, up = r.get("prefill") or {}, r.get("speedup_vs_torch") or {}
        status = r.get("status", "?") + (" (EMULATED, not device latency)" if r.get("emulated") else "") \
            + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(
            f"| {r['name']} | {status} | {_f(r.get('decode_tok_s'))} | {_f(r.get('roofline_ratio'), '.1%')} | "
            f"{_f(up.get('decode'), '.2f', 'x')} / {_f(up.get('prefill'), '.2f', 'x')} | {_f(p.get('chunked_tok_s'), '.1f')} | "
            f"{_f(p.get('token_by_token_tok_s'), '.1f')} | {_f(p.get('speedup'), '.1f')} | "
            f"{_f(r.get('ttft_ms'), '.1f')} | "
            f"{_mib(r.get('peak_rss_bytes'))} | {_f((r.get('state_bytes') or 0) / 1024 or None, '.1f')} | "
            f"{_f((r.get('artifact_bytes') or 0) / 2**20 or None, '.2f')} |")
    torch_row = next((r for r in res["runtimes"] if r["kind"] == "torch-eager" and r.get("prefill")), None)
    if torch_row and torch_row["prefill"].get("parallel_tok_s"):
        lines += ["", f"PyTorch eager parallel form over the whole prompt in one call: "
                      f"{torch_row['prefill']['parallel_tok_s']:.1f} tok/s."]
    lines += ["", "## Decode latency against context (median / p90 ms per token; peak RSS MiB)", "",
              "| runtime | " + " | ".join(f"ctx {c}" for c in ctxs) + " | latency growth | memory growth |",
              "|---|" + "---|" * (len(ctxs) + 2)]
    for r in res["runtimes"]:
        by = {d["context"]: d for d in r.get("decode") or []}
        cells = []
        for c in ctxs:
            d = by.get(c)
            if d is None:
                cells.append("—")
            elif d.get("median_ms") is None:
                cells.append(f"skipped ({d.get('skipped', '')})")
            else:
                cells.append(f"{d['median_ms']:.3f} / {_f(d.get('p90_ms'), '.3f')}; {_mib(d.get('peak_rss_bytes'))}")
        g = r.get("growth") or {}
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {_f(g.get('latency'), '.3f')} | "
                     f"{_f(g.get('memory'), '.3f')} |")
    b = res["budgets"]
    lines += ["", f"## Budgets ({b['file']})", ""]
    if not b["verdicts"]:
        lines.append("No budgets for this target.")
    else:
        lines += ["| runtime | budget | limit | value | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {v['runtime']} | {v['budget']} | {v['limit']} | {_f(v['value'], '.4g')} | "
                  f"{v['status']}{': ' + v['note'] if v['note'] and v['status'] != 'pass' else ''} |"
                  for v in b["verdicts"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    """Two panels against context length (log scale): decode ms/token (median, p90 as the bar) and peak RSS."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in res["runtimes"]:
        pts = [d for d in r.get("decode") or [] if d.get("median_ms") is not None and d.get("context")]
        if len(pts) < 1 or r["kind"] == "hf":
            continue
        x = [d["context"] for d in pts]
        style = {"linestyle": "--", "color": "black"} if r["kind"] == "baseline" else {}
        label = f"{r['name']} (KV-cache transformer)" if r["kind"] == "baseline" else r["name"]
        med = [d["median_ms"] for d in pts]
        p90 = [d["p90_ms"] if d.get("p90_ms") is not None else d["median_ms"] for d in pts]
        ax_t.errorbar(x, med, yerr=[[0] * len(x), [b - a for a, b in zip(med, p90)]], marker="o", capsize=3,
                      label=label, **style)
        ax_m.plot(x, [d["peak_rss_bytes"] / 2**20 for d in pts], marker="o", label=label, **style)
    for ax, title, unit in ((ax_t, "decode latency (median, bar to p90)", "ms / token"),
                            (ax_m, "peak RSS of the runtime's process", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    cfg = res["model"]["config"]
    fig.suptitle(f"afedge bench: {cfg['mixer']} x{cfg['n_layers']} d{cfg['d_model']} on {res['machine']['cpu']} "
                 f"(load {res['machine']['load_before'][0]})", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_reports(res: dict, md_path: Path) -> list[Path]:
    """`md_path` and its .json / .png siblings, each written atomically."""
    md_path = Path(md_path)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = md_path.with_suffix(".json"), md_path.with_suffix(".png")
    _atomic_write(json_path, json.dumps(res, indent=2).encode())
    _atomic_write(md_path, markdown(res).encode())
    plot(res, png_path)
    return [md_path, json_path, png_path]
