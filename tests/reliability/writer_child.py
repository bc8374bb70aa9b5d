"""A bundle writer in its own process, for the kill / lock tests: `python -m tests.reliability.writer_child OUT TAG
PAUSE_AT MARKER [--no-exchange]` writes a two-file bundle whose contents say TAG through `staged(OUT)`.

At PAUSE_AT ("writing": one file written; "before-swap"; "after-swap": new bundle in place, old one not yet
removed; "between-renames": with --no-exchange, after `out` was moved aside; "none") it writes its PID to MARKER
and sleeps until killed, or until MARKER is deleted (then it finishes)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import afedge.bundle as bundle


def main(out: str, tag: str, pause_at: str, marker: str, no_exchange: bool) -> None:
    def pause(point: str) -> None:
        if point == pause_at:
            Path(marker).write_text(str(os.getpid()))
            while Path(marker).exists():
                time.sleep(0.02)

    real_exchange, real_rename = bundle._exchange, Path.rename

    def exchange(a, b):
        pause("before-swap")
        done = False if no_exchange else real_exchange(a, b)
        if done:
            pause("after-swap")
        return done

    def rename(self, target):
        result = real_rename(self, target)
        if ".old-" in Path(target).name:
            pause("between-renames")
        return result

    bundle._exchange = exchange
    Path.rename = rename
    with bundle.staged(Path(out)) as tmp:
        (tmp / "a.bin").write_bytes(f"{tag}-a".encode() * 1000)
        pause("writing")
        (tmp / "b.bin").write_bytes(f"{tag}-b".encode() * 1000)
        bundle.write_manifest(tmp, {k: {} for k in ("model", "program", "target", "parity")}
                              | {"state": [], "quant": "fp32", "artifacts": []})


if __name__ == "__main__":
    main(*sys.argv[1:5], no_exchange="--no-exchange" in sys.argv)
