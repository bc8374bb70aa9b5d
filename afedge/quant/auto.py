"""`--quant auto`: the most compressing scheme an exporter realises whose simulated error meets its tolerance.

For each candidate (most compressing first, among the exporter's `quant_schemes`): take the sensitivity report
and promote the most sensitive layers (to the scheme's 8-bit sibling under a 4-bit scheme, to fp32 under an
8-bit one) until the predicted whole-model SQNR clears the scheme's tolerance by `AUTO_MARGIN_DB`; then simulate
the whole plan on the export gate's own workload (`gate_error`), computing as the exporter realises it
(`simulated_as`: ExecuTorch's int8 with dynamic activations), after the export guard has kept fp32 what that
realisation breaks (afedge.quant.guard). The first candidate whose SQNR and top-1 clear the
bounds there (and which still quantizes something) wins, and the plan records the report. Nothing qualifying ->
fp32.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from afedge.model import LM
from afedge.quant.guard import guarded
from afedge.quant.policy import QuantPlan, QuantPolicy, plan_quant
from afedge.quant.schemes import scheme as get_scheme
from afedge.quant.sensitivity import gate_error, gate_probe, predicted_sqnr_db, sensitivity_report
from afedge.tolerances import AUTO_MARGIN_DB, tolerance

__all__ = ["AUTO_ORDER", "auto_plan"]

# Candidates, most compressing first. Static QDQ schemes are never chosen automatically (they need an NPU).
AUTO_ORDER = ("int4-g32", "8da4w", "int4-g128", "int8", "int8-dyn")


def auto_plan(model: LM, claimed: tuple[str, ...], policy: QuantPolicy = QuantPolicy(),
              simulated_as: Mapping[str, str] | None = None) -> QuantPlan:
    tried, probe = [], None
    for scheme in (s for s in AUTO_ORDER if s in claimed):
        tol = tolerance(scheme)
        rows = [r for r in sensitivity_report(model, scheme, policy) if r.layer not in policy.eight_bit]
        keep: list[str] = []
        while rows[len(keep):] and predicted_sqnr_db(rows[len(keep):]) < tol.sqnr_db + AUTO_MARGIN_DB:
            keep.append(rows[len(keep)].layer)
        if get_scheme(scheme).weight_bits == 4:
            chosen = replace(policy, eight_bit=(*policy.eight_bit, *keep))
        else:
            chosen = replace(policy, keep_fp32=(*policy.keep_fp32, *keep))
        plan, realised = plan_quant(model, scheme, chosen), (simulated_as or {}).get(scheme, scheme)
        if plan.quantized:
            probe = probe or gate_probe(model)   # the gate's workload on the fp32 model: once for every candidate
            if realised != scheme:
                plan = guarded(model, plan, realised, probe=probe, margin_db=AUTO_MARGIN_DB)   # what it breaks: fp32
            sqnr, top1 = gate_error(model, plan_quant(model, realised, plan.policy), probe)
        else:
            sqnr, top1 = float("inf"), 1.0
        ok = bool(plan.quantized) and sqnr >= tol.sqnr_db + AUTO_MARGIN_DB and top1 >= tol.top1
        guard_kept = [n for n in plan.policy.keep_fp32 if n not in chosen.keep_fp32]
        tried.append({"scheme": scheme, "promoted": keep, "guard_kept_fp32": guard_kept,
                      "simulated_sqnr_db": round(sqnr, 2), "simulated_top1": round(top1, 4), "chosen": ok})
        if ok:
            summary = {"tried": tried, "report": [r.to_json() for r in rows], "margin_db": AUTO_MARGIN_DB}
            return replace(plan, auto=summary)
    return replace(plan_quant(model, "fp32", policy), auto={"tried": tried, "report": []})
