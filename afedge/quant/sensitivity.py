"""Per-layer sensitivity: the SQNR of the model's logits when only that one layer is quantized.

`sensitivity_report(model, scheme)` simulates the scheme (afedge.quant.simulate) on each quantizable layer in
turn, over a seeded calibration prompt, against the fp32 logits. Low SQNR = sensitive. Layer noises add up
(roughly independent), so the whole model's SQNR is predicted as -10 log10(sum 10^(-SQNR_i / 10)); `auto` uses
that to decide which layers to keep fp32, then validates the whole plan with `gate_error` on the export gate's own
workload (the gate's prompt, then the fp32 model's greedy continuation, teacher-forced as the gate does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from afedge.model import LM
from afedge.parity import metrics
from afedge.parity.workloads import Workload, prompt_decode
from afedge.quant.calibration import calibration_tokens
from afedge.quant.policy import QuantPlan, QuantPolicy, plan_quant
from afedge.quant.simulate import logits_of, simulated

__all__ = ["LayerSensitivity", "sensitivity_report", "predicted_sqnr_db", "simulated_error", "GateProbe",
           "gate_probe", "gate_logits", "gate_error", "PROMPT_LEN", "GATE_WORKLOAD"]

PROMPT_LEN = 64
GATE_WORKLOAD = prompt_decode()   # the export gate's workload (afedge.pipeline.export_bundle)


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    sqnr_db: float       # logits SQNR with only this layer quantized
    top1: float          # argmax agreement with the fp32 logits
    params: int          # weights this layer holds

    def to_json(self) -> dict:
        return {"layer": self.layer, "sqnr_db": round(self.sqnr_db, 2), "top1": round(self.top1, 4),
                "params": self.params}


def _tokens(model: LM, length: int) -> torch.Tensor:
    return calibration_tokens(model.cfg.vocab_size, length)


@torch.no_grad()
def simulated_error(model: LM, plan: QuantPlan, length: int = PROMPT_LEN) -> tuple[float, float]:
    """(SQNR dB, top-1) of the model's logits with the whole plan quantized (simulated)."""
    tokens = _tokens(model, length)
    ref = logits_of(model, tokens)
    got = logits_of(simulated(model, plan, plan.layers, tokens), tokens)
    return metrics.sqnr_db(got, ref), metrics.top1_agreement(got, ref)


@dataclass(frozen=True)
class GateProbe:
    """The export gate's workload run once on the fp32 model: the prompt plus its greedy continuation (1, P + N),
    and the fp32 logits (1, N + 1, V) at the positions the gate scores (the prompt's last, then every step)."""

    tokens: torch.Tensor
    ref: torch.Tensor
    scored: slice


@torch.no_grad()
def gate_probe(model: LM, workload: Workload = GATE_WORKLOAD) -> GateProbe:
    tokens = torch.from_numpy(workload.prompt(model.cfg.vocab_size))
    logits, state = model(tokens)
    out, nxt = [tokens], logits[:, -1].argmax(-1)
    for i in range(workload.steps):  # greedy, one step at a time, as the gate's reference session decodes
        out.append(nxt[:, None])
        if i + 1 < workload.steps:
            logits, state = model.step(nxt, state)
            nxt = logits.argmax(-1)
    tokens, scored = torch.cat(out, 1), slice(workload.prompt_len - 1, None)
    return GateProbe(tokens, logits_of(model, tokens)[:, scored], scored)


@torch.no_grad()
def gate_logits(model: LM, plan: QuantPlan, probe: GateProbe) -> torch.Tensor:
    """The simulated plan's logits at the probe's scored positions, teacher-forced on its tokens as the gate is."""
    return logits_of(simulated(model, plan, plan.layers, probe.tokens), probe.tokens)[:, probe.scored]


def gate_error(model: LM, plan: QuantPlan, probe: GateProbe) -> tuple[float, float]:
    """(SQNR dB, top-1) of the simulated plan on the export gate's workload."""
    got = gate_logits(model, plan, probe)
    return metrics.sqnr_db(got, probe.ref), metrics.top1_agreement(got, probe.ref)


@torch.no_grad()
def sensitivity_report(model: LM, scheme: str, policy: QuantPolicy = QuantPolicy(),
                       length: int = PROMPT_LEN) -> list[LayerSensitivity]:
    """One entry per layer the scheme would quantize under `policy`, most sensitive (lowest SQNR) first."""
    plan = plan_quant(model, scheme, policy)
    tokens = _tokens(model, length)
    ref = logits_of(model, tokens)
    rows = []
    for layer in plan.quantized:
        got = logits_of(simulated(model, plan, (layer,), tokens), tokens)
        rows.append(LayerSensitivity(layer, metrics.sqnr_db(got, ref), metrics.top1_agreement(got, ref),
                                     model.get_submodule(layer).weight.numel()))
    return sorted(rows, key=lambda r: r.sqnr_db)


def predicted_sqnr_db(rows: list[LayerSensitivity]) -> float:
    """Whole-model SQNR predicted from single-layer SQNRs (noise powers add)."""
    noise = sum(10 ** (-r.sqnr_db / 10) for r in rows if np.isfinite(r.sqnr_db))
    return math.inf if noise == 0 else -10 * math.log10(noise)
