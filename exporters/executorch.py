"""ExecuTorch exporter: both methods of a program lowered into one multi-method `model.pte`.

Flow: `program.export("step")`, `program.export("prefill")` (under no_grad) -> `to_edge_transform_and_lower(
{"step": ep, "prefill": ep}, partitioner=[...])` -> `.to_executorch()` -> `model.pte`. The two methods share their
constants inside the one file. Heavy imports (executorch, coremltools) are lazy.

Partitioners come from the target's `[executorch] partitioners`:
  ["xnnpack"] -> XnnpackPartitioner (CPU), artifact "executorch", quant fp32, int8, int8-dyn or 8da4w (torchao
                 quantizes a copy of the model first: afedge.quant.et_torchao);
  ["coreml"]  -> CoreMLPartitioner with compile specs from the profile (`compute_precision`,
                 `minimum_deployment_target`, optional `compute_unit`), artifact "executorch-coreml",
                 quant fp16 (the delegate computes in fp16; needs compute_precision = "float16") or fp32
                 (compute precision forced to float32). A Core ML .pte runs only on Apple devices.

Whatever a delegate rejects stays in the method's top-level graph and runs on ExecuTorch's portable (CPU)
kernels. `Artifact.info["delegation"]` records, per method, the delegated subgraphs and every node left on
portable kernels (node name, aten op, the module and source line it came from); `delegation_lines(info)` turns
that into the lines the CLI prints.

Calling convention of every method: (token(s), *state) -> (logits, *state), in the StateSpec order.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

from afedge.exporting import EXPORTERS, Artifact, Exporter, ExportError, require
from afedge.quant import QuantPlan, QuantPolicy, resolve_plan
from afedge.quant import scheme as get_scheme
from afedge.quant.et_torchao import REALISED_AS
from afedge.quant.weights import embedding_bytes
from afedge.rewrite import METHODS, RecurrentProgram
from afedge.target import Target

__all__ = ["ExecuTorchExporter", "PARTITIONERS", "PTE_FILE", "lower", "delegation_report", "delegation_lines",
           "xnnpack_safe", "pte_weight_bytes"]

PTE_FILE = "model.pte"
PARTITIONERS = ("xnnpack", "coreml")
# Nodes that are bookkeeping, not kernels: never reported as portable fallbacks.
_NOT_KERNELS = ("getitem", "executorch_call_delegate")


def _op_name(target) -> str:
    """`aten.mean.dim` for an edge op, an aten OpOverload or a Python callable."""
    if type(target).__name__ == "EdgeOpOverload":  # wraps the aten OpOverload in `_op`
        target = target._op
    import torch
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))


def _origin(node) -> tuple[str, str]:
    """(module path, 'file:line') a node came from, from the export metadata (either may be empty)."""
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    module = module.removeprefix("L['self'].").replace("L['self']", "")
    source = ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', node.meta.get("stack_trace") or "")
    for path, line in reversed(frames):  # innermost frame of model code (not torch / library internals)
        if "site-packages" not in path and "/torch/" not in path and not path.startswith("<"):
            source = f"{path[path.rfind('afedge/'):] if 'afedge/' in path else path}:{line}"
            break
    return module, source


def delegation_report(edge) -> dict[str, dict]:
    """Per method of a lowered EdgeProgramManager: delegated subgraphs/nodes per backend and the portable nodes."""
    from executorch.exir.lowered_backend_module import LoweredBackendModule

    report = {}
    for method in edge.methods:
        gm = edge.exported_program(method).graph_module
        subgraphs, delegated, portable = Counter(), Counter(), []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = _op_name(node.target)
            if name == "executorch_call_delegate":
                lowered = getattr(gm, node.args[0].target)
                if isinstance(lowered, LoweredBackendModule):
                    subgraphs[lowered.backend_id] += 1
                    delegated[lowered.backend_id] += sum(
                        1 for n in lowered.original_module.graph.nodes
                        if n.op == "call_function" and _op_name(n.target) not in _NOT_KERNELS)
                continue
            if name in _NOT_KERNELS:
                continue
            module, source = _origin(node)
            portable.append({"node": node.name, "op": name, "module": module, "source": source})
        report[method] = {
            "delegated_subgraphs": sum(subgraphs.values()),
            "delegated_nodes": sum(delegated.values()),
            "backends": {b: {"subgraphs": subgraphs[b], "nodes": delegated[b]} for b in sorted(subgraphs)},
            "portable_nodes": len(portable),
            "portable_ops": dict(Counter(p["op"] for p in portable).most_common()),
            "portable": portable,
        }
    return report


def delegation_lines(info: dict, max_nodes: int = 8) -> list[str]:
    """Human-readable delegation summary of an executorch Artifact's info (what `afedge export` prints)."""
    lines = []
    for method, r in (info.get("delegation") or {}).items():
        backends = ", ".join(f"{b} {v['subgraphs']} subgraphs / {v['nodes']} nodes"
                             for b, v in r["backends"].items()) or "nothing delegated"
        lines.append(f"{method}: {backends}; {r['portable_nodes']} nodes on portable kernels")
        for p in r["portable"][:max_nodes]:
            where = " ".join(x for x in (p["module"], f"({p['source']})" if p["source"] else "") if x)
            lines.append(f"  portable: {p['node']} = {p['op']}{'  ' + where if where else ''}")
        if r["portable_nodes"] > max_nodes:
            more = ", ".join(f"{op} x{n}" for op, n in r["portable_ops"].items())
            lines.append(f"  ... {r['portable_nodes'] - max_nodes} more (all portable ops: {more})")
    return lines


def _gelu_tanh_decomposition(x, approximate: str = "none"):
    """aten.gelu(approximate="tanh") as mul/add/tanh; exact GELU is left alone (NotImplemented keeps the op)."""
    import math

    import torch
    if approximate == "tanh":
        return 0.5 * x * (1.0 + torch.tanh((x + 0.044715 * x * x * x) * math.sqrt(2.0 / math.pi)))
    return NotImplemented


def _rms_norm_decomposition(x, normalized_shape, weight=None, eps=None):
    """aten.rms_norm over the last dim with the mean as a matmul by a constant column and eps as a tensor: the
    core-ATen decomposition gives `mean.dim` + `add.Scalar`, which XNNPACK rejects, so every norm would split the
    delegate (and run on portable kernels); this form is linear/mul/add/rsqrt, all delegated."""
    import torch
    if len(normalized_shape) != 1 or x.dtype != torch.float32:
        return NotImplemented
    d = x.shape[-1]
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    ms = torch.nn.functional.linear(x * x, torch.full((1, d), 1.0 / d, dtype=x.dtype))  # (..., 1)
    y = x * torch.rsqrt(ms + torch.full((1,), eps, dtype=x.dtype))
    return y if weight is None else y * weight


def _has_gelu_tanh(ep) -> bool:
    return any(n.op == "call_function" and "gelu" in _op_name(n.target) and n.kwargs.get("approximate") == "tanh"
               for n in ep.graph.nodes)


def xnnpack_safe(programs: dict) -> dict:
    """Work around ExecuTorch 1.5.1's XNNPACK GELU: its partitioner takes `aten.gelu` whatever `approximate`
    says and its visitor always emits XNNPACK's exact (erf) GELU, so a tanh-approximate GELU (our MLP) comes out
    silently wrong (max rel 8e-5 on one GELU). Tanh GELUs are decomposed into mul/add/tanh first, which XNNPACK
    takes exactly (and `_ExactGeluConfig` refuses any tanh GELU left). RMSNorm is rewritten so XNNPACK takes it
    too (see `_rms_norm_decomposition`)."""
    import torch
    table = {torch.ops.aten.gelu.default: _gelu_tanh_decomposition,
             torch.ops.aten.rms_norm.default: _rms_norm_decomposition}
    return {m: ep.run_decompositions(table) for m, ep in programs.items()}


def _xnnpack_partitioner():
    """XnnpackPartitioner with two ExecuTorch 1.5.1 configs tightened to what the XNNPACK serializer really does:

    - GELU: only approximate="none" (see `xnnpack_safe`);
    - max.dim: the config checks rank 4 only, but the visitor (operators/op_max_dim.py) then raises
      "amax.default only supports dim == 2 or dim == 3" for any other literal dim (dim=-1 included) or without
      keepdim, failing the whole export. Such nodes now stay on the portable kernel instead."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.generic_node_configs import GeluConfig
    from executorch.backends.xnnpack.partition.config.node_configs import MaxDimConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    class _ExactGeluConfig(GeluConfig):
        def check_constraints(self, node, ep) -> bool:
            return node.kwargs.get("approximate", "none") == "none" and super().check_constraints(node, ep)

    class _PoolableMaxDimConfig(MaxDimConfig):
        def check_constraints(self, node, ep) -> bool:
            keepdim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
            return (len(node.args) > 1 and node.args[1] in (2, 3) and bool(keepdim)
                    and super().check_constraints(node, ep))

    swap = {GeluConfig: _ExactGeluConfig, MaxDimConfig: _PoolableMaxDimConfig}
    return XnnpackPartitioner(configs=[swap.get(c, c) for c in ALL_PARTITIONER_CONFIGS])


def _strip_provenance(gm):
    """Drop the `from_node` provenance chains torch.fx grows on every pass (deep-copied per node per pass; they
    only slow lowering down). A transform pass for `to_edge_transform_and_lower`."""
    import torch
    from torch.fx.passes.infra.pass_base import PassResult

    for mod in gm.modules():
        if isinstance(mod, torch.fx.GraphModule):
            for node in mod.graph.nodes:
                node.meta.pop("from_node", None)
    return PassResult(gm, False)


def _nodes_named_in(message: str, programs: dict) -> str:
    """The graph nodes whose aten op a lowering error message mentions: 'node (op, module, source); ...'."""
    hits = []
    for method, ep in programs.items():
        for node in ep.graph.nodes:
            if node.op != "call_function":
                continue
            op = _op_name(node.target)
            short = op.removeprefix("aten.").rsplit(".", 1)[0]
            if op in message or re.search(rf"\b{re.escape(short)}(_copy)?(\.|\b)", message):
                module, source = _origin(node)
                hits.append(f"{method}:{node.name} ({op}{', ' + module if module else ''}"
                            f"{', ' + source if source else ''})")
    return "; ".join(hits[:6]) + (f"; ... {len(hits) - 6} more" if len(hits) > 6 else "")


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return f"{type(e).__name__}: {s.splitlines()[0] if s else ''}"


def lower(programs: dict, partitioners: list, where: str = "exporter 'executorch'", fold_constants: bool = True,
          keep_ops: set | None = None):
    """ExportedPrograms by method -> lowered EdgeProgramManager. Errors name the method and the node / op.

    fold_constants: run ExecuTorch's constant propagation first, so subgraphs that depend only on parameters
    (decay matrices, causal masks: arange / full / le / where) become constants instead of portable kernels run
    on every call (retnet prefill: 114 -> 46 portable nodes, a smaller .pte, lowering about 25% faster).
    keep_ops: ops constant propagation must not evaluate (torchao's quantize / dequantize of weights)."""
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    for ep in programs.values():
        _strip_provenance(ep.graph_module)
    if fold_constants:
        try:
            programs = {m: constant_prop_pass(ep, custom_skip_targets=keep_ops) for m, ep in programs.items()}
        except Exception as e:
            raise ExportError(f"{where}: constant folding failed: {_first_line(e)}; "
                              f"lower(..., fold_constants=False) skips it") from e
    try:
        return to_edge_transform_and_lower(programs, partitioner=partitioners, transform_passes=[_strip_provenance])
    except Exception as e:
        culprit = _blame(programs, partitioners) if len(programs) > 1 else next(iter(programs))
        nodes = _nodes_named_in(str(e), programs)
        raise ExportError(f"{where}: lowering the '{culprit}' graph failed: {_first_line(e)}"
                          f"{'; nodes: ' + nodes if nodes else ''}; try another runtime (onnx, tvm)") from e


def _blame(programs: dict, partitioners: list) -> str:
    """Which method fails to lower on its own (only called after a multi-method failure)."""
    from executorch.exir import to_edge_transform_and_lower

    for method, ep in programs.items():
        try:
            to_edge_transform_and_lower({method: ep}, partitioner=partitioners)
        except Exception:
            return method
    return "+".join(programs)


def pte_weight_bytes(path: Path) -> int:
    """Bytes of constant data a .pte holds: its constant buffer (non-delegated weights, e.g. the embedding) plus
    the named data store, where XNNPACK keeps its (packed) weights, shared by both methods."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    pte = deserialize_pte_binary(Path(path).read_bytes())
    named = getattr(pte, "named_data", None)
    return (sum(len(b.storage) for b in pte.program.constant_buffer)
            + sum(len(b) for b in (getattr(named, "buffers", None) or [])))


def _coreml_partitioner(target: Target, quant: str) -> tuple[object, dict]:
    """CoreMLPartitioner with compile specs from the profile; returns (partitioner, specs recorded in info)."""
    ct = require("coremltools", ExecuTorchExporter.extra)
    try:
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner
    except ImportError as e:
        raise ExportError(f"exporter 'executorch' (target {target.name}): the Core ML delegate does not import "
                          f"({e}); pip install coremltools") from None
    cfg = target.executorch or {}
    precision = str(cfg.get("compute_precision", "float16")).lower()
    if quant == "fp32":
        precision = "float32"  # the caller asked for fp32 numerics: do not let the delegate drop to fp16
    elif precision != "float16":
        raise ExportError(f"exporter 'executorch' (target {target.name}): quant 'fp16' needs [executorch] "
                          f"compute_precision = \"float16\", the profile says '{precision}'")
    deploy = cfg.get("minimum_deployment_target")
    if deploy is not None and not hasattr(ct.target, str(deploy)):
        known = ", ".join(t for t in dir(ct.target) if t[:3] in ("iOS", "mac", "tvO", "wat"))
        raise ExportError(f"exporter 'executorch' (target {target.name}): unknown minimum_deployment_target "
                          f"'{deploy}' in {target.path or 'the profile'}; known: {known}")
    unit = str(cfg.get("compute_unit", "ALL")).upper()
    if unit not in ct.ComputeUnit.__members__:
        raise ExportError(f"exporter 'executorch' (target {target.name}): unknown compute_unit '{unit}'; "
                          f"known: {', '.join(ct.ComputeUnit.__members__)}")
    specs = CoreMLBackend.generate_compile_specs(
        compute_unit=ct.ComputeUnit[unit],
        minimum_deployment_target=getattr(ct.target, str(deploy)) if deploy is not None else None,
        compute_precision=ct.precision.FLOAT16 if precision == "float16" else ct.precision.FLOAT32)
    # State is passed in and out (no mutable buffers), so there is nothing for take_over_mutable_buffer to take.
    part = CoreMLPartitioner(compile_specs=specs)
    return part, {"compute_precision": precision, "minimum_deployment_target": deploy, "compute_unit": unit}


@EXPORTERS.register("executorch")
class ExecuTorchExporter(Exporter):
    name = "executorch"
    runtime = "executorch"
    extra = "executorch"
    # fp16 only through the Core ML delegate (its compute precision); integer schemes through torchao for
    # XNNPACK (afedge.quant.et_torchao: int8 and int8-dyn are both realised with dynamic int8 activations).
    quant_schemes: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8", "int8-dyn", "8da4w")
    simulated_as: ClassVar[dict[str, str]] = {"int8": "int8-dyn"}

    @staticmethod
    def partitioner_names(target: Target) -> list[str]:
        names = [str(n).lower() for n in (target.executorch or {}).get("partitioners", ["xnnpack"])]
        if unknown := [n for n in names if n not in PARTITIONERS]:
            raise ExportError(f"exporter 'executorch' (target {target.name}): unknown partitioners {unknown} in "
                              f"{target.path or 'the profile'}; known: {', '.join(PARTITIONERS)}")
        if not names:
            raise ExportError(f"exporter 'executorch' (target {target.name}): [executorch] partitioners is empty")
        return names

    def check_quant(self, quant: str, target: Target) -> None:
        super().check_quant(quant, target)
        if quant == "fp16" and "coreml" not in self.partitioner_names(target):
            raise ExportError(f"exporter 'executorch' (target {target.name}): quant 'fp16' is realised only by "
                              f"the Core ML delegate (partitioners = [\"coreml\"]); XNNPACK artifacts are fp32")
        if get_scheme(quant).quantizes_weights and "xnnpack" not in self.partitioner_names(target):
            raise ExportError(f"exporter 'executorch' (target {target.name}): quant '{quant}' is realised only "
                              f"through XNNPACK (partitioners = [\"xnnpack\"]); the Core ML delegate takes fp16")

    def partitioners(self, target: Target, quant: str) -> tuple[list, dict]:
        names, parts, specs = self.partitioner_names(target), [], {}
        for n in names:
            if n == "xnnpack":
                parts.append(_xnnpack_partitioner())
            else:
                part, specs["coreml"] = _coreml_partitioner(target, quant)
                parts.append(part)
        return parts, specs

    def export(self, program: RecurrentProgram, target: Target, quant: str | QuantPlan,
               out_dir: Path, policy: QuantPolicy = QuantPolicy()) -> list[Artifact]:
        plan = resolve_plan(quant, program.model, self.quant_schemes, policy, self.realised_as(target))
        quant = plan.scheme
        self.check_quant(quant, target)
        require("executorch.exir", self.extra)
        where = f"exporter 'executorch' (target {target.name})"
        parts, specs = self.partitioners(target, quant)
        names = self.partitioner_names(target)

        t0 = time.perf_counter()
        keep = None
        if plan.layers:
            from afedge.quant.et_torchao import keep_ops, torchao_quantized
            require("torchao.quantization", self.extra)
            program, keep = RecurrentProgram(torchao_quantized(program.model, plan), program.chunk_size,
                                             program.prefill_len, program.batch), keep_ops()
        programs = {}
        for method in METHODS:
            try:
                programs[method] = program.export(method)  # under no_grad (RecurrentProgram.export)
            except Exception as e:
                raise ExportError(f"{where}: torch.export of the '{method}' graph failed: {_first_line(e)}") from e
        if "xnnpack" in names:
            programs = xnnpack_safe(programs)
        export_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        edge = lower(programs, parts, where, keep_ops=keep)
        report = delegation_report(edge)
        lower_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        try:
            et = edge.to_executorch()
        except Exception as e:
            nodes = _nodes_named_in(str(e), {m: edge.exported_program(m) for m in edge.methods})
            raise ExportError(f"{where}: to_executorch failed: {_first_line(e)}"
                              f"{'; nodes: ' + nodes if nodes else ''}; the op has no portable kernel: "
                              f"try another runtime (onnx, tvm)") from e
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / PTE_FILE
        path.write_bytes(et.buffer)

        coreml = "coreml" in names
        info = {
            "partitioners": names,
            "backends": sorted({b for r in report.values() for b in r["backends"]}),
            "precision": specs["coreml"]["compute_precision"] if coreml else "float32",
            "delegation": report,
            "bytes": path.stat().st_size,
            "export_s": round(export_s, 2), "lower_s": round(lower_s, 2),
            "to_executorch_s": round(time.perf_counter() - t2, 2),
            "quant": plan.to_json() | {"weight_bytes": pte_weight_bytes(path)}
                     | ({"realised_as": REALISED_AS[quant]} if quant in REALISED_AS else {})
                     | ({"embedding_bytes": embedding_bytes(program.model)} if plan.embedding else {}),
        }
        if coreml:
            info["coreml"] = specs["coreml"]
            info["runs_on"] = "Apple devices only (CoreMLBackend is not in the Linux/pip ExecuTorch runtime)"
        return [Artifact(name="executorch-coreml" if coreml else "executorch", exporter=self.name,
                         runtime=self.runtime, arch="any", files={m: PTE_FILE for m in METHODS}, info=info)]
