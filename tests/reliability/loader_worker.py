"""A subprocess that opens damaged artifacts with a runtime and runs them, so a native crash kills only it.

Started as `python -m tests.reliability.loader_worker BUNDLE_DIR`; reads one JSON request per line,
{"runtime": "onnxruntime", "files": {"step": PATH, "prefill": PATH}}, opens the session with the bundle's
program info, runs one prefill block and one step, and answers one JSON line: {"status": "ok"} or
{"status": "error", "type": ..., "message": ..., "typed": bool} (typed: ArtifactError, RuntimeUnavailable or a
ValueError from the contract checks). A crash shows as the process dying; the parent reports it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main(bundle_dir: str) -> None:
    import faulthandler
    import os
    faulthandler.enable()
    answers = os.fdopen(os.dup(1), "w")  # the protocol channel; native libraries printing to fd 1 go to stderr
    os.dup2(2, 1)
    from afedge.bundle import MANIFEST, Bundle
    from afedge.exporting import load_plugins
    from afedge.session import RUNTIMES, ArtifactError, RuntimeUnavailable
    load_plugins()
    bundle = Bundle(Path(bundle_dir), json.loads((Path(bundle_dir) / MANIFEST).read_text()))
    info = bundle.info
    print(json.dumps({"status": "ready"}), file=answers, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            sess = RUNTIMES.get(req["runtime"])({m: Path(p) for m, p in req["files"].items()}, info, 1)
            state = sess.init_state()
            _, state = sess.prefill(np.arange(info.prefill_len, dtype=np.int64)[None] % info.vocab_size, state)
            sess.step(np.array([1] * info.batch, dtype=np.int64), state)
            sess.close()
            answer = {"status": "ok"}
        except Exception as e:  # noqa: BLE001 - every error is reported back; the parent judges it
            answer = {"status": "error", "type": type(e).__name__, "message": str(e)[:400],
                      "typed": isinstance(e, (ArtifactError, RuntimeUnavailable, ValueError))}
        print(json.dumps(answer), file=answers, flush=True)


class Crash(AssertionError):
    """The worker process died (a native crash) or hung while loading a file."""


class LoaderWorker:
    """Client side: one long-lived worker per bundle; `load(runtime, files)` -> the worker's answer, or Crash. A
    dead worker is restarted for the next request."""

    def __init__(self, bundle_dir: Path, timeout_s: float = 120.0) -> None:
        self.bundle_dir, self.timeout_s, self.proc = bundle_dir, timeout_s, None

    def _start(self) -> None:
        import subprocess
        import tempfile
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.reliability.loader_worker", str(self.bundle_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     cwd=Path(__file__).resolve().parents[2])
        self._answer()

    def _answer(self) -> dict:
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            code = self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-6:]
            self.proc = None
            raise Crash(f"loader worker {'hung' if not ready else f'died (exit {code})'}: " + " | ".join(tail))
        return json.loads(line)

    def load(self, runtime: str, files: dict[str, Path]) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps({"runtime": runtime, "files": {m: str(p) for m, p in files.items()}}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
            self.proc = None


if __name__ == "__main__":
    main(sys.argv[1])
