"""`afedge eval BUNDLE`: held-out exact-match accuracy per skill, for every runtime of the bundle that runs here."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from afedge.bundle import load_bundle
    from afedge.chat.bundles import TORCH, open_runtime, runnable
    from afedge.demo.corpus import held_out
    from afedge.demo.eval import evaluate
    from afedge.demo.skills import SCORED_SKILLS
    from afedge.tokenizer import load_tokenizer
    con = Console(stderr=True)
    bundle = load_bundle(Path(args.bundle))
    tok = load_tokenizer(bundle.file(bundle.manifest["tokenizer"]))
    ok, skipped = runnable(bundle)
    names = args.runtime or ok + ([TORCH] if args.reference else [])
    dialogues = held_out(args.dialogues)
    results = {}
    with Progress(console=con, transient=True) as bar:
        for name in names:
            task = bar.add_task(f"eval {name}", total=len(dialogues))
            session = open_runtime(bundle, name)
            results[name] = evaluate(session, tok, dialogues, args.max_new,
                                     progress=lambda n, t=task: bar.update(t, completed=n))
            session.close()
    quant = bundle.manifest["quant"]
    table = Table("skill", *(f"{n} ({quant})" if n != TORCH else "torch (fp32 ref)" for n in names),
                  title=f"held-out exact match, {len(dialogues)} conversations ({bundle.path})")
    for skill in (*SCORED_SKILLS, None):
        row = [skill or "[bold]overall[/]"]
        for n in names:
            s = results[n]
            c = sum(s.correct.values()) if skill is None else s.correct[skill]
            t = sum(s.total.values()) if skill is None else s.total[skill]
            row.append(f"{s.accuracy(skill):.1%} ({c}/{t})")
        table.add_row(*row)
    con.print(table)
    for name, why in skipped.items():
        con.print(f"[yellow]{name}[/]: not run here: {why}")
    report = {"bundle": str(bundle.path), "quant": quant, "dialogues": len(dialogues),
              "runtimes": {n: s.to_json() for n, s in results.items()}, "not_run": skipped}
    if args.json:
        tmp = Path(args.json).with_name(f".{Path(args.json).name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(args.json)
    worst = min(s.accuracy() for s in results.values())
    if args.min_accuracy is not None and worst < args.min_accuracy:
        print(f"afedge eval: overall accuracy {worst:.1%} is below --min-accuracy {args.min_accuracy:.1%}",
              file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("eval", help="held-out exact-match accuracy of the demo chat skills, per runtime")
    s.add_argument("bundle")
    s.add_argument("--runtime", action="append", help="artifact/runtime name or 'torch'; repeatable "
                                                      "(default: every artifact that runs here)")
    s.add_argument("--reference", action="store_true", help="also evaluate the PyTorch reference")
    s.add_argument("--dialogues", type=int, default=300, help="held-out conversations")
    s.add_argument("--max-new", type=int, default=32, help="reply length cap in tokens")
    s.add_argument("--json", help="write the full report (per skill, misses) to this file")
    s.add_argument("--min-accuracy", type=float, help="exit 1 if any runtime's overall accuracy is below this")
    s.set_defaults(fn=cmd_eval)
