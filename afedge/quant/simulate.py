"""Simulated quantization in torch: the model as a scheme would compute it, for the sensitivity report.

Weights go through `fake_quant_weight` (symmetric, per channel or per group), the embedding too when the plan
quantizes it (weight-only: a gather has no activation to quantize); dynamic schemes also quantize each
quantized layer's input per token, static ones per tensor with a range calibrated on the same prompt. The
simulation predicts a runtime's error; the parity suite measures the real one.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from afedge.model import LM
from afedge.quant.policy import EMBED, QuantPlan
from afedge.quant.weights import fake_quant_activation, fake_quant_weight

__all__ = ["simulated", "logits_of"]


def _static_hook(lo: float, hi: float, bits: int):
    qmax = 2 ** bits - 1
    scale = max(hi - lo, 1e-12) / qmax
    zero = round(-lo / scale)

    def hook(_m, args):
        x = args[0]
        return (torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale,
    return hook


@torch.no_grad()
def simulated(model: LM, plan: QuantPlan, layers: tuple[str, ...], tokens: Tensor | None = None) -> LM:
    """A copy of `model` with `layers` (planned Linear names, and EMBED for a quantized embedding: `plan.layers`)
    computing as the plan's schemes would; `tokens` (B, T) calibrate the activation ranges of static schemes."""
    out = copy.deepcopy(model).eval()
    ranges: dict[str, tuple[float, float]] = {}
    static = [n for n in layers if plan.scheme_of(n).activations == "static"]
    if static:
        if tokens is None:
            raise ValueError(f"simulating static scheme {plan.scheme} needs calibration tokens")
        hooks = [out.get_submodule(n).register_forward_pre_hook(_recorder(ranges, n)) for n in static]
        out(tokens)
        for h in hooks:
            h.remove()
    embed, head = EMBED in layers, "head" in layers
    if out.cfg.tie_embeddings and (embed or head) and not (embed and head and plan.shares_tied):
        out.head.weight = nn.Parameter(out.head.weight.detach().clone())   # quantized apart from the embedding
    if embed:
        out.embed.weight.copy_(fake_quant_weight(out.embed.weight, *plan.embedding))
    for name in (n for n in layers if n != EMBED):
        s, lin = plan.scheme_of(name), out.get_submodule(name)
        if not (name == "head" and embed and plan.shares_tied):   # else: the shared table, quantized above
            lin.weight.copy_(fake_quant_weight(lin.weight, s.weight_bits, s.group))
        if s.activations == "dynamic":
            lin.register_forward_pre_hook(lambda _m, args, b=s.act_bits: (fake_quant_activation(args[0], b),))
        elif s.activations == "static":
            lin.register_forward_pre_hook(_static_hook(*ranges[name], s.act_bits))
    return out


def _recorder(ranges: dict, name: str):
    def hook(_m, args):
        lo, hi = ranges.get(name, (0.0, 0.0))
        ranges[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))
    return hook


@torch.no_grad()
def logits_of(model: LM, tokens: Tensor) -> Tensor:
    """(B, T) tokens -> (B, T, V) logits of the parallel form from the initial state."""
    return model(tokens)[0]
