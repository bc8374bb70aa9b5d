"""Guard a fixed scheme as an exporter realises it: keep fp32 the layers that push the gate's workload past the
scheme's tolerance.

ExecuTorch realises `int8` with dynamic int8 activations (afedge.quant.et_torchao). Rounding a layer's input per
token can break the export gate although every weight is fine: on the demo model, blocks.0.mixer.out_proj reads
an input with outlier channels, and the whole plan's logits reach max_rel 0.164 simulated, 0.121 on XNNPACK
(bound 0.1); the same plan with that layer fp32 simulates 0.065. Before export, the plan is simulated as realised
on the gate's workload (`sensitivity.gate_probe`, per position as the gate scores it); while it misses the
bounds, the layer whose fp32 copy helps most is kept fp32, at most `max_keep` of them. Only the `suspects` layers
whose own output the realisation distorts most (one forward pass) are tried: a trial simulates the whole model, so
the search stays a few dozen passes on a 24-block model. A plan that already meets
the bounds is returned unchanged; the kept layers are recorded in the plan's policy (manifest `quant.policy`).
`resolve_plan` guards a plan whose exporter realises its scheme as another (`Exporter.simulated_as`); `--quant auto`
guards each such candidate itself, with its margin, before validating it.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from afedge.model import LM
from afedge.parity import metrics
from afedge.quant.policy import QuantPlan, plan_quant
from afedge.quant.sensitivity import GateProbe, gate_logits, gate_probe
from afedge.quant.weights import fake_quant_activation, fake_quant_weight
from afedge.tolerances import tolerance

__all__ = ["guarded"]


def _misses(model: LM, plan: QuantPlan, realised: str, probe: GateProbe, margin_db: float = 0.0) -> float:
    """How far the plan (simulated as `realised`) misses its bounds, its SQNR bound raised by `margin_db`: the worst
    ratio of error to bound (> 1 fails)."""
    tol = tolerance(plan.tolerance)
    got = gate_logits(model, plan_quant(model, realised, plan.policy), probe)
    rel = max(metrics.max_rel(g, r) for g, r in zip(got[0], probe.ref[0]))
    top1_gap = (1.0 - metrics.top1_agreement(got, probe.ref)) / max(1.0 - tol.top1, 1e-9)
    noise = 10 ** ((tol.sqnr_db + margin_db - metrics.sqnr_db(got, probe.ref)) / 10)
    return max(rel / tol.max_rel, top1_gap, noise)


@torch.no_grad()
def local_errors(model: LM, plan: QuantPlan, tokens: torch.Tensor) -> dict[str, float]:
    """Per quantized layer: the relative error of its own output on `tokens` (B, T) when it alone computes as the
    plan's scheme does (fake-quantized weight, and input rounded per token for a dynamic scheme)."""
    errors, hooks = {}, []
    for name in plan.quantized:
        s = plan.scheme_of(name)

        def hook(lin, args, out, name=name, s=s):
            x = fake_quant_activation(args[0], s.act_bits) if s.activations == "dynamic" else args[0]
            got = F.linear(x, fake_quant_weight(lin.weight, s.weight_bits, s.group), lin.bias)
            errors[name] = float((got - out).norm() / out.norm().clamp(min=1e-30))
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return errors


@torch.no_grad()
def guarded(model: LM, plan: QuantPlan, realised: str, max_keep: int = 4, suspects: int = 8,
            probe: GateProbe | None = None, margin_db: float = 0.0) -> QuantPlan:
    """`plan` with the fewest layers kept fp32 (greedy over the `suspects` worst local errors, at most `max_keep`)
    that meet its tolerance (SQNR bound + `margin_db`) as realised on the gate's workload (`probe`, made here if
    not given)."""
    if not plan.quantized:
        return plan
    probe = probe or gate_probe(model)
    worst = _misses(model, plan, realised, probe, margin_db)
    if worst <= 1.0:
        return plan
    errors = local_errors(model, plan_quant(model, realised, plan.policy), probe.tokens)
    ranked = sorted(errors, key=errors.get, reverse=True)[:suspects]
    while worst > 1.0 and len(plan.policy.keep_fp32) < max_keep:
        trials = {layer: replace(plan.policy, keep_fp32=(*plan.policy.keep_fp32, layer))
                  for layer in ranked if layer in plan.quantized}
        scored = {layer: _misses(model, plan_quant(model, plan.scheme, p), realised, probe, margin_db)
                  for layer, p in trials.items()}
        layer = min(scored, key=scored.get, default=None)
        if layer is None or scored[layer] >= worst:
            break
        plan, worst = plan_quant(model, plan.scheme, trials[layer]), scored[layer]
    return plan
