"""ONNX realisation of the quant schemes through onnxruntime.quantization, on an exported fp32 graph.

Before quantizing, the planned Linear layers are found by value (each Linear's weight, or its transpose, is
an initializer of the exported graph; names are the exporter's own) and every one that exported as `Gemm` (a
rank-2 Linear, the `step` graph) is rewritten as `MatMul` + `Add`: ORT's MatMulNBits quantizer skips Gemm
("Unsupported operator Gemm for weight only quantization"). Only the MatMul nodes of planned layers are handed
to ORT (nodes_to_include / nodes_to_quantize), so mixers' fp32 parameters, norms, the embedding and every
MatMul on the state stay fp32.

  int8               MatMulNBits bits=8, symmetric, one block per output channel (block = K rounded up to 2^n;
                     for K > 256, blocks of 256: MLAS quantizes blocks of 16..256 only)
  int4-g32/-g128     MatMulNBits bits=4, symmetric, block 32 / 128
  int8-dyn           quantize_dynamic: DynamicQuantizeLinear + MatMulInteger, uint8 activations and uint8
                     per-channel weights (the u8u8 kernel: no AVX2 u8s8 saturation, no reduce_range; see _dynamic)
  qdq-u8 / -u16a8w   quantize_static, QDQ format, MinMax calibration on inputs recorded from the program itself;
                     a target whose providers name QNNExecutionProvider gets ORT's get_qnn_qdq_config
"""
from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from pathlib import Path

import numpy as np

from afedge.quant.policy import QuantPlan
from afedge.quant.schemes import Scheme

__all__ = ["quantize_graph", "weight_bytes", "layer_nodes", "MAX_BLOCK"]

MAX_BLOCK = 256   # MatMulNBits / MLAS: "Only block sizes 16, 32, 64, 128, 256 are supported"


def _key(a: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes() + str(a.shape).encode()).hexdigest()


def _inits(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def weight_bytes(model) -> int:
    """Bytes of every initializer a ModelProto holds (what the .onnx file really carries)."""
    from onnx import numpy_helper
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))


def _planned_matmuls(model, keys: dict[str, str]) -> None:
    """Give every planned layer a MatMul on a constant (K, N) initializer, in place:

    - Gemm(A, W, C) (transB=1, alpha=beta=1; a rank-2 Linear) -> MatMul(A, W^T) + Add(C);
    - MatMul(A, Transpose(W)) (a tied LM head: the embedding table transposed at run time) -> MatMul(A, W^T).
    `keys`: value keys of the planned (N, K) weights."""
    from onnx import helper, numpy_helper
    graph, inits = model.graph, _inits(model.graph)
    producer = {o: n for n in graph.node for o in n.output}

    def transposed(name: str) -> str | None:
        """The name of a new (K, N) initializer for the planned (N, K) initializer `name`, or None."""
        w = inits.get(name)
        if w is None or _key(numpy_helper.to_array(w)) not in keys:
            return None
        if f"{name}.T" not in inits:
            inits[f"{name}.T"] = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T),
                                                         f"{name}.T")
            graph.initializer.append(inits[f"{name}.T"])
        return f"{name}.T"

    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "MatMul" and node.input[1] in producer:
            t = producer[node.input[1]]
            wt = transposed(t.input[0]) if t.op_type == "Transpose" and list(
                helper.get_attribute_value(t.attribute[0]) if t.attribute else [1, 0]) == [1, 0] else None
            if wt is not None:
                node = helper.make_node("MatMul", [node.input[0], wt], list(node.output), name=node.name)
            nodes.append(node)
            continue
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        wt = transposed(node.input[1]) if node.op_type == "Gemm" and plain and attrs.get("transB", 0) == 1 else None
        if wt is None:
            nodes.append(node)
            continue
        out = node.output[0]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = f"{out}.matmul" if has_bias else out
        nodes.append(helper.make_node("MatMul", [node.input[0], wt], [mm_out], name=f"{node.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}.bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(model)


def _prune(model) -> None:
    """Drop nodes whose outputs nothing reads, then initializers nothing reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _restore_gemm(model) -> None:
    """Undo ORT's own Gemm -> MatMul pre-pass on layers it did not quantize: it stores a transposed fp32 copy
    (`<W>_Transposed`) even when `W` stays in use (a tied embedding), so the file would hold the weight twice."""
    from onnx import helper, numpy_helper
    graph, inits = model.graph, _inits(model.graph)
    for i, node in enumerate(graph.node):
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        base = w.removesuffix("_Transposed")
        if w == base or w not in inits or base not in inits:
            continue
        if not np.array_equal(numpy_helper.to_array(inits[w]), numpy_helper.to_array(inits[base]).T):
            continue
        graph.node.remove(node)
        graph.node.insert(i, helper.make_node("Gemm", [node.input[0], base], list(node.output), name=node.name,
                                              transB=1))
    _prune(model)


def layer_nodes(model, linears: dict[str, np.ndarray]) -> dict[str, str]:
    """MatMul node name -> planned layer name, for MatMuls whose weight initializer is a planned Linear's W^T."""
    from onnx import numpy_helper
    keys = {_key(np.ascontiguousarray(w.T)): n for n, w in linears.items()}
    inits = _inits(model.graph)
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = keys.get(_key(numpy_helper.to_array(inits[node.input[1]])))
            if name is not None:
                out[node.name] = name
    return out


def _name_nodes(model) -> None:
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type.lower()}_{i}"
        seen.add(node.name)


def _reader_cls():
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self, feeds):
            self.feeds, self._it = feeds, iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(self.feeds)

    return Reader


def _quantize_embedding(model, table: np.ndarray, bits: int, group: int) -> int:
    """Replace the Gather reading the fp32 embedding `table` (V, D) with GatherBlockQuantized (com.microsoft) over
    afedge's own symmetric quantization (afedge.quant.weights: MatMulNBits' rule, peak -> -8 for int4): uint8
    data, q + 128 for 8 bits, two per byte for 4 bits (low nibble first, + 8), the op's default zero point
    2^(bits-1). onnxruntime.quantization's own Gather quantizer takes 4 bits only. Returns the bytes it holds."""
    import torch
    from onnx import helper, numpy_helper

    from afedge.quant.weights import pack_int4, quantize
    graph, inits, key = model.graph, _inits(model.graph), _key(table)
    d = table.shape[1]
    block = group or d
    if block < 16 or block & (block - 1):
        raise ValueError(f"the embedding's block of {block} (d_model {d}) is not a power of two >= 16, as "
                         f"GatherBlockQuantized needs")
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and _key(numpy_helper.to_array(inits[n.input[0]])) == key]
    if not gathers:
        raise ValueError("no Gather reads the token embedding's table")
    q, scale = quantize(torch.from_numpy(table), bits, block)
    data = (pack_int4(q) if bits == 4 else (q.to(torch.int16) + 128).to(torch.uint8)).numpy()
    name = gathers[0].input[0]
    tensors = [numpy_helper.from_array(data, f"{name}.q{bits}"),
               numpy_helper.from_array(scale.numpy(), f"{name}.scale")]
    graph.initializer.extend(tensors)
    for node in gathers:
        i = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(i, helper.make_node("GatherBlockQuantized", [tensors[0].name, node.input[1], tensors[1].name],
                                              list(node.output), name=f"{node.name}.q{bits}", domain="com.microsoft",
                                              bits=bits, block_size=block, gather_axis=0, quantize_axis=1))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _prune(model)
    return int(data.nbytes + scale.numpy().nbytes)


def quantize_graph(path: Path, plan: QuantPlan, linears: dict[str, np.ndarray], calibration: list[dict] | None,
                   qnn: bool, accuracy_level: int = 0, embedding: np.ndarray | None = None) -> dict:
    """Quantize the fp32 graph at `path` in place as `plan` says; returns what the manifest records.

    linears: planned layer name -> fp32 weight (N, K); calibration: feeds for static QDQ schemes; accuracy_level:
    MatMulNBits' compute type for weight-only schemes (4: int8, activations quantized per block at run time);
    embedding: the fp32 token embedding (V, D) when the plan quantizes it (GatherBlockQuantized)."""
    import onnx
    s: Scheme = plan.spec
    model = onnx.load(str(path))
    fp32_bytes = weight_bytes(model)
    keys = {_key(w): n for n, w in linears.items()}
    _planned_matmuls(model, keys)
    _name_nodes(model)
    nodes = layer_nodes(model, linears)
    info = {"fp32_weight_bytes": fp32_bytes, "quantized_nodes": len(nodes)}
    if not nodes and plan.embedding is None:
        info["weight_bytes"] = fp32_bytes
        return info
    if nodes and s.activations == "float":
        model, info["ops"] = _weight_only(model, plan, nodes, linears, accuracy_level), "MatMulNBits"
        info["accuracy_level"] = accuracy_level
    elif nodes:
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            onnx.save(model, str(src))
            if s.activations == "dynamic":
                info |= _dynamic(src, dst, list(nodes))
            else:
                info |= _static(src, dst, model, list(nodes), s, calibration or [], qnn)
            model = onnx.load(str(dst))
        _restore_gemm(model)
    if plan.embedding is not None:
        info["embedding_bytes"] = _quantize_embedding(model, embedding, *plan.embedding)
        info["embedding_ops"] = "GatherBlockQuantized"
    info["weight_bytes"] = weight_bytes(model)
    tmp_path = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp_path))
    tmp_path.replace(path)
    return info


def _weight_only(model, plan: QuantPlan, nodes: dict[str, str], linears: dict[str, np.ndarray],
                 accuracy_level: int):
    """MatMulNBits for the planned MatMuls, one quantizer run per (bits, block size); int8 has one block per
    output channel (K rounded up to a power of two, as MatMulNBits requires) up to MAX_BLOCK inputs."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    # Its module calls logging.basicConfig(level=INFO) on import: a line per node of the graph otherwise.
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
    by_block: dict[tuple[int, int], list[str]] = {}
    for node, layer in nodes.items():
        ls, k = plan.scheme_of(layer), linears[layer].shape[1]
        block = ls.group or min(MAX_BLOCK, 2 ** math.ceil(math.log2(max(16, k))))
        by_block.setdefault((ls.weight_bits, block), []).append(node)
    for (bits, block), names in sorted(by_block.items()):
        # nodes_to_include only adds to op_types_to_quantize (ORT 1.32): exclude every other MatMul instead.
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(names)]
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                 accuracy_level=accuracy_level or None, nodes_to_exclude=others,
                                 op_types_to_quantize=("MatMul",))
        q.process()
        model = q.model.model
    return model


def _dynamic(src: Path, dst: Path, names: list[str]) -> dict:
    """uint8 activations x uint8 per-channel weights: ORT's u8u8 kernel widens before multiplying, so it cannot
    saturate on AVX2 machines without VNNI (u8s8 can: VPMADDUBSW), and keeps all 8 weight bits (reduce_range
    would drop one). Measured on retnet d=32 over a 256-step decode, worst-position SQNR: u8u8 31.9 dB,
    u8s8 32.6 dB, u8s8 + reduce_range 24.0 dB."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul"], nodes_to_quantize=names, per_channel=True,
                     reduce_range=False, weight_type=QuantType.QUInt8)
    return {"ops": "DynamicQuantizeLinear+MatMulInteger", "reduce_range": False, "weight_type": "QUInt8"}


def _static(src: Path, dst: Path, model, names: list[str], s: Scheme, feeds: list[dict], qnn: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize, quantize_static
    act = QuantType.QUInt16 if s.act_bits == 16 else QuantType.QUInt8
    weight = QuantType.QUInt8 if s.id == "qdq-u16a8w" else QuantType.QInt8
    reader = _reader_cls()(feeds)
    if qnn:
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
        others = [n.name for n in model.graph.node if n.name not in set(names)]
        cfg = get_qnn_qdq_config(src, reader, activation_type=act, weight_type=weight, per_channel=True,
                                 nodes_to_exclude=others)
        cfg.extra_options["OpTypesToExcludeOutputQuantization"] = ["MatMul"]
        quantize(src, dst, cfg)
        how = "get_qnn_qdq_config"
    else:
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        nodes_to_quantize=names, per_channel=True, activation_type=act, weight_type=weight,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": weight == QuantType.QInt8,
                                       "OpTypesToExcludeOutputQuantization": ["MatMul"]})
        how = "quantize_static"
    return {"ops": "QuantizeLinear/DequantizeLinear", "calibration": how, "calibration_feeds": len(feeds),
            "activation_type": act.name, "weight_type": weight.name}
