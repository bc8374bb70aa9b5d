"""`DeviceSession`: one bundle artifact run on a device by its frame worker, behind the usual `Session` protocol.

The host keeps the protocol side (prompt splitting, state-contract checks); each native call is one frame to the
device and back, so `afedge.parity.compare` drives a device exactly as it drives a local runtime.
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from afedge.bundle import Artifact, Bundle
from afedge.device.devices import AdbDevice, EmuDevice, RpcDevice
from afedge.device.worker import read_frame, write_frame
from afedge.session import ArtifactError, ProgramInfo, RuntimeUnavailable, Session

# Why the .pte cannot run on an emulated ARM64 device (checked on executorch 1.5.1): its aarch64 Python binding
# (_C.cpython-311-aarch64-linux-gnu.so) links libtorch_python / libtorch / libtorch_cpu / libc10, and PyPI's aarch64
# torch 2.13.0 is a 427 MB CUDA build; a torch-free runner means cross-building ExecuTorch's C++ executor_runner.
EXECUTORCH_GAP = ("executorch: no torch-free ExecuTorch runner for an ARM64 device yet (the aarch64 Python binding "
                  "links libtorch, and PyPI's aarch64 torch is a CUDA build): run the .pte on a phone with the "
                  "Android app (examples/android)")


class DeviceProcess:
    """The worker running on a device, one request at a time."""

    def __init__(self, device: EmuDevice | AdbDevice) -> None:
        self.device = device
        self.log = tempfile.TemporaryFile()   # the worker's stderr (a pipe nobody reads could fill and block it)
        self.proc = device.popen(self.log)
        self.hello = self.request({"op": "hello"})[0]

    def _stderr_tail(self) -> str:
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").strip().splitlines()
        return lines[-1][:300] if lines else ""

    def request(self, header: dict, arrays: list[np.ndarray] = ()) -> tuple[dict, list[np.ndarray]]:
        try:
            write_frame(self.proc.stdin, header, arrays)
            frame = read_frame(self.proc.stdout)
        except (BrokenPipeError, EOFError, OSError):
            frame = None
        if frame is None:
            self.proc.wait(timeout=30)
            err = self._stderr_tail()
            raise RuntimeUnavailable(f"{self.device.name}: the device worker stopped during '{header['op']}' "
                                     f"(exit {self.proc.returncode})" + (f": {err}" if err else ""))
        reply, outs = frame
        if not reply.pop("ok"):
            cls = RuntimeUnavailable if reply["kind"] == "unavailable" else ArtifactError
            raise cls(f"{self.device.name}: {reply['error']}")
        return reply, outs

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                write_frame(self.proc.stdin, {"op": "quit"})
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        for s in (self.proc.stdin, self.proc.stdout, self.log):
            with contextlib.suppress(OSError):
                s.close()


class DeviceSession(Session):
    """runtime: 'onnxruntime' | 'tvm'; files: method -> host path of the artifact file."""

    def __init__(self, device: EmuDevice | AdbDevice, runtime: str, files: dict[str, Path], info: ProgramInfo,
                 threads: int = 1, options: dict | None = None) -> None:
        super().__init__(info, threads)
        self.runtime, self.device = f"{runtime}@{device.name}", device
        self.worker = DeviceProcess(device)
        if self.worker.hello["arch"] != device.arch:
            self.close()
            raise RuntimeUnavailable(f"{device.name} is {self.worker.hello['arch']}, not {device.arch}")
        try:
            device.check_features(self.worker.hello["features"])
            names = [f"state.{n}" for n in info.spec.names]
            self.opened = self.worker.request({
                "op": "open", "runtime": runtime, "threads": threads, "options": options or {},
                "files": {m: device.stage(p) for m, p in files.items()},
                "inputs": {"step": ["token", *names], "prefill": ["tokens", *names]},
                "outputs": ["logits", *(f"state_out.{n}" for n in info.spec.names)]})[0]
        except BaseException:
            self.close()
            raise

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.worker.request({"op": "run", "method": method}, inputs)[1]

    def peak_rss_bytes(self) -> int:
        """The device process's peak RSS (under QEMU: the emulator's, translated code included)."""
        return self.worker.request({"op": "stats"})[0]["peak_rss_bytes"]

    def close(self) -> None:
        self.worker.close()


def unavailable_reason(art: Artifact, device) -> str | None:
    """Why `art` cannot run on `device`, or None when it can."""
    if art.arch not in ("any", device.arch):
        return f"{art.runtime}: {art.name} is built for {art.arch}; {device.name} is {device.arch}"
    if isinstance(device, RpcDevice):
        return None if art.runtime == "tvm" else (f"{art.runtime}: {device.name} is a TVM RPC device; it runs TVM "
                                                  f"artifacts")
    return EXECUTORCH_GAP if art.runtime == "executorch" else None


def open_device_session(bundle: Bundle, art: Artifact, device, threads: int | None = None) -> Session:
    """One artifact of `bundle` on `device`; RuntimeUnavailable when it cannot run there (and why)."""
    if reason := unavailable_reason(art, device):
        raise RuntimeUnavailable(reason)
    profile = bundle.manifest["target"]["profile"]
    threads = threads or profile["threads"]
    files = {m: bundle.file(f) for m, f in art.files.items()}
    if isinstance(device, RpcDevice):
        from afedge.device.rpc import RpcTvmSession
        return RpcTvmSession(device, files, bundle.info, threads)
    options = dict(profile.get("onnx", {})) if art.runtime == "onnxruntime" else {}
    if art.runtime == "onnxruntime":
        from afedge.runtimes.onnxruntime import SESSION_CONFIG, check_model_file
        for path in set(files.values()):
            check_model_file(path)   # external data and opset, refused here before the file travels
        options["session_config"] = SESSION_CONFIG | (options.get("session_config") or {})
    return DeviceSession(device, art.runtime, files, bundle.info, threads, options)
