"""The state-aware policy: which Linear layers a scheme quantizes and which parameters stay fp32, and why.

Only `nn.Linear` weights are ever quantized. Kept fp32 by default: the recurrent state (never a parameter: it
is a graph input/output, fp32 in every scheme), every parameter a mixer names in `fp32_params` (decays, Δ, A,
gates that feed the recurrence, its norms), every norm, bias, convolution and raw parameter, and the token embedding
(a gather). The LM head is an explicit choice (`QuantPolicy.head`): by default it gets the scheme's 8-bit sibling
(int8 per channel; int8-dyn for dynamic-activation schemes), because an int4 head puts its noise straight into
the logits (measured, simulated on retnet/mamba d=32..256: the head alone at int4-g32 is 21-23 dB, every other
layer >= 24 dB; at int8 45 dB). Layers whose `in_features` the scheme's group does not divide stay fp32 too.
`QuantPlan` is what an exporter realises and what the manifest records.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from afedge.model import LM
from afedge.quant.schemes import Scheme, scheme as get_scheme

__all__ = ["QuantPolicy", "QuantPlan", "plan_quant", "mixer_fp32_names", "eight_bit_sibling", "HEAD_CHOICES"]

# Reasons recorded for every parameter kept fp32 (the manifest's `kept_fp32`).
STATE_SENSITIVE = "mixer fp32_params (decay / dt / A / gate / norm of the recurrence)"
NORM, EMBEDDING, HEAD = "norm", "embedding (a gather)", "LM head (QuantPolicy.head = 'fp32')"
HEAD_CHOICES = ("fp32", "int8", "scheme")
NOT_LINEAR, BIAS = "not a Linear weight", "bias"


@dataclass(frozen=True)
class QuantPolicy:
    # LM head: "fp32", "int8" (the scheme's 8-bit sibling) or "scheme" (the scheme itself). With tied
    # embeddings a quantized head is a separate copy; the embedding stays fp32.
    head: str = "int8"
    keep_fp32: tuple[str, ...] = ()         # extra module-name prefixes kept fp32 (`auto` fills it)
    eight_bit: tuple[str, ...] = ()         # prefixes given the 8-bit sibling under 4-bit schemes (`auto`)

    def __post_init__(self) -> None:
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"QuantPolicy.head must be one of {HEAD_CHOICES}, got '{self.head}'")

    def to_json(self) -> dict:
        return {"embedding": "fp32", "head": self.head, "keep_fp32": list(self.keep_fp32),
                "eight_bit": list(self.eight_bit)}


@dataclass(frozen=True)
class QuantPlan:
    """scheme id, the Linear modules (names in the LM) it quantizes, every fp32 parameter with its reason.

    `overrides` names the layers quantized with another scheme than `scheme` (the LM head's 8-bit sibling)."""

    scheme: str
    quantized: tuple[str, ...] = ()
    kept_fp32: dict[str, str] = field(default_factory=dict)
    policy: QuantPolicy = QuantPolicy()
    overrides: dict[str, str] = field(default_factory=dict)
    auto: dict | None = None                # how `auto` chose (sensitivity summary), when it did

    @property
    def spec(self) -> Scheme:
        return get_scheme(self.scheme)

    @property
    def tolerance(self) -> str:
        return self.spec.tolerance

    def scheme_of(self, layer: str) -> Scheme:
        return get_scheme(self.overrides.get(layer, self.scheme))

    def groups(self) -> dict[str, tuple[str, ...]]:
        """scheme id -> the quantized layers it applies to (the plan's scheme first)."""
        out: dict[str, list[str]] = {}
        for layer in self.quantized:
            out.setdefault(self.overrides.get(layer, self.scheme), []).append(layer)
        return {k: tuple(v) for k, v in sorted(out.items(), key=lambda kv: kv[0] != self.scheme)}

    def to_json(self) -> dict:
        out = {"scheme": self.scheme, "tolerance": self.tolerance, "quantized": list(self.quantized),
               "overrides": dict(self.overrides), "kept_fp32": dict(self.kept_fp32), "policy": self.policy.to_json()}
        return out | ({"auto": self.auto} if self.auto else {})


def eight_bit_sibling(s: Scheme) -> str:
    """The 8-bit scheme with the same activation treatment (int8-dyn for dynamic schemes, else int8)."""
    if s.weight_bits == 8:
        return s.id
    return "int8-dyn" if s.activations == "dynamic" else "int8"


def _covered(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def mixer_fp32_names(model: LM) -> set[str]:
    """Model-wide names of every parameter / buffer / module a mixer declares in `fp32_params`."""
    out = set()
    for i, block in enumerate(model.blocks):
        prefixes = type(block.mixer).fp32_params
        for n, _ in [*block.mixer.named_modules(), *block.mixer.named_parameters(), *block.mixer.named_buffers()]:
            if n and _covered(n, prefixes):
                out.add(f"blocks.{i}.mixer.{n}")
    return out


def plan_quant(model: LM, scheme: str, policy: QuantPolicy = QuantPolicy()) -> QuantPlan:
    """The layers `scheme` quantizes in `model` under `policy`; fp32 / fp16 quantize nothing."""
    s = get_scheme(scheme)
    sensitive = mixer_fp32_names(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    norms = {n for n, m in model.named_modules() if isinstance(m, (nn.RMSNorm, nn.LayerNorm, nn.GroupNorm))}
    quantized, kept, overrides = [], {}, {}
    for name, lin in linears.items():
        reason, layer_scheme = "", s
        if s.quantizes_weights and ((name == "head" and policy.head == "int8") or _covered(name, policy.eight_bit)):
            layer_scheme = get_scheme(eight_bit_sibling(s))
            if layer_scheme.id != s.id:
                overrides[name] = layer_scheme.id
        if not s.quantizes_weights:
            reason = f"scheme {s.id}"
        elif name in sensitive:
            reason = STATE_SENSITIVE
        elif name == "head" and policy.head == "fp32":
            reason = HEAD
        elif _covered(name, policy.keep_fp32):
            reason = "QuantPolicy.keep_fp32 (--quant auto or the export guard, afedge.quant.guard)"
        elif layer_scheme.group and lin.in_features % layer_scheme.group:
            reason = f"in_features {lin.in_features} not divisible by the group size {layer_scheme.group}"
        if reason:
            overrides.pop(name, None)
            kept[f"{name}.weight"] = reason
        else:
            quantized.append(name)
    for pname, t in [*model.named_parameters(remove_duplicate=True), *model.named_buffers()]:
        module, _, leaf = pname.rpartition(".")
        if not t.is_floating_point() or pname in kept or (module in quantized and leaf == "weight"):
            continue
        if pname in sensitive or module in sensitive or _covered(pname, tuple(sensitive)):
            kept[pname] = STATE_SENSITIVE
        elif module in norms or _covered(module, tuple(norms)):
            kept[pname] = NORM
        elif module == "embed":
            kept[pname] = EMBEDDING
        elif leaf == "bias":
            kept[pname] = BIAS
        else:
            kept[pname] = NOT_LINEAR
    return QuantPlan(s.id, tuple(quantized), kept, policy, overrides)
