"""ONNX exporter: both methods of a program as two static-shape ONNX graphs, `step.onnx` and `prefill.onnx`.

Flow: `program.graph(method)` -> `torch.onnx.export(..., dynamo=True)` under `torch.no_grad()` -> `ONNXProgram.save`
-> `onnx.checker`. Weights are inlined (one self-contained file per method, so a copied-alone .onnx still loads)
unless the model is over `external_data_threshold`, where protobuf's 2 GB limit forces external data: each method
then gets a `<file>.data` next to it, which the bundle carries. Heavy imports (onnx, torch.onnx) are lazy.

Calling convention of both graphs, names included (ORT feeds by name):
  step:    token (B,) int64,       state.<slot>... -> logits (B, V) float32, state_out.<slot>...
  prefill: tokens (B, T) int64,    state.<slot>... -> logits (B, V) float32, state_out.<slot>...
"""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path
from typing import ClassVar

import torch

from afedge.exporting import EXPORTERS, Artifact, Exporter, ExportError, require
from afedge.quant import QuantPlan, QuantPolicy, resolve_plan
from afedge.quant.calibration import calibration_feeds
from afedge.quant.onnx_ort import quantize_graph, weight_bytes
from afedge.rewrite import METHODS, RecurrentProgram
from afedge.target import Target

# `[onnx] optimize` default: onnxscript's graph optimizer inside torch.onnx.export. Off: ONNX Runtime's own graph
# optimisation (ORT_ENABLE_ALL) gives the same run time without it, and it dominated large exports. Measured on a
# mamba d768 slice (vocab 50280, prefill graph, ORT 2 threads): 2 layers 2.8 vs 6.9 s export, 23.29 ms both;
# 6 layers 9.0 vs 37.2 s export, 41.90 vs 41.84 ms, session load 0.9 vs 0.6 s (the 24-layer 130M shape spent 41 of
# its 46 export minutes there).
OPTIMIZE = False

__all__ = ["OnnxExporter", "op_types", "model_nbytes", "accuracy_level"]


# MatMulNBits' `accuracy_level` -> the type it computes in (0: unset, the kernel's default, fp32 on CPU).
COMPUTE = {0: "fp32", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8"}


def accuracy_level(target: Target) -> int:
    """The target's `[onnx] accuracy_level` for MatMulNBits: 0 (unset, the default) to 4 (int8 compute)."""
    level = target.onnx.get("accuracy_level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or level not in COMPUTE:
        raise ExportError(f"target {target.name}: [onnx] accuracy_level must be an integer 0-4 "
                          f"(MatMulNBits' attribute), got {level!r}")
    return level


@EXPORTERS.register("onnx")
class OnnxExporter(Exporter):
    name = "onnx"
    runtime = "onnxruntime"
    extra = "onnx"
    # Realised through onnxruntime.quantization on the exported fp32 graph (afedge.quant.onnx_ort).
    quant_schemes: ClassVar[tuple[str, ...]] = ("fp32", "int8", "int8-dyn", "int4-g32", "int4-g128", "qdq-u8",
                                                "qdq-u16a8w")
    opset: ClassVar[int] = 18                               # default; a target's `[onnx] opset` overrides it
    # `[onnx] accuracy_level` 4: MatMulNBits computes in int8, quantizing its input per block of K at run time
    # (ORT's CompInt8; the 130M Mamba's int8 decode 13x level 0's here, README "Performance"). Simulated as the
    # dynamic-activation scheme with the same weights, so the export guard keeps fp32 what that rounding breaks.
    int8_compute: ClassVar[dict[str, str]] = {"int8": "int8-dyn", "int4-g32": "8da4w"}
    external_data_threshold: ClassVar[int] = 2 * 1024**3    # bytes of weights above which data goes external
    files: ClassVar[dict[str, str]] = {m: f"{m}.onnx" for m in METHODS}

    def realised_as(self, target: Target) -> dict[str, str]:
        return self.simulated_as | (self.int8_compute if accuracy_level(target) == 4 else {})

    def export(self, program: RecurrentProgram, target: Target, quant: str | QuantPlan,
               out_dir: Path, policy: QuantPolicy = QuantPolicy()) -> list[Artifact]:
        level = accuracy_level(target)
        plan = resolve_plan(quant, program.model, self.quant_schemes, policy, self.realised_as(target))
        self.check_quant(plan.scheme, target)
        onnx = require("onnx", self.extra)
        require("onnxscript", self.extra)  # torch.onnx's dynamo exporter needs it
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        opset = int(target.onnx.get("opset", self.opset))
        threshold = int(target.onnx.get("external_data_threshold", self.external_data_threshold))
        weights = model_nbytes(program.model)
        external = weights > threshold
        if external and plan.layers:
            raise ExportError(f"exporter 'onnx' (target {target.name}): quant '{plan.scheme}' of a model above "
                              f"the external-data threshold ({weights} > {threshold} bytes) is not supported; "
                              f"export fp32, or use the executorch / tvm exporter")
        feeds = calibration_feeds(program) if plan.quantized and plan.spec.activations == "static" else {}
        qinfo = {"weight_bytes": 0, "fp32_weight_bytes": 0, "methods": {}}

        info: dict = {"opset": opset, "ir_version": None, "external_data": {}, "weights_bytes": weights,
                      "ops": {}, "bytes": {}, "export_seconds": {}}
        for method in METHODS:
            path = out_dir / self.files[method]
            t0 = time.perf_counter()
            onnx_program = self._export_graph(program, method, opset, target)
            onnx_program.save(str(path), external_data=external)
            info["export_seconds"][method] = round(time.perf_counter() - t0, 3)
            qinfo["methods"][method] = self._quantize(path, program, plan, feeds.get(method), target, external, level)
            qinfo["weight_bytes"] += qinfo["methods"][method]["weight_bytes"]
            qinfo["fp32_weight_bytes"] += qinfo["methods"][method]["fp32_weight_bytes"]
            data = path.with_name(path.name + ".data")
            if external and data.is_file():
                info["external_data"][method] = data.name
            try:
                # The path form reads external data itself and lifts the 2 GB proto limit.
                onnx.checker.check_model(str(path) if external else onnx.load(str(path)))
            except onnx.checker.ValidationError as e:
                raise ExportError(f"exporter 'onnx' (target {target.name}): method '{method}' exported but "
                                  f"{path.name} fails onnx.checker: {str(e).strip().splitlines()[0]}") from None
            model = onnx.load(str(path), load_external_data=False)
            info["ir_version"] = int(model.ir_version)
            info["ops"][method] = op_types(model)
            info["bytes"][method] = path.stat().st_size + (data.stat().st_size if data.is_file() else 0)
        if level and plan.quantized and plan.spec.activations == "float":
            qinfo["realised_as"] = f"MatMulNBits computing in {COMPUTE[level]} (accuracy_level {level})" + (
                ": inputs quantized per block at run time" if COMPUTE[level] == "int8" else "")
        info["quant"] = plan.to_json() | qinfo
        return [Artifact(name="onnx", exporter=self.name, runtime=self.runtime, arch="any",
                         files=dict(self.files), info=info)]

    def _quantize(self, path: Path, program: RecurrentProgram, plan: QuantPlan, feeds: list | None,
                  target: Target, external: bool, level: int) -> dict:
        """Quantize the saved fp32 graph of one method in place (nothing to do for fp32); what it did, in bytes."""
        if not plan.layers:
            onnx = require("onnx", self.extra)
            n = weight_bytes(onnx.load(str(path), load_external_data=True)) if not external else model_nbytes(
                program.model)
            return {"weight_bytes": n, "fp32_weight_bytes": n}
        require("onnxruntime", self.extra)
        linears = {n: program.model.get_submodule(n).weight.detach().float().numpy() for n in plan.quantized}
        providers = [p if isinstance(p, str) else p[0] for p in target.onnx.get("providers", [])]
        try:
            return quantize_graph(path, plan, linears, feeds, qnn="QNNExecutionProvider" in providers,
                                  accuracy_level=level, embedding=program.model.embed.weight.detach().float().numpy())
        except Exception as e:  # noqa: BLE001 - onnxruntime.quantization raises many types
            raise ExportError(f"exporter 'onnx' (target {target.name}): quantizing {path.name} as "
                              f"'{plan.scheme}' failed: {type(e).__name__}: {str(e).strip().splitlines()[0]}; "
                              f"try --quant fp32 or another scheme") from e

    def _export_graph(self, program: RecurrentProgram, method: str, opset: int, target: Target):
        """torch.onnx.export of one method; any failure becomes an ExportError naming the op and where it is."""
        graph = program.graph(method).eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.onnx.export(graph, program.example_inputs(method), None, dynamo=True,
                                         opset_version=opset, input_names=program.input_names(method),
                                         output_names=program.output_names(), external_data=False,
                                         verbose=False, optimize=bool(target.onnx.get("optimize", OPTIMIZE)))
        except Exception as e:  # noqa: BLE001 - torch.onnx raises many types; all become one clear error
            raise ExportError(f"exporter 'onnx' (target {target.name}) cannot export method '{method}' of "
                              f"{'/'.join(dict.fromkeys(program.model.family_per_layer()))}: "
                              f"{_describe_failure(e)} (rewrite that op in the mixer)"
                              ) from e


def model_nbytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (tied weights counted once)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def op_types(model) -> list[str]:
    """Sorted op types of a ModelProto, nested subgraphs and local functions included (`domain::Op` off-default)."""
    ops: set[str] = set()

    def walk(nodes) -> None:
        for n in nodes:
            ops.add(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}")
            for a in n.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g.node)

    walk(model.graph.node)
    for f in model.functions:
        walk(f.node)
    return sorted(ops)


def _describe_failure(exc: BaseException) -> str:
    """The failing aten/prims op, its FX node and the source line it came from, plus the root cause's message."""
    chain, e = [], exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    node = _failing_fx_node(chain)
    root = next((line.strip() for line in str(chain[-1]).splitlines() if line.strip()), type(chain[-1]).__name__)
    if node is not None:
        where = _source_of(node)
        return f"op {node.target} (node %{node.name}{' ' + where if where else ''}): {root}"
    text = "\n".join(str(c) for c in chain)
    if m := re.search(r"target=torch\.ops\.([\w.]+)", text):
        return f"op {m.group(1)}: {root}"
    return f"{type(chain[-1]).__name__}: {root}"


def _failing_fx_node(chain: list[BaseException]):
    """The torch.fx.Node being translated when torch.onnx failed (from the translator's frame), or None."""
    for e in chain:
        tb = e.__traceback__
        while tb is not None:
            node = tb.tb_frame.f_locals.get("node")
            if isinstance(node, torch.fx.Node) and node.op == "call_function":
                return node
            tb = tb.tb_next
    return None


def _source_of(node) -> str:
    """'from aten.cumprod.default (torch.cumprod), afedge/mixers/x.py:42 in blocks.0.mixer (X)', as far as known.

    Non-strict torch.export keeps only `forward` frames, so for `step` graphs the line is often the graph's own
    forward; the original aten op and torch function still say what to look for in the mixer."""
    parts = []
    original = node.meta.get("original_aten")
    if original is not None and str(original) != str(node.target):
        parts.append(f"from {original}")
    fn = node.meta.get("torch_fn")
    if fn and len(fn) == 2:
        parts.append(f"(torch {str(fn[1]).rsplit('.', 1)[-1]})")
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    if frames:
        file, line = frames[-1]
        parts.append(f"at {'afedge/' + file.split('/afedge/')[-1] if '/afedge/' in file else file}:{line}")
    stack = [v for v in (node.meta.get("nn_module_stack") or {}).values() if v[0]]
    if stack:
        path, cls = stack[-1]
        cls_name = getattr(cls, "__name__", str(cls).rsplit(".", 1)[-1].strip("'>"))
        parts.append(f"in {path.removeprefix('L__self___')} ({cls_name})")
    return " ".join(parts)
