"""ONNX Runtime sessions over the `onnx` exporter's `step.onnx` / `prefill.onnx`.

Providers come from the target profile's `[onnx] providers`, filtered to the ones this onnxruntime build has, and
always end with CPUExecutionProvider; the ones asked for but missing are kept in `unavailable_providers` so reports
can say e.g. "QNNExecutionProvider requested, not in this build". Every graph's inputs are checked against the state
contract at load, so a stale or foreign file fails with its name and the offending input, not inside ORT.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from afedge.exporting import require
from afedge.session import RUNTIMES, ArtifactSession

__all__ = ["OrtSession", "ONNX_TYPES"]

CPU = "CPUExecutionProvider"
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
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL

        self._sessions, self._inputs = {}, {}
        for method, path in self.files.items():
            if not path.is_file():
                raise FileNotFoundError(f"{self.runtime}: {method} graph {path} does not exist")
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            self._inputs[method] = self._check_contract(method, path.name, sess)
            self._sessions[method] = sess
        self.providers = next(iter(self._sessions.values())).get_providers() if self._sessions else []
        spec = self.info.spec
        self._outputs = ["logits", *(f"state_out.{n}" for n in spec.names)]
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
        feed = {n: np.ascontiguousarray(a) for n, a in zip(self._inputs[method], inputs)}
        return self._sessions[method].run(self._outputs, feed)

    def close(self) -> None:
        self._sessions = {}
