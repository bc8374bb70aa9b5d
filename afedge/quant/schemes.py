"""Quant schemes: short stable ids, each a named preset (MLC's `q4f16_1`, ExecuTorch's `8da4w`), held as data.

A scheme says what is quantized and how; each exporter's `quant_schemes` says which ones it realises natively,
and `tolerance` names the entry of `afedge.tolerances.TOLERANCES` its artifacts are judged by (against the fp32
torch reference, never against another runtime). The recurrent state stays fp32 in every scheme.
"""
from __future__ import annotations

from dataclasses import dataclass

from afedge.registry import Registry

__all__ = ["Scheme", "SCHEMES", "scheme", "AUTO"]

AUTO = "auto"   # not a scheme: `--quant auto` resolves to one of these per exporter (afedge.quant.auto)


@dataclass(frozen=True)
class Scheme:
    id: str
    weight_bits: int            # 32, 16, 8 or 4
    group: int = 0              # weights: 0 = one scale per output channel, else one scale per `group` inputs
    activations: str = "float"  # "float" (weight-only), "dynamic" (int8 per token at run time), "static" (QDQ)
    act_bits: int = 0           # bits of quantized activations (dynamic / static)
    description: str = ""

    @property
    def tolerance(self) -> str:
        """The tolerance profile name: one entry per scheme, named after it."""
        return self.id

    @property
    def quantizes_weights(self) -> bool:
        return self.weight_bits < 16

    def to_json(self) -> dict:
        return {"id": self.id, "weight_bits": self.weight_bits, "group": self.group,
                "activations": self.activations, "act_bits": self.act_bits, "tolerance": self.tolerance}


SCHEMES: Registry[Scheme] = Registry("quant scheme")

for _s in (
    Scheme("fp32", 32, description="no quantization"),
    Scheme("fp16", 16, description="fp16 weights and compute (Core ML delegate); fp32 state"),
    Scheme("int8", 8, description="int8 weights, one symmetric scale per output channel; fp32 activations"),
    Scheme("int8-dyn", 8, activations="dynamic", act_bits=8,
           description="w8a8: int8 per-channel weights, activations quantized per call (dynamic)"),
    Scheme("int4-g32", 4, 32, description="int4 weights, one symmetric scale per 32 inputs; fp32 activations"),
    Scheme("int4-g128", 4, 128, description="int4 weights, one symmetric scale per 128 inputs; fp32 activations"),
    Scheme("8da4w", 4, 32, "dynamic", 8,
           description="ExecuTorch XNNPACK: int4 weights per 32 inputs, int8 dynamic per-token activations"),
    Scheme("qdq-u8", 8, activations="static", act_bits=8,
           description="static QDQ, uint8 activations calibrated on the program's own inputs, int8 weights"),
    Scheme("qdq-u16a8w", 8, activations="static", act_bits=16,
           description="static QDQ for NPUs (QNN HTP): uint16 activations, uint8 weights, calibrated"),
):
    SCHEMES.register(_s.id)(_s)


def scheme(name: str) -> Scheme:
    """The scheme registered under `name` (RegistryError listing the known ids otherwise)."""
    return SCHEMES.get(name)
