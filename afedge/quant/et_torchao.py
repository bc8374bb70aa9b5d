"""ExecuTorch realisation of the quant schemes through torchao, for the XNNPACK delegate.

`quantize_(model, config, filter_fn)` on a copy of the LM, one call per scheme of the plan (the head's 8-bit
sibling gets its own): XNNPACK lowers torchao's dynamically quantized linears (choose_qparams / quantize /
dequantize_affine around a linear) to its int8 / int4 kernels. Measured with torchao 0.18 / ExecuTorch 1.5.1
(FIELD-NOTES): Int8WeightOnlyConfig / IntxWeightOnlyConfig lower but give wrong output under XNNPACK, so both
`int8` and `int8-dyn` are realised as int8 per-channel weights with int8 dynamic per-token activations.

  int8, int8-dyn   Int8DynamicActivationIntxWeightConfig(weight_dtype=int8, PerAxis(0))
  8da4w            Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, PerGroup(32),
                   weight_mapping_type=SYMMETRIC_NO_CLIPPING_ERR)

torchao's default SYMMETRIC int4 mapping (scale = amax / 7.5, clamped to [-8, 7]) clips every group's peak;
SYMMETRIC_NO_CLIPPING_ERR does not. Measured on retnet d=32 (eager torchao vs fp32, worst-position SQNR over a
256-step decode): 11.7 vs 18.2 dB; mamba 23.3 vs 25.9 dB.

Constant folding must leave torchao's ops alone (`KEEP_OPS`): folding the weight's dequantize_affine turns the
int weights back into fp32 constants, and XNNPACK then sees no quantized pattern (every linear fp32, the
activation quant ops left on portable kernels, which have no out variants: to_executorch fails).
"""
from __future__ import annotations

from torch import nn

from afedge.model import LM
from afedge.quant.policy import QuantPlan

__all__ = ["torchao_quantized", "keep_ops", "REALISED_AS"]

REALISED_AS = {"int8": "int8 per-channel weights + int8 dynamic per-token activations (XNNPACK has no correct "
                       "weight-only int8 path)",
               "int8-dyn": "int8 per-channel weights + int8 dynamic per-token activations",
               "8da4w": "int4 weights per 32 inputs + int8 dynamic per-token activations"}


def _config(scheme: str):
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    if scheme in ("int8", "int8-dyn"):
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if scheme == "8da4w":
        from torchao.quantization.quant_primitives import MappingType
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(32),
                                                     weight_mapping_type=MappingType.SYMMETRIC_NO_CLIPPING_ERR)
    raise ValueError(f"torchao: no XNNPACK realisation of quant scheme '{scheme}'")


def torchao_quantized(model: LM, plan: QuantPlan) -> LM:
    """A copy of `model` with the plan's layers quantized by torchao (a tied head becomes its own copy) and, when
    the plan quantizes it, the embedding as afedge's QuantEmbedding: a gather of int8 / packed int4 rows on
    ExecuTorch's portable kernels, then their dequantization (torchao's embedding quantization lowers to the
    quantized_decomposed embedding kernels, which the pip runtime does not register)."""
    import copy

    from torchao.quantization import quantize_

    from afedge.quant.weights import QuantEmbedding
    out = copy.deepcopy(model).eval()
    if ("head" in plan.quantized or plan.embedding) and out.cfg.tie_embeddings:
        out.head.weight = nn.Parameter(out.head.weight.detach().clone(), requires_grad=False)
    if plan.embedding:
        out.embed = QuantEmbedding(out.embed, *plan.embedding)
    for scheme, layers in plan.groups().items():
        names = set(layers)
        quantize_(out, _config(scheme), filter_fn=lambda m, fqn, names=names: isinstance(m, nn.Linear) and fqn in names)
    return out


def keep_ops() -> set:
    """torchao quantization ops constant folding must not evaluate."""
    import torch
    ops = torch.ops.torchao
    return {ops.choose_qparams_affine.default, ops.quantize_affine.default, ops.dequantize_affine.default}
