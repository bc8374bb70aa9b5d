"""The `afedge` command line: export, inspect, run, parity, targets."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import afedge
from afedge.bench.cli import add_parser as add_bench_parser
from afedge.quant.policy import EMBEDDING_CHOICES, HEAD_CHOICES


def _console():
    from afedge.exporting import require
    return require("rich.console", "cli").Console(stderr=True)


def cmd_targets(args: argparse.Namespace) -> int:
    from rich.table import Table

    from afedge.target import load_target, target_names
    table = Table("target", "arch", "exporters", "quant", "threads", "description")
    for n in target_names():
        t = load_target(n)
        table.add_row(t.name, t.arch, ", ".join(t.exporters), t.quant, str(t.threads), t.description)
    _console().print(table)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rich.table import Table

    from afedge.pipeline import export_bundle
    from afedge.quant.policy import QuantPolicy
    from afedge.rewrite import to_recurrent
    from afedge.target import load_target
    from afedge.zoo import resolve_model
    con = _console()
    target = load_target(args.target)
    resolved = resolve_model(args.model, trust_remote_code=args.trust_remote_code)
    program = to_recurrent(resolved.model, target.chunk_size, target.prefill_len)
    out = Path(args.out or f"out/{target.name}")
    exporters = args.runtimes.split(",") if args.runtimes else None
    with con.status(f"exporting for {target.name}") as status:
        bundle, results = export_bundle(program, target, out, exporters, args.quant, not args.no_verify,
                                        args.steps, resolved.source, progress=lambda m: status.update(m),
                                        tokenizer=resolved.tokenizer, allow_nonfinite=args.allow_nonfinite,
                                        policy=QuantPolicy(head=args.quant_head, embedding=args.quant_embedding))
    gate = {r.artifact: r for r in results}
    table = Table("artifact", "runtime", "arch", "files", "size", "parity", title=f"bundle {out}")
    for art in bundle.artifacts:
        files = sorted(set(art.files.values()))
        size = sum(bundle.manifest["files"][f]["bytes"] for f in files)
        g = gate.get(art.name)
        verdict = "skipped" if g is None else g.status if g.status != "pass" else \
            f"pass (max rel {g.report.max_rel:.1e}, greedy {g.report.greedy:.0%})"
        table.add_row(art.name, art.runtime, art.arch, ", ".join(files), f"{size / 1024:.0f} KiB", verdict)
    con.print(table)
    for r in results:
        if r.status == "unavailable":
            con.print(f"[yellow]{r.artifact}[/]: not run here: {r.reason}")
    con.print(f"state: {bundle.info.spec.nbytes} bytes in {len(bundle.info.spec.slots)} slots "
              f"({'exact' if bundle.info.spec.exact else 'APPROXIMATE'}); parity verdict: "
              f"{bundle.manifest['parity']['verdict']}")
    if args.zip:
        from afedge.bundle import zip_bundle
        con.print(f"zip: {zip_bundle(out, out.with_suffix('.zip'))}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from afedge.bundle import open_bundle
    b = open_bundle(Path(args.bundle))
    m = b.manifest
    con = _console()
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    cfg = m["model"]["config"]
    con.print(f"[bold]{b.path}[/]  target {b.target}, quant {m['quant']}, parity {m['parity']['verdict']}")
    con.print(f"model: {cfg['mixer']} x{cfg['n_layers']}, d_model {cfg['d_model']}, vocab {cfg['vocab_size']}, "
              f"{m['model']['parameters']:,} parameters; prefill block {m['program']['prefill_len']} "
              f"(chunk {m['program']['chunk_size']})")
    st = Table("state slot", "layer", "shape", "dtype", "bytes", "exact")
    for s in b.info.spec.slots:
        st.add_row(s.name, str(s.layer), str(list(s.shape)), s.dtype, str(s.nbytes), "yes" if s.exact else "NO")
    con.print(st)
    at = Table("artifact", "runtime", "arch", "files")
    for a in b.artifacts:
        at.add_row(a.name, a.runtime, a.arch, ", ".join(sorted(set(a.files.values()))))
    con.print(at)
    con.print("versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from afedge.bundle import open_bundle
    from afedge.pipeline import open_session
    from afedge.tokenizer import load_tokenizer
    b = open_bundle(Path(args.bundle))
    tok = load_tokenizer(b.file(b.manifest["tokenizer"]))
    ids = [int(t) for t in args.tokens.split(",")] if args.tokens else tok.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt is empty: give --prompt TEXT or --tokens ID,ID,...")
    sess = open_session(b, b.artifact(args.runtime or b.artifacts[0].name))
    logits, state = sess.prefill(np.array([ids], dtype=np.int64), sess.init_state())
    out = []
    for _ in range(args.max_new):
        nxt = logits.argmax(-1).astype(np.int64)
        out.append(int(nxt[0]))
        if args.tokens:
            print(out[-1], end=" ", flush=True)
        else:
            print(tok.decode([out[-1]]), end="", flush=True)
        logits, state = sess.step(nxt, state)
    print()
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from afedge.bundle import open_bundle
    from afedge.parity.noise import Judge
    from afedge.parity.report import write_reports
    from afedge.parity.workloads import prompt_decode, snapshot_resume, static_shapes
    from afedge.device.devices import parse_device
    from afedge.device.session import open_device_session
    from afedge.pipeline import open_session, reference_program
    from afedge.quant.gate import tolerance_name
    from afedge.runtimes.torch import TorchSession
    from afedge.session import RuntimeUnavailable
    con = _console()
    b = open_bundle(Path(args.bundle))
    tol_name = args.tolerance or b.manifest["parity"].get("tolerance") or b.manifest["target"]["profile"]["tolerance"]
    judge = Judge(TorchSession(reference_program(b), b.manifest["target"]["profile"]["threads"]))
    workloads = [prompt_decode(steps=args.steps), static_shapes(b.info.prefill_len), snapshot_resume()]
    rows = []
    devices = [parse_device(d) for d in args.device] if args.device else [None]
    for device, art in ((d, a) for d in devices for a in b.artifacts):
        if args.runtime and args.runtime not in (art.name, art.runtime):
            continue
        label = art.name if device is None else f"{art.name}@{device.name}"
        try:
            sess = open_session(b, art) if device is None else open_device_session(b, art, device)
        except RuntimeUnavailable as e:
            rows.append((label, None, str(e)))
            continue
        art_tol = tolerance_name(art.info, tol_name)  # the artifact's quant scheme's profile
        for w in workloads:
            rows.append((label, judge(sess, w, art_tol), ""))
        sess.close()
    src = Path(args.bundle)  # a .zip's report goes beside the archive, not into its temporary unpacking
    report = Path(args.report or src.parent / f"{src.stem if src.suffix == '.zip' else src.name}-parity.md")
    paths = write_reports(rows, report, f"afedge parity: {b.path.name} ({b.target}, {tol_name})")
    failed = [r for _, r, _ in rows if r is not None and not r.passed]
    for name, rep, reason in rows:
        line = f"{name:16s} " + (f"not run here: {reason}" if rep is None else
                                 f"{rep.workload:28s} {'pass' if rep.passed else 'FAIL'}  max_rel {rep.max_rel:.2e}  "
                                 f"greedy {rep.greedy:.0%}" + (f"  {rep.failure}" if rep.failure else ""))
        con.print(line)
    con.print("reports: " + ", ".join(map(str, paths)))
    if not any(r is not None for _, r, _ in rows):
        con.print("[red]no artifact of this bundle can run here[/]")
        return 1
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="afedge", description=afedge.__doc__)
    p.add_argument("--version", action="version", version=f"afedge {afedge.__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("export", help="rewrite, export, bundle and verify a model for a target")
    s.add_argument("--target", required=True,
                   help="a profile in targets/ (see `afedge targets`), or your own profile file (NAME.toml)")
    s.add_argument("--model", help="'default' (embedded), 'zoo:<family>', an afedge checkpoint directory, "
                   "a Hugging Face model directory or hub id (mamba, mamba2, falcon_mamba, rwkv)")
    s.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hugging Face checkpoint's own modelling code (config.json auto_map)")
    s.add_argument("--runtimes", help="comma-separated exporters (default: the target's list)")
    s.add_argument("--quant", help="quant scheme id: fp32, fp16, int8, int8-dyn, int4-g32, int4-g128, 8da4w, "
                                   "qdq-u8, qdq-u16a8w, or 'auto' (per exporter, from the per-layer sensitivity "
                                   "report); default: the target's (README: Quantization)")
    s.add_argument("--quant-head", choices=HEAD_CHOICES, default="int8",
                   help="LM head under a weight scheme: its 8-bit sibling (default), fp32, or the scheme itself")
    s.add_argument("--quant-embedding", choices=EMBEDDING_CHOICES, default="fp32",
                   help="token embedding under a weight scheme: fp32 (default), int8 (one scale per row), or the "
                        "scheme's bits and group; a tied head quantized alike shares its integers")
    s.add_argument("--out", help="bundle directory (default: out/<target>)")
    s.add_argument("--steps", type=int, default=256, help="decode steps in the parity gate")
    s.add_argument("--no-verify", action="store_true", help="write the bundle even if the parity gate fails")
    s.add_argument("--zip", action="store_true", help="also write <out>.zip")
    s.add_argument("--allow-nonfinite", action="store_true", help="export weights holding NaN / Inf")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("inspect", help="show a bundle's manifest, state contract and artifacts")
    s.add_argument("bundle", help="a bundle directory or its .zip")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("run", help="greedy-decode from a prompt with one of the bundle's runtimes")
    s.add_argument("bundle")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt")
    g.add_argument("--tokens", help="comma-separated token ids")
    s.add_argument("--runtime", help="artifact or runtime name (default: the first artifact)")
    s.add_argument("--max-new", type=int, default=32)
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("parity", help="compare every runtime of a bundle with the PyTorch reference")
    s.add_argument("bundle")
    s.add_argument("--steps", type=int, default=256)
    s.add_argument("--runtime", help="only this artifact or runtime")
    s.add_argument("--tolerance", help="tolerance profile (default: the bundle's)")
    s.add_argument("--report", help="Markdown report path (JSON and PNG are written beside it)")
    s.add_argument("--device", action="append", help="run the bundle's ARM64 artifacts on a device instead of "
                   "here: emu:CPU (after `afedge device setup emu-arm64`), adb:SERIAL, rpc:KEY@HOST:PORT; "
                   "repeatable; each is judged against this machine's PyTorch reference")
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("targets", help="list the target profiles")
    s.set_defaults(fn=cmd_targets)
    for mod in ("afedge.train", "afedge.demo.cli", "afedge.chat.cli", "afedge.device.cli"):  # train, eval, chat, device
        __import__("importlib").import_module(mod).add_parser(sub)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("afedge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for the user; --debug shows the traceback
        if args.debug:
            raise
        print(f"afedge: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
