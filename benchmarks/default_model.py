"""The small default model (`afedge export --target host`) through every host runtime, then `afedge bench`.

    nice -n 0 .venv/bin/python benchmarks/default_model.py            # -> benchmarks/results/default.{md,json,png}
    nice -n 0 .venv/bin/python benchmarks/default_model.py -- --contexts 128,1024   # extra `afedge bench` arguments
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "out" / "bench" / "default")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments for `afedge bench`")
    a = ap.parse_args()
    from afedge.cli import main as afedge
    if not (a.bundle / "manifest.json").is_file():
        rc = afedge(["export", "--target", "host", "--out", str(a.bundle)])
        if rc:
            sys.exit(rc)
    extra = [x for x in a.bench_args if x != "--"]
    sys.exit(afedge(["bench", str(a.bundle), "--out", str(a.results / "default.md"), *extra]))


if __name__ == "__main__":
    main()
