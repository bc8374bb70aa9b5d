"""State-aware quantization: scheme ids, the fp32 policy, the per-layer sensitivity report and `--quant auto`.

Heavy dependencies (onnxruntime, torchao, tvm) are imported only by the exporter-side modules
(`onnx_ort`, `et_torchao`) when an export needs them.
"""
from __future__ import annotations

from afedge.quant.policy import QuantPlan, QuantPolicy, plan_quant
from afedge.quant.resolve import resolve_plan
from afedge.quant.schemes import AUTO, SCHEMES, Scheme, scheme

__all__ = ["AUTO", "SCHEMES", "Scheme", "scheme", "QuantPlan", "QuantPolicy", "plan_quant", "resolve_plan"]
