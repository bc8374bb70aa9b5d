"""The device-side runner: `python3 worker.py`, speaking frames on stdin / stdout.

It runs on the device (an emulated or real ARM64 Linux), where there is no torch and no afedge: it imports only
the standard library, numpy and the runtime asked for (onnxruntime, or TVM's runtime library). Keep it that way.

A frame is an 8-byte little-endian length, then an .npz archive (no pickles) whose `__header__` entry is a UTF-8
JSON object and whose other entries are the arrays `a0`, `a1`, ... in order. Requests (header `op`):
  hello                      -> arch, CPU features the kernel reports, runtime versions
  open  runtime, files, inputs, outputs, threads, options
                             -> loads one artifact (method -> file); replies with the providers really used
  run   method, arrays       -> the method's outputs (logits, *state)
  stats                      -> the device process's peak RSS
  quit
Every reply carries `ok`; a failure replies `ok: false` with `error` (one line) and `kind` (unavailable | artifact).
"""
from __future__ import annotations

import io
import json
import os
import platform
import struct
import sys

import numpy as np

CPU = "CPUExecutionProvider"


def read_frame(stream) -> tuple[dict, list[np.ndarray]] | None:
    head = stream.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    data = stream.read(n)
    if len(data) != n:
        raise EOFError(f"frame of {n} bytes cut short at {len(data)}")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        header = json.loads(bytes(z["__header__"]).decode())
        arrays = [z[f"a{i}"] for i in range(len(z.files) - 1)]
    return header, arrays


def write_frame(stream, header: dict, arrays: list[np.ndarray] = ()) -> None:
    buf = io.BytesIO()
    np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8),
             **{f"a{i}": np.ascontiguousarray(a) for i, a in enumerate(arrays)})
    data = buf.getvalue()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def cpu_features() -> list[str]:
    """The `Features` line of /proc/cpuinfo (what the kernel, or QEMU, tells programs choosing kernels)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("features", "flags")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


class Unavailable(RuntimeError):
    """The device cannot run this artifact (runtime missing, wrong architecture)."""


class OrtRunner:
    """inputs: method -> graph input names in the order the host sends arrays; outputs: names to fetch."""

    def __init__(self, files: dict[str, str], threads: int, options: dict, inputs: dict[str, list[str]],
                 outputs: list[str]) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise Unavailable(f"onnxruntime is not installed on the device ({e})") from None
        available = set(ort.get_available_providers())
        wanted = [p if isinstance(p, str) else p[0] for p in options.get("providers") or [CPU]]
        providers = [p for p in wanted if p in available and p != CPU] + [CPU]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        for key, value in (options.get("session_config") or {}).items():
            opts.add_session_config_entry(str(key), str(value))
        self.sessions = {m: ort.InferenceSession(p, sess_options=opts, providers=providers) for m, p in files.items()}
        self.inputs, self.outputs = inputs, outputs
        first = next(iter(self.sessions.values()))
        self.info = {"providers": first.get_providers(), "unavailable_providers": sorted(set(wanted) - available),
                     "version": ort.__version__}

    def run(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.sessions[method].run(self.outputs, dict(zip(self.inputs[method], arrays)))


class TvmRunner:
    """Each method is a function of the library's Relax VM, (tokens, *state) -> (logits, *state)."""

    def __init__(self, files: dict[str, str], threads: int, options: dict, inputs: dict[str, list[str]],
                 outputs: list[str]) -> None:
        os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")   # the runtime library alone: no compiler on a device
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
        try:
            import tvm
            from tvm.runtime.vm import VirtualMachine
        except ImportError as e:
            raise Unavailable(f"TVM's runtime is not installed on the device ({e})") from None
        self.tvm, self.dev = tvm, tvm.cpu(0)
        vms: dict[str, object] = {}
        self.vms = {}
        for method, path in files.items():
            if path not in vms:
                vms[path] = VirtualMachine(tvm.runtime.load_module(path), self.dev)
            self.vms[method] = vms[path]
        self.info = {"version": tvm.__version__}

    def run(self, method: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        out = self.vms[method][method](*(self.tvm.runtime.tensor(a, self.dev) for a in arrays))
        return [o.numpy() for o in out]


RUNNERS = {"onnxruntime": OrtRunner, "tvm": TvmRunner}


def _versions() -> dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version(), "numpy": np.__version__}
    for dist in ("onnxruntime", "apache-tvm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def handle(state: dict, header: dict, arrays: list[np.ndarray]) -> tuple[dict, list[np.ndarray]]:
    op = header["op"]
    if op == "hello":
        return {"arch": platform.machine(), "features": cpu_features(), "versions": _versions()}, []
    if op == "open":
        runtime = header["runtime"]
        if runtime not in RUNNERS:
            raise Unavailable(f"{runtime}: no device runner (this device runs {sorted(RUNNERS)})")
        for p in header["files"].values():
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} is not on the device")
        state["runner"] = RUNNERS[runtime](header["files"], int(header.get("threads", 1)), header.get("options", {}),
                                           header.get("inputs", {}), header.get("outputs", []))
        return dict(state["runner"].info), []
    runner = state.get("runner")
    if runner is None:
        raise RuntimeError(f"'{op}' before 'open'")
    if op == "run":
        return {}, runner.run(header["method"], arrays)
    if op == "stats":
        return {"peak_rss_bytes": peak_rss_bytes()}, []
    raise ValueError(f"unknown request '{op}'")


def main() -> int:
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr    # stray prints from a runtime must not corrupt the frames
    state: dict = {}
    while (frame := read_frame(inp)) is not None:
        header, arrays = frame
        if header.get("op") == "quit":
            break
        try:
            reply, outs = handle(state, header, arrays)
            write_frame(out, {"ok": True, **reply}, outs)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the host as one line
            kind = "unavailable" if isinstance(e, (Unavailable, FileNotFoundError)) else "artifact"
            msg = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            write_frame(out, {"ok": False, "kind": kind, "error": f"{type(e).__name__}: {msg[:400]}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
