"""`afedge bench BUNDLE`: the subcommand (registered by `afedge.cli.build_parser` through `add_parser`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return out


def add_parser(sub) -> None:
    s = sub.add_parser("bench", help="latency, throughput and memory of every runtime of a bundle, with budgets",
                       description="Each runtime is measured in a fresh process; JSON, Markdown and PNG reports.")
    s.add_argument("bundle")
    s.add_argument("--runtime", action="append", help="artifact or runtime name (repeatable or comma-separated; "
                   "torch / baseline / hf select those references; default: every artifact + all references)")
    s.add_argument("--contexts", type=_ints, default=[128, 1024, 8192, 65536],
                   help="decode contexts, comma-separated (default 128,1024,8192,65536)")
    s.add_argument("--reference-contexts", type=_ints, help="contexts for PyTorch eager and the baseline "
                   "(default: --contexts; eager PyTorch takes long to feed 65,536 tokens)")
    s.add_argument("--prompt-len", type=int, default=2048, help="prompt for prefill and TTFT (default 2048)")
    s.add_argument("--steps", type=int, default=64, help="timed decode steps per context (default 64)")
    s.add_argument("--repeats", type=int, default=3, help="chunked prefill repeats, median (default 3)")
    s.add_argument("--tbt-tokens", type=int, help="tokens fed one by one for token-by-token prefill "
                   "(default: --prompt-len)")
    s.add_argument("--threads", type=int, help="threads per runtime (default: the target profile's)")
    s.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager reference")
    s.add_argument("--no-baseline", action="store_true", help="skip the KV-cache transformer baseline")
    s.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    s.add_argument("--baseline-max-kv-gib", type=float, default=2.0,
                   help="skip baseline contexts whose KV cache exceeds this (default 2 GiB)")
    s.add_argument("--budgets", type=Path, help="target profile TOML whose [budgets] to check "
                   "(default: targets/<bundle target>.toml)")
    s.add_argument("--on-target", action="store_true",
                   help="this machine is a device of the bundle's target (host bundles always are)")
    s.add_argument("--check", action="store_true", help="exit non-zero when a figure misses its budget")
    s.add_argument("--out", type=Path, help="Markdown report (JSON and PNG beside it; default "
                   "<bundle>-bench.md next to the bundle)")
    s.add_argument("--timeout", type=float, help="seconds per runtime process")
    s.add_argument("--device", help="run the artifacts on a device: emu:CPU (figures marked emulated, never "
                   "device latency; budgets not checked) or adb:SERIAL")
    s.add_argument("--reach-with", help="artifact or runtime whose chunked prefill reaches the decode contexts for "
                   "every runtime (the state contract is shared), so a slow runtime's decode can be timed at long "
                   "contexts; its peak RSS is then decode's alone (default: each runtime reaches them itself)")
    s.add_argument("--bandwidth-mib", type=int, default=512, help="buffer for the bandwidth probe (default 512)")
    s.set_defaults(fn=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from afedge.bench.report import write_reports
    from afedge.bench.run import Settings, run_bench
    runtimes = [r for x in args.runtime or [] for r in x.split(",") if r] or None
    s = Settings(contexts=args.contexts, reference_contexts=args.reference_contexts, prompt_len=args.prompt_len,
                 steps=args.steps, repeats=args.repeats,
                 tbt_tokens=args.tbt_tokens, threads=args.threads, runtimes=runtimes, torch=not args.no_torch,
                 baseline=not args.no_baseline, hf=not args.no_hf, max_kv_gib=args.baseline_max_kv_gib,
                 budgets=args.budgets, on_target=args.on_target, bandwidth_mib=args.bandwidth_mib,
                 device=args.device, reach_with=args.reach_with)
    bundle = Path(args.bundle)
    out = args.out or bundle.absolute().parent / f"{bundle.absolute().name}-bench.md"
    partial = out.with_suffix(".partial.json")
    res = run_bench(bundle, s, progress=lambda m: print(f"bench: {m}", file=sys.stderr, flush=True),
                    timeout=args.timeout, partial=partial)
    partial.unlink(missing_ok=True)
    paths = write_reports(res, out)
    _summary(res)
    print("reports: " + ", ".join(map(str, paths)), file=sys.stderr)
    errors = [r for r in res["runtimes"] if r.get("status") == "error"]
    failed = [v for v in res["budgets"]["verdicts"] if v["status"] == "fail"]
    if args.check:
        unchecked = sum(v["status"] == "not-on-device" for v in res["budgets"]["verdicts"])
        print(f"budgets ({res['budgets']['file']}): {len(failed)} failed, "
              f"{sum(v['status'] == 'pass' for v in res['budgets']['verdicts'])} passed, {unchecked} not measured "
              f"on a {res['target']} device", file=sys.stderr)
        for v in failed:
            print(f"  FAIL {v['runtime']}: {v['budget']} = {v['value']} (budget {v['note']})", file=sys.stderr)
    return 1 if errors or (args.check and failed) else 0


def _summary(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table("runtime", "status", "decode tok/s", "roofline", "prefill tok/s", "tbt tok/s", "TTFT ms",
                  "peak MiB", "growth lat / mem", title=f"bench {res['bundle']} (upper bound "
                  f"{res['roofline']['decode_upper_bound_tok_s']} tok/s at {res['roofline']['bandwidth_gb_s']} GB/s)")
    for r in res["runtimes"]:
        p, g = r.get("prefill") or {}, r.get("growth") or {}
        f = (lambda x, fmt=".1f": "—" if x is None else format(x, fmt))
        status = r.get("status", "?") + (" (emulated)" if r.get("emulated") else "")
        table.add_row(r["name"], status if not r.get("reason") else f"{status}: {r['reason'][:60]}",
                      f(r.get("decode_tok_s")), f(r.get("roofline_ratio"), ".0%"), f(p.get("chunked_tok_s")),
                      f(p.get("token_by_token_tok_s")), f(r.get("ttft_ms")),
                      f((r.get("peak_rss_bytes") or 0) / 2**20 or None, ".0f"),
                      f"{f(g.get('latency'), '.3f')} / {f(g.get('memory'), '.3f')}")
    Console(stderr=True).print(table)
