"""ONNX Runtime sessions over the `onnx` exporter's `step.onnx` / `prefill.onnx`.

Providers come from the target profile's `[onnx] providers`, filtered to the ones this onnxruntime build has, and
always end with CPUExecutionProvider; the ones asked for but missing are kept in `unavailable_providers` so reports
can say e.g. "QNNExecutionProvider requested, not in this build". Every graph's inputs are checked against the state
contract at load, so a stale or foreign file fails with its name and the offending input, not inside ORT.
"""
from __future__ import annotations

import functools
import itertools
import re
from pathlib import Path, PureWindowsPath
from typing import ClassVar

import numpy as np

from afedge.exporting import require
from afedge.session import RUNTIMES, ArtifactError, ArtifactSession, RuntimeUnavailable

__all__ = ["OrtSession", "ONNX_TYPES"]

CPU = "CPUExecutionProvider"
# Defaults for `[onnx] iobinding` and `[onnx] session_config`, measured with benchmarks/ort_options.py on the 130M
# Mamba (2 threads, this shared 2-core box at load ~14): IOBinding 209 vs 187 ms/step (no gain: off); intra-op
# threads that sleep instead of spinning 27.6 vs 187 ms/step and 119 vs 40 prefill tok/s (spinning workers fight
# every other process for the cores), so spinning is off unless a profile turns it back on.
IOBINDING = False
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
# StateSlot.dtype -> the ONNX Runtime type string of a graph input.
ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)", "float16": "tensor(float16)",
              "int64": "tensor(int64)"}


def _provider_name(entry) -> str:
    return entry if isinstance(entry, str) else entry[0]


@RUNTIMES.register("onnxruntime")
class OrtSession(ArtifactSession):
    runtime = "onnxruntime"
    extra: ClassVar[str] = "onnx"

    def _load(self) -> None:
        ort = require("onnxruntime", self.extra)
        available = set(ort.get_available_providers())
        entries = list(self.options.get("providers") or [CPU])   # "Name" or ("Name", {provider options})
        self.requested_providers = [_provider_name(p) for p in entries]
        self.unavailable_providers = [_provider_name(p) for p in entries if _provider_name(p) not in available]
        providers = [p for p in entries if _provider_name(p) in available and _provider_name(p) != CPU]
        providers.append(next((p for p in entries if _provider_name(p) == CPU), CPU))

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                                self.options.get("graph_optimization_level", "ORT_ENABLE_ALL"))
        for key, value in (SESSION_CONFIG | (self.options.get("session_config") or {})).items():
            opts.add_session_config_entry(str(key), str(value))
        self._iobinding = bool(self.options.get("iobinding", IOBINDING))

        self._sessions, self._inputs = {}, {}
        for method, path in self.files.items():
            if not path.is_file():
                raise FileNotFoundError(f"{self.runtime}: {method} graph {path} does not exist")
            check_model_file(path)
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as e:  # noqa: BLE001 - ORT raises its own pybind types (Fail, InvalidProtobuf, ...)
                raise _load_error(path, e) from None
            self._inputs[method] = self._check_contract(method, path.name, sess)
            self._sessions[method] = sess
        self.providers = next(iter(self._sessions.values())).get_providers() if self._sessions else []
        spec = self.info.spec
        self._outputs = ["logits", *(f"state_out.{n}" for n in spec.names)]
        self._out_layout = [((self.info.batch, self.info.vocab_size), np.dtype(np.float32)),  # logits, then state
                            *((s.shape, np.dtype(s.dtype)) for s in spec.slots)]
        for method, sess in self._sessions.items():
            names = [o.name for o in sess.get_outputs()]
            if sorted(names) != sorted(self._outputs):
                raise ValueError(f"{self.runtime}: {self.files[method].name} ({method}) has outputs {names}; the "
                                 f"state contract expects {self._outputs}")

    def _check_contract(self, method: str, file: str, sess) -> list[str]:
        """The graph's input names in contract order; ValueError naming the file and the first bad input."""
        info, spec = self.info, self.info.spec
        tokens = ("token", (info.batch,)) if method == "step" else ("tokens", (info.batch, info.prefill_len))
        want = [(*tokens, "int64"), *((f"state.{s.name}", s.shape, s.dtype) for s in spec.slots)]
        got = {i.name: i for i in sess.get_inputs()}
        if extra := sorted(set(got) - {w[0] for w in want}):
            raise ValueError(f"{self.runtime}: {file} ({method}) has inputs {extra} that are not in the state "
                             f"contract (expected {[w[0] for w in want]})")
        for name, shape, dtype in want:
            if name not in got:
                raise ValueError(f"{self.runtime}: {file} ({method}) has no input '{name}' required by the state "
                                 f"contract (it has {list(got)})")
            shape_got = tuple(got[name].shape)
            if shape_got != tuple(shape) or got[name].type != ONNX_TYPES.get(dtype, dtype):
                raise ValueError(f"{self.runtime}: {file} ({method}) input '{name}' is {got[name].type}"
                                 f"{list(shape_got)}; the state contract says {dtype}{list(shape)}")
        return [w[0] for w in want]

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if not self._iobinding:
            feed = {n: np.ascontiguousarray(a) for n, a in zip(self._inputs[method], inputs)}
            return self._sessions[method].run(self._outputs, feed)
        # IOBinding: inputs bound in place, outputs written straight into fresh arrays (no copy out of ORT; fresh,
        # so the state a caller holds from an earlier call is never overwritten).
        sess = self._sessions[method]
        binding = sess.io_binding()
        for name, a in zip(self._inputs[method], inputs):
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        outs = [np.empty(shape, dtype) for shape, dtype in self._out_layout]
        for name, o in zip(self._outputs, outs):
            binding.bind_output(name, "cpu", 0, o.dtype, o.shape, o.ctypes.data)
        sess.run_with_iobinding(binding)
        return outs
    def close(self) -> None:
        self._sessions = {}


@functools.cache
def max_opset() -> int:
    """The newest ai.onnx opset this onnxruntime build implements (its operator schemas)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C
    return max(x.since_version for x in C.get_all_operator_schema() if x.domain in ("", "ai.onnx"))


def _node_tensors(nodes):
    """Tensor attributes of nodes (Constant values, ...), nested subgraphs included."""
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graph_tensors(g)


def _graph_tensors(graph):
    """Every TensorProto of a graph that may hold external data: initializers, sparse ones, attributes."""
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield from (sp.values, sp.indices)
    yield from _node_tensors(graph.node)


def _unsafe_location(base: Path, loc: str) -> str:
    """Why an external-data location is unsafe ('' when it is a plain file beside the model)."""
    if not loc:
        return "an empty location"
    if Path(loc).is_absolute() or PureWindowsPath(loc).is_absolute() or loc.startswith(("/", "\\")) \
            or PureWindowsPath(loc).drive:
        return "an absolute path"
    if ".." in re.split(r"[\\/]", loc):
        return "a path that leaves the model's directory ('..')"
    target = base / loc
    for p in [target, *target.parents]:
        if p == base:
            break
        if p.is_symlink():
            return f"a symbolic link ({p.name})"
    if not target.is_file():
        return "a file that does not exist"
    if not target.resolve().is_relative_to(base.resolve()):
        return "a path outside the model's directory"
    return ""


def check_model_file(path: Path) -> None:
    """Refuse an .onnx before ONNX Runtime opens it: unreadable protobuf, an opset or IR version newer than this
    runtime, or external data that is absolute, climbs out with '..', is a symlink, or is missing."""
    onnx = require("onnx", OrtSession.extra)
    import onnxruntime as ort
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and onnx's own errors
        raise ArtifactError(f"onnxruntime: {path.name} is not a readable ONNX model ({type(e).__name__}: "
                            f"{str(e).strip()[:200]})") from None
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > max_opset():
        raise RuntimeUnavailable(f"onnxruntime: {path.name} needs ONNX opset {opset}; this onnxruntime "
                                 f"{ort.__version__} supports opsets up to {max_opset()} (upgrade onnxruntime, or "
                                 f"export with a lower [onnx] opset)")
    base = path.parent
    for t in itertools.chain(_graph_tensors(model.graph), *(_node_tensors(f.node) for f in model.functions)):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        if why := _unsafe_location(base, loc):
            raise ArtifactError(f"onnxruntime: {path.name}: tensor '{t.name}' keeps its data in '{loc}', "
                                f"{why}; refused before reading (external data must be a regular file beside "
                                f"the model)")


def _load_error(path: Path, e: Exception) -> Exception:
    """ONNX Runtime's load failure as a one-line error naming the file (and both IR versions when that is it)."""
    import onnxruntime as ort
    msg = str(e)
    if m := re.search(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)", msg):
        return RuntimeUnavailable(f"onnxruntime: {path.name} has ONNX IR version {m[1]}; this onnxruntime "
                                  f"{ort.__version__} reads IR versions up to {m[2]} (upgrade onnxruntime)")
    first = next((ln.strip() for ln in msg.splitlines() if ln.strip()), type(e).__name__)
    return ArtifactError(f"onnxruntime: cannot load {path.name}: {first[:300]}")
