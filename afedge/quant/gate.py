"""What the export pipeline reads from an artifact's quant record (`Artifact.info["quant"]`)."""
from __future__ import annotations

__all__ = ["tolerance_name", "quant_summary"]


def tolerance_name(info: dict, default: str) -> str:
    """The tolerance profile an artifact is judged by: its scheme's, or `default` if it records none."""
    return (info.get("quant") or {}).get("tolerance") or default


def quant_summary(artifacts: list) -> dict[str, dict]:
    """artifact name -> scheme, tolerance, weight bytes (and fp32 ones where known), layers quantized / fp32."""
    out = {}
    for a in artifacts:
        q = a.info.get("quant")
        if q:
            out[a.name] = {"scheme": q["scheme"], "tolerance": q["tolerance"], "weight_bytes": q.get("weight_bytes"),
                           "fp32_weight_bytes": q.get("fp32_weight_bytes"), "quantized_layers": len(q["quantized"]),
                           "kept_fp32": len(q["kept_fp32"])}
    return out
