"""The state-aware policy: which Linear layers a scheme quantizes and which parameters stay fp32, and why.

Only `nn.Linear` weights are quantized, and the token embedding when the policy says so. Kept fp32 by default:
the recurrent state (never a parameter: it is a graph input/output, fp32 in every scheme), every parameter a mixer
names in `fp32_params` (decays, Δ, A, gates that feed the recurrence, its norms), every norm, bias, convolution and
raw parameter. The token embedding and the LM head are explicit choices. `QuantPolicy.embedding` ("fp32" by
default; "int8": one scale per row or block of 256; "scheme": the scheme's weight bits and group) quantizes the table
a gather reads one row of per token, weight-only in every scheme; with tied embeddings the head shares its integers
when both are quantized alike (`QuantPlan.shares_tied`). `QuantPolicy.head`: by default it gets the scheme's 8-bit
sibling (int8 per channel; int8-dyn for dynamic-activation schemes), because an int4 head puts its noise straight
into the logits (measured, simulated on retnet/mamba d=32..256: the head alone at int4-g32 is 21-23 dB, every other
layer >= 24 dB; at int8 45 dB). Layers whose `in_features` the scheme's group does not divide stay fp32 too.
`QuantPlan` is what an exporter realises and what the manifest records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from afedge.model import LM
from afedge.quant.schemes import Scheme, scheme as get_scheme

__all__ = ["QuantPolicy", "QuantPlan", "EmbeddingQuant", "plan_quant", "mixer_fp32_names", "eight_bit_sibling",
           "HEAD_CHOICES", "EMBEDDING_CHOICES", "EMBED"]

# Reasons recorded for every parameter kept fp32 (the manifest's `kept_fp32`).
STATE_SENSITIVE = "mixer fp32_params (decay / dt / A / gate / norm of the recurrence)"
NORM, EMBEDDING, HEAD = "norm", "embedding (QuantPolicy.embedding = 'fp32')", "LM head (QuantPolicy.head = 'fp32')"
HEAD_CHOICES = EMBEDDING_CHOICES = ("fp32", "int8", "scheme")
NOT_LINEAR, BIAS = "not a Linear weight", "bias"
ROW_BLOCK = 256   # the largest block of an int8 embedding row (MatMulNBits / MLAS blocks are 16..256)
EMBED = "embed"   # the token embedding's module name: `QuantPlan.layers` holds it when the plan quantizes it


@dataclass(frozen=True)
class QuantPolicy:
    # LM head: "fp32", "int8" (the scheme's 8-bit sibling) or "scheme" (the scheme itself). With tied
    # embeddings a quantized head is a separate copy unless the embedding is quantized alike.
    head: str = "int8"
    # token embedding: "fp32", "int8" (a scale per row, or per 256 of it) or "scheme" (its bits and group)
    embedding: str = "fp32"
    keep_fp32: tuple[str, ...] = ()         # extra module-name prefixes kept fp32 (`auto` fills it)
    eight_bit: tuple[str, ...] = ()         # prefixes given the 8-bit sibling under 4-bit schemes (`auto`)

    def __post_init__(self) -> None:
        for name, value in (("head", self.head), ("embedding", self.embedding)):
            if value not in HEAD_CHOICES:
                raise ValueError(f"QuantPolicy.{name} must be one of {HEAD_CHOICES}, got '{value}'")

    def to_json(self) -> dict:
        return {"embedding": self.embedding, "head": self.head, "keep_fp32": list(self.keep_fp32),
                "eight_bit": list(self.eight_bit)}


class EmbeddingQuant(NamedTuple):
    """How the token embedding (V, D) is stored: `bits` (8 or 4), one scale per `group` of D (0: one per row)."""
    bits: int
    group: int


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
    embedding: EmbeddingQuant | None = None  # the token embedding's storage, None: fp32

    @property
    def spec(self) -> Scheme:
        return get_scheme(self.scheme)

    @property
    def tolerance(self) -> str:
        return self.spec.tolerance

    def scheme_of(self, layer: str) -> Scheme:
        return get_scheme(self.overrides.get(layer, self.scheme))

    @property
    def layers(self) -> tuple[str, ...]:
        """Every module the plan quantizes: the Linear layers, then the embedding when it does."""
        return (*self.quantized, EMBED) if self.embedding else self.quantized

    def head_quant(self) -> EmbeddingQuant | None:
        """The LM head's (bits, group) when it is quantized."""
        if "head" not in self.quantized:
            return None
        s = self.scheme_of("head")
        return EmbeddingQuant(s.weight_bits, s.group)

    @property
    def shares_tied(self) -> bool:
        """Whether a head tied to the embedding is quantized as the embedding is (one copy of the integers)."""
        return self.embedding is not None and self.embedding == self.head_quant()

    def groups(self) -> dict[str, tuple[str, ...]]:
        """scheme id -> the quantized layers it applies to (the plan's scheme first)."""
        out: dict[str, list[str]] = {}
        for layer in self.quantized:
            out.setdefault(self.overrides.get(layer, self.scheme), []).append(layer)
        return {k: tuple(v) for k, v in sorted(out.items(), key=lambda kv: kv[0] != self.scheme)}

    def to_json(self) -> dict:
        out = {"scheme": self.scheme, "tolerance": self.tolerance, "quantized": list(self.quantized),
               "overrides": dict(self.overrides), "kept_fp32": dict(self.kept_fp32), "policy": self.policy.to_json(),
               "embedding": self.embedding._asdict() if self.embedding else None}
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
    embedding = _embedding_quant(model, s, policy)
    if embedding is None and policy.embedding != "fp32" and s.quantizes_weights:
        kept[f"{EMBED}.weight"] = (f"embedding: d_model {model.cfg.d_model} not divisible by the group size "
                                f"{s.group} (QuantPolicy.embedding = '{policy.embedding}')")
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
        elif module == EMBED and embedding is None:
            kept[pname] = EMBEDDING
        elif module == EMBED:
            continue
        elif leaf == "bias":
            kept[pname] = BIAS
        else:
            kept[pname] = NOT_LINEAR
    return QuantPlan(s.id, tuple(quantized), kept, policy, overrides, embedding=embedding)


def _row_group(d: int) -> int:
    """The int8 embedding's group: one scale per row (0) when d_model is a power of two up to ROW_BLOCK, else
    blocks of its largest power-of-two divisor up to ROW_BLOCK (ONNX Runtime's GatherBlockQuantized takes
    power-of-two blocks only)."""
    g = min(d & -d, ROW_BLOCK)
    return 0 if g == d else g


def _embedding_quant(model: LM, s: Scheme, policy: QuantPolicy) -> EmbeddingQuant | None:
    """The embedding's storage under `policy`: None when it stays fp32 (the policy's choice, an fp scheme, or a
    group that does not divide d_model)."""
    if policy.embedding == "fp32" or not s.quantizes_weights:
        return None
    if policy.embedding == "int8":
        return EmbeddingQuant(8, _row_group(model.cfg.d_model))
    return None if s.group and model.cfg.d_model % s.group else EmbeddingQuant(s.weight_bits, s.group)
