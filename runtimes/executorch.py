"""ExecuTorch runtime: a multi-method `model.pte` (methods `step` and `prefill`) through the pip runtime.

`executorch.runtime.Runtime.get().load_program(path)` -> `load_method("step" | "prefill")` -> `execute([...])`,
torch tensors in and out (made from / turned back into numpy). The runtime copies outputs out on every call, so
a method's results stay valid after the next call.

Backends: the pip runtime registers XnnpackBackend (plus Qnn and Openvino, which need their SDKs); a .pte that
delegates to a backend this runtime lacks (CoreMLBackend on Linux) raises RuntimeUnavailable naming it.

Threads: XNNPACK runs on ExecuTorch's one process-wide threadpool. `_load` resizes it to `threads` with
`portable_lib._unsafe_reset_threadpool` (unsafe only while a method is executing, which a session never does
concurrently); sessions opened with different `threads` in one process therefore share the last setting.

Outputs: the method's outputs are taken uncloned (`clone_outputs=False`: views of its planned output buffers) and
copied by numpy. ExecuTorch's own clone is a torch copy, parallel for tensors over torch's grain size (the 50,280
logits of a 130M model), and torch's OpenMP threads then spin on the cores XNNPACK's threadpool needs: measured,
130M Mamba 8da4w step at 2 threads, 11.2 -> 9.1 ms with torch held to one thread, and 1 XNNPACK thread was as fast
as 2 before. Copying keeps the state contract: a returned state is never overwritten by the next call.
"""
from __future__ import annotations

import functools
import re

import numpy as np

from afedge.exporting import require
from afedge.rewrite import METHODS
from afedge.session import RUNTIMES, ArtifactError, ArtifactSession, RuntimeUnavailable

__all__ = ["ExecuTorchSession", "check_kernel_args", "required_backends", "registered_backends", "set_threads"]

EXTRA = "executorch"


def registered_backends() -> list[str]:
    """Backend ids registered in this process's ExecuTorch runtime (e.g. ['QnnBackend', 'XnnpackBackend'])."""
    from executorch.runtime import Runtime
    return list(Runtime.get().backend_registry.registered_backend_names)


def required_backends(path) -> list[str]:
    """Backend ids the delegates of a .pte file name, read from its flatbuffer (every execution plan)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    pte = deserialize_pte_binary(open(path, "rb").read())
    prog = getattr(pte, "program", pte)
    return sorted({d.id for plan in prog.execution_plan for d in plan.delegates})


def set_threads(n: int) -> int:
    """Resize ExecuTorch's process-wide threadpool (used by XNNPACK) to `n`; returns the size now in effect."""
    from executorch.extension.pybindings import portable_lib
    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(int(n))
    return int(portable_lib._threadpool_get_thread_count())


@functools.cache
def runtime_format() -> bytes:
    """The program file identifier (e.g. b'ET12') of the installed ExecuTorch, from its shipped schema."""
    from importlib import resources
    schema = resources.files("executorch").joinpath("schema/program.fbs").read_bytes()
    return re.search(rb'file_identifier\s+"([^"]{4})"', schema)[1]


def check_format(path) -> None:
    """Refuse a .pte whose header is not an ExecuTorch program, or whose format is newer than this runtime reads
    (both versions named), before the runtime parses it."""
    from importlib import metadata
    head = open(path, "rb").read(8)
    ident = head[4:8]
    if len(head) < 8 or not re.fullmatch(rb"ET\d\d", ident):
        raise ArtifactError(f"executorch: {path.name} is not an ExecuTorch program (no ETnn identifier in its "
                            f"header; {len(head)} header bytes read)")
    if ident != runtime_format():
        newer = ident > runtime_format()
        raise RuntimeUnavailable(f"executorch: {path.name} is program format {ident.decode()}; this executorch "
                                 f"{metadata.version('executorch')} runtime reads {runtime_format().decode()} ("
                                 f"{'upgrade executorch to run it' if newer else 're-export it with this executorch'})")


@functools.cache
def _schema_arg_types(name: str, overload: str) -> tuple[str, ...] | None:
    """The types ('Tensor', 'int[]', 'Tensor?', ...) of a registered torch operator's arguments, then one entry for
    the return value a KernelCall always appends ('Tensor', 'Tensor[]' for several, '*' for none: ExecuTorch puts
    the out list there), or None if this process does not know the operator (custom kernels)."""
    import torch
    try:
        schemas = torch._C._jit_get_schemas_for_operator(name)
    except RuntimeError:
        return None
    match = next((x for x in schemas if x.overload_name == overload), None)
    if match is None:
        return None

    def spell(t) -> str:  # schema spelling: Tensor?, int[], Tensor?[]
        if isinstance(t, torch.OptionalType):
            return spell(t.getElementType()) + "?"
        if isinstance(t, torch.ListType):
            return spell(t.getElementType()) + "[]"
        return str(t)
    ret = [spell(r.type) for r in match.returns]
    return (*(spell(a.type) for a in match.arguments), ret[0] if len(ret) == 1 else "Tensor[]" if ret else "*")


def _takes(kind: str, value) -> bool:
    """Whether an argument of schema type `kind` may hold the EValue payload `value`."""
    from executorch.exir import schema as s
    if kind == "*":
        return True
    if isinstance(value, s.Null):
        return kind.endswith("?")
    tensors = (s.Tensor, s.TensorList, s.OptionalTensorList)
    if kind.startswith("Tensor"):
        return isinstance(value, s.Tensor) if kind.rstrip("?") == "Tensor" else isinstance(value, tensors[1:])
    return not isinstance(value, tensors)


def check_kernel_args(path) -> None:
    """Refuse a .pte whose kernel calls do not match their operators' schemas (index out of range, argument count,
    a Tensor slot given a scalar or the reverse): ExecuTorch 1.5.1 does not check this at load and aborts the
    process when the method runs. Operators unknown to this process (custom kernels) are not checked."""
    from executorch.exir import schema as s
    from executorch.exir._serialize._program import deserialize_pte_binary
    try:
        pte = deserialize_pte_binary(open(path, "rb").read())
    except Exception as e:  # noqa: BLE001 - the flatbuffer reader raises many types for damaged input
        raise ArtifactError(f"executorch: cannot read {path.name}: {type(e).__name__}: {e}") from None
    for plan in getattr(pte, "program", pte).execution_plan:
        calls = [i.instr_args for c in plan.chains for i in c.instructions if isinstance(i.instr_args, s.KernelCall)]
        for n, call in enumerate(calls):
            where = f"executorch: {path.name} method '{plan.name}' kernel call {n}"
            if not 0 <= call.op_index < len(plan.operators) or any(not 0 <= a < len(plan.values) for a in call.args):
                raise ArtifactError(f"{where}: operator or value index out of range")
            op = plan.operators[call.op_index]
            kinds = _schema_arg_types(op.name, op.overload)
            if kinds is None:
                continue
            if len(kinds) != len(call.args):
                raise ArtifactError(f"{where} ({op.name}.{op.overload}): {len(call.args)} values, its schema "
                                    f"takes {len(kinds)} (arguments and return)")
            for j, (kind, a) in enumerate(zip(kinds, call.args)):
                if not _takes(kind, val := plan.values[a].val):
                    raise ArtifactError(f"{where} ({op.name}.{op.overload}): argument {j} is "
                                        f"{type(val).__name__}, its schema takes {kind}")


@RUNTIMES.register("executorch")
class ExecuTorchSession(ArtifactSession):
    runtime = "executorch"

    def _load(self) -> None:
        require("executorch.runtime", EXTRA)
        from executorch.runtime import Runtime, Verification

        paths = {self.files[m] for m in METHODS}
        if len(paths) != 1:
            raise ValueError(f"executorch: both methods must live in one .pte, got {sorted(map(str, paths))}")
        self.path = paths.pop()
        if not self.path.is_file():
            raise FileNotFoundError(f"executorch: {self.path} does not exist")
        check_format(self.path)
        check_kernel_args(self.path)
        self.effective_threads = set_threads(self.threads)
        runtime = Runtime.get()
        try:  # InternalConsistency: the flatbuffer is verified before any method is read
            self.program = runtime.load_program(self.path, verification=Verification.InternalConsistency)
        except Exception as e:
            raise ArtifactError(f"executorch: cannot load {self.path.name}: {e}") from None
        if missing := [m for m in METHODS if m not in self.program.method_names]:
            raise ValueError(f"executorch: {self.path.name} has methods {sorted(self.program.method_names)}, "
                             f"missing {missing}")
        self._check_backends()
        self.methods = {}
        for m in METHODS:
            try:
                self.methods[m] = self.program.load_method(m)
            except Exception as e:
                self._check_backends(force=True)
                raise ArtifactError(f"executorch: cannot load method '{m}' of {self.path.name}: {e}") from None

    def _check_backends(self, force: bool = False) -> None:
        """RuntimeUnavailable when the .pte delegates to a backend this runtime does not register.

        Reading the flatbuffer costs a little, so by default only .pte files that mention a backend outside the
        registered set are parsed (a byte search for the ids of the known delegates)."""
        have = set(registered_backends())
        if not force:
            blob = self.path.read_bytes()
            suspects = [b for b in (b"CoreMLBackend", b"MPSBackend", b"VulkanBackend", b"QnnBackend",
                                    b"OpenvinoBackend", b"MLXBackend", b"NeuronBackend", b"CudaBackend")
                        if b.decode() not in have and b in blob]
            if not suspects:
                return
        missing = [b for b in required_backends(self.path) if b not in have]
        if missing:
            where = ("run it on an Apple device (iOS / macOS ExecuTorch build with the Core ML backend)"
                     if any(b in ("CoreMLBackend", "MPSBackend") for b in missing)
                     else "run it with an ExecuTorch build that links that backend")
            raise RuntimeUnavailable(f"executorch: {self.path.name} delegates to {', '.join(missing)}: "
                                     f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not registered "
                                     f"in this ExecuTorch runtime (registered: {', '.join(sorted(have)) or 'none'})"
                                     f"; {where}")

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        import torch
        args = [torch.from_numpy(np.ascontiguousarray(a)) for a in inputs]
        try:  # inputs were checked against the contract, so a failure here is the program's
            # Method.execute has no clone_outputs argument: its pybind method does (executorch 1.5.1)
            out = self.methods[method]._method(args, clone_outputs=False)
        except RuntimeError as e:
            raise ArtifactError(f"executorch: method '{method}' of {self.path.name} failed: {e}") from None
        return [np.array(o.numpy() if isinstance(o, torch.Tensor) else o) for o in out]

    def close(self) -> None:
        self.methods, self.program = {}, None
