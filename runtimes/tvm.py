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
from pathlib import Path

import numpy as np

from afedge.exporting import require
from afedge.session import RUNTIMES, ArtifactSession, RuntimeUnavailable

__all__ = ["TvmSession", "prime_thread_env"]

_configured_threads: int | None = None


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
                try:
                    lib = tvm.runtime.load_module(str(path))
                except RuntimeError as e:  # a CUDA library where the CUDA runtime module is not loaded
                    if "cuda" in str(e).lower():
                        raise RuntimeUnavailable(f"tvm: {path.name} is built for CUDA and this machine cannot "
                                                 f"load the CUDA runtime (use the bundle's host twin)") from e
                    raise
                if _is_cuda(lib):
                    if not tvm.cuda(0).exist:
                        raise RuntimeUnavailable(f"tvm: {path.name} is built for CUDA and this machine has no "
                                                 f"CUDA device (use the bundle's host twin)")
                    self.device = tvm.cuda(0)
                else:
                    self.device = tvm.cpu(0)
                vms[path] = relax.VirtualMachine(lib, self.device)
            self._vms[method] = vms[path]

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        _set_threads(tvm, self.threads)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in inputs]
        out = self._vms[method][method](*args)
        return [o.numpy() for o in out]

    def close(self) -> None:
        self._vms = {}
