"""Guard a fixed scheme as an exporter realises it: keep fp32 the layers that push the gate's workload past the
scheme's tolerance.

ExecuTorch realises `int8` with dynamic int8 activations (afedge.quant.et_torchao). Rounding a layer's input per
token can break the export gate although every weight is fine: on the demo model, blocks.0.mixer.out_proj reads
an input with outlier channels, and the whole plan's logits reach max_rel 0.164 simulated, 0.121 on XNNPACK
(bound 0.1); the same plan with that layer fp32 simulates 0.065. Before export, the plan is simulated as realised
on the gate's workload (`sensitivity.gate_probe`, per position as the gate scores it); while it misses the
bounds, the layer whose fp32 copy helps most is kept fp32, at most `max_keep` of them. A plan that already meets
the bounds is returned unchanged; the kept layers are recorded in the plan's policy (manifest `quant.policy`).
`resolve_plan` guards every plan, `--quant auto`'s included, whose exporter realises its scheme as another
(`Exporter.simulated_as`), keeping how auto chose.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from afedge.model import LM
from afedge.parity import metrics
from afedge.quant.policy import QuantPlan, plan_quant
from afedge.quant.sensitivity import GateProbe, gate_logits, gate_probe
from afedge.tolerances import tolerance

__all__ = ["guarded"]


def _misses(model: LM, plan: QuantPlan, realised: str, probe: GateProbe) -> float:
    """How far the plan (simulated as `realised`) misses its bounds: the worst ratio of error to bound (> 1 fails)."""
    tol = tolerance(plan.tolerance)
    got = gate_logits(model, plan_quant(model, realised, plan.policy), probe)
    rel = max(metrics.max_rel(g, r) for g, r in zip(got[0], probe.ref[0]))
    top1_gap = (1.0 - metrics.top1_agreement(got, probe.ref)) / max(1.0 - tol.top1, 1e-9)
    noise = 10 ** ((tol.sqnr_db - metrics.sqnr_db(got, probe.ref)) / 10)
    return max(rel / tol.max_rel, top1_gap, noise)


@torch.no_grad()
def guarded(model: LM, plan: QuantPlan, realised: str, max_keep: int = 4) -> QuantPlan:
    """`plan` with the fewest layers kept fp32 (greedy, at most `max_keep`) that meet its tolerance as realised."""
    if not plan.quantized:
        return plan
    probe = gate_probe(model)
    worst = _misses(model, plan, realised, probe)
    while worst > 1.0 and len(plan.policy.keep_fp32) < max_keep:
        trials = {layer: replace(plan.policy, keep_fp32=(*plan.policy.keep_fp32, layer)) for layer in plan.quantized}
        scored = {layer: _misses(model, plan_quant(model, plan.scheme, p), realised, probe)
                  for layer, p in trials.items()}
        layer = min(scored, key=scored.get)
        if scored[layer] >= worst:
            break
        plan, worst = replace(plan_quant(model, plan.scheme, trials[layer]), auto=plan.auto), scored[layer]
    return plan
