"""TVM runtime: a Relax VirtualMachine over the shared library written by the tvm exporter.

The library holds both methods ("step", "prefill"), each (token(s), *state) -> (logits, *state). The base class
refuses a library built for another CPU architecture (RuntimeUnavailable) before anything is loaded.

Threads: TVM's CPU thread pool is per process and its ceiling is fixed when the pool starts: TVM_NUM_THREADS, or
TVM's own default, which is 1 on this 2-core machine. `runtime.config_threadpool(1, n)` can choose any count up to
that ceiling but not above it (measured on TVM 0.27: a d=256 prefill took 12.5 ms with 1 thread, 9.0 ms with 2 only
when TVM_NUM_THREADS=2 was set before the pool started). So `prime_thread_env()` sets TVM_NUM_THREADS to the CPU
count (unless the user set it) before anything in this process touches TVM (the exporter calls it too), and each
session then picks its count with config_threadpool; the pool is reconfigured only when the count changes.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from afedge.exporting import require
from afedge.session import RUNTIMES, ArtifactError, ArtifactSession, RuntimeUnavailable

__all__ = ["TvmSession", "prime_thread_env"]

_configured_threads: int | None = None
_CPU, _ALIGN = 1, 64  # DLPack's kDLCPU; the data alignment TVM's kernels assume


def prime_thread_env() -> None:
    """Raise the TVM thread-pool ceiling to the CPU count; only effective before the pool first starts."""
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))


def _set_threads(tvm, n: int) -> None:
    global _configured_threads
    if n != _configured_threads:
        tvm.get_global_func("runtime.config_threadpool")(1, int(n))
        _configured_threads = n


def _is_cuda(lib) -> bool:
    """True when the library imports a CUDA device module (built for a CUDA target)."""
    seen, todo = set(), [lib]
    while todo:
        m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if getattr(m, "kind", "") == "cuda" or getattr(m, "type_key", "") == "cuda":
            return True
        todo.extend(getattr(m, "imports", []) or [])
    return False


_MACHINES = {62: "x86_64", 183: "aarch64"}   # ELF e_machine


def _first_line(e: BaseException) -> str:
    """The message line of a TVM error (TVM puts a C++ backtrace before it)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return next((ln for ln in lines if "Check failed" in ln or ln.startswith(("TVMError", "InternalError"))),
                lines[-1] if lines else type(e).__name__)[:300]


def check_elf(path: Path) -> None:
    """Refuse a library the dynamic loader would crash on (SIGBUS on a truncated segment) before dlopen: a 64-bit
    little-endian ELF shared object whose program headers, loadable segments and section table all lie inside the
    file, for this machine's architecture. This checks structure only: the code itself is trusted through the
    bundle's sha256, the only way afedge ever loads a library."""
    from afedge.target import host_arch
    data = path.read_bytes()

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"tvm: {path.name} is not a loadable shared library: {why}")

    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise bad(f"no ELF header ({len(data)} bytes)")
    if data[4] != 2 or data[5] != 1:
        raise bad("not a 64-bit little-endian ELF")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_phoff, e_shoff = struct.unpack_from("<QQ", data, 32)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", data, 54)
    if e_type != 3:
        raise bad(f"ELF type {e_type} is not a shared object (3)")
    arch = _MACHINES.get(e_machine, f"e_machine {e_machine}")
    if arch != host_arch():
        raise RuntimeUnavailable(f"tvm: {path.name} is built for {arch}; this machine is {host_arch()}")
    if e_phentsize != 56 or not e_phnum or e_phoff + e_phnum * 56 > len(data):
        raise bad(f"program header table ({e_phnum} x {e_phentsize} bytes at {e_phoff}) is outside the file "
                  f"({len(data)} bytes)")
    if e_shnum and (e_shentsize != 64 or e_shoff + e_shnum * 64 > len(data)):
        raise bad(f"section header table ({e_shnum} x {e_shentsize} bytes at {e_shoff}) is outside the file "
                  f"({len(data)} bytes)")
    for i in range(e_phnum):
        p_type, _, p_offset, _, _, p_filesz, p_memsz = struct.unpack_from("<IIQQQQQ", data, e_phoff + i * 56)
        if p_type in (1, 2) and (p_offset + p_filesz > len(data) or p_filesz > p_memsz):  # PT_LOAD, PT_DYNAMIC
            raise bad(f"segment {i} ({p_filesz} bytes at {p_offset}) is outside the file ({len(data)} bytes): "
                      f"truncated?")


@RUNTIMES.register("tvm")
class TvmSession(ArtifactSession):
    runtime = "tvm"

    def _load(self) -> None:
        prime_thread_env()
        self._tvm = tvm = require("tvm", "tvm")
        from tvm import relax

        _set_threads(tvm, self.threads)
        vms: dict[Path, object] = {}
        self._vms = {}
        for method, path in self.files.items():
            if path not in vms:
                if not path.is_file():
                    raise FileNotFoundError(f"tvm: {path} does not exist")
                check_elf(path)
                try:
                    lib = tvm.runtime.load_module(str(path))
                except RuntimeError as e:  # a CUDA library where the CUDA runtime module is not loaded
                    if "cuda" in str(e).lower():
                        raise RuntimeUnavailable(f"tvm: {path.name} is built for CUDA and this machine cannot "
                                                 f"load the CUDA runtime (use the bundle's host twin)") from e
                    raise ArtifactError(f"tvm: cannot load {path.name}: {_first_line(e)}") from None
                if _is_cuda(lib):
                    if not tvm.cuda(0).exist:
                        raise RuntimeUnavailable(f"tvm: {path.name} is built for CUDA and this machine has no "
                                                 f"CUDA device (use the bundle's host twin)")
                    self.device = tvm.cuda(0)
                else:
                    self.device = tvm.cpu(0)
                vms[path] = relax.VirtualMachine(lib, self.device)
            self._vms[method] = vms[path]
        self._cpu = self.device.dlpack_device_type() == _CPU

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        _set_threads(tvm, self.threads)
        out = self._vms[method][method](*(self._tensor(a) for a in inputs))
        if not self._cpu:
            return [o.numpy() for o in out]
        return [np.from_dlpack(o) for o in out]  # views that keep the VM's fresh output tensors alive

    def _tensor(self, a: np.ndarray):
        """A numpy input as a TVM tensor: shared, not copied, on the CPU when it is 64-byte aligned (TVM's
        kernels assume it), as the states a step returns are. A copy costs ~16 us in Python per tensor: at the
        demo model's 0.14 ms step, 9 inputs and 9 outputs took the session to 0.38 ms."""
        a = np.ascontiguousarray(a)
        if self._cpu and a.flags.writeable and a.ctypes.data % _ALIGN == 0 and a.size:
            return self._tvm.runtime.from_dlpack(a)
        return self._tvm.runtime.tensor(a, self.device)

    def close(self) -> None:
        self._vms = {}
