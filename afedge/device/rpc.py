"""TVM RPC: a bundle's TVM library run on a device registered with an RPC tracker (TVM's engine for device farms).

`RpcTvmSession` asks the tracker for a device by key, uploads the library, and drives its Relax VM remotely (one
round trip per call; outputs are fetched with the VM's stateful interface, since a remote tuple cannot be indexed
from here). `start_tracker` and `serve_emulated` make a loopback farm of one emulated device, for tests and for
`afedge device serve`.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from afedge.device.devices import EmuDevice, RpcDevice
from afedge.exporting import require
from afedge.session import ProgramInfo, RuntimeUnavailable, Session

SERVER = Path(__file__).with_name("rpc_server.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tracker(port: int | None = None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """TVM's RPC tracker on `host`:`port` (a free port by default), as a child process."""
    require("tornado", "tvm")
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                             "--port-end", str(port + 1), "--silent"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait(lambda: _summary(host, port) is not None, proc, f"the RPC tracker on {host}:{port}")
    return proc, port


def serve_emulated(device: EmuDevice, tracker: tuple[str, int], key: str, port: int | None = None,
                   timeout: float = 120.0) -> subprocess.Popen:
    """An RPC server under QEMU (the emulated CPU of `device`) registered with `tracker` as `key`."""
    port = port or free_port()
    cmd = device.image.command(device.qemu_cpu, [str(SERVER), "--tracker", f"{tracker[0]}:{tracker[1]}",
                                                 "--key", key, "--port", str(port)])
    proc = subprocess.Popen(cmd, env=device.image.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait(lambda: key in ((_summary(*tracker) or {}).get("queue_info") or {}), proc,
          f"{device.name}'s RPC server registering as '{key}'", timeout)
    return proc


def _summary(host: str, port: int) -> dict | None:
    from tvm import rpc
    try:
        return rpc.connect_tracker(host, port).summary()
    except (RuntimeError, OSError):
        return None


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise RuntimeUnavailable(f"{what} exited ({proc.returncode}): {err[-1] if err else 'no output'}")
        if ready():
            return
        time.sleep(0.5)
    proc.kill()
    raise RuntimeUnavailable(f"{what} was not ready after {timeout:.0f} s")


class RpcTvmSession(Session):
    """files: method -> the host path of the TVM library (both methods live in one library)."""

    def __init__(self, device: RpcDevice, files: dict[str, Path], info: ProgramInfo, threads: int = 1,
                 session_timeout: float = 600.0) -> None:
        super().__init__(info, threads)
        self.runtime, self.device = f"tvm@{device.name}", device
        tvm = self._tvm = require("tvm", "tvm")
        from tvm import rpc
        from tvm.runtime.vm import VirtualMachine
        try:
            self.remote = rpc.connect_tracker(device.host, device.port).request(
                device.key, priority=1, session_timeout=session_timeout)
        except (RuntimeError, OSError) as e:
            raise RuntimeUnavailable(f"{device.name}: no device from the tracker ({str(e).splitlines()[-1]})") \
                from None
        self.dev = self.remote.cpu()
        vms: dict[Path, object] = {}
        self._vms = {}
        for method, path in files.items():
            if path not in vms:
                self.remote.upload(str(path))
                vms[path] = VirtualMachine(self.remote.load_module(path.name), self.dev)
            self._vms[method] = vms[path]
        self._tensor = tvm.runtime.tensor

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        vm = self._vms[method]
        vm.set_input(method, *(self._tensor(np.ascontiguousarray(a), self.dev) for a in inputs))
        vm.invoke_stateful(method)
        return [o.numpy() for o in vm.get_outputs(method)]

    def close(self) -> None:
        self._vms = {}
        self.remote = None
