"""What an exporter calls first: its `quant` argument (a scheme id, "auto", or a ready QuantPlan) as a QuantPlan."""
from __future__ import annotations

from collections.abc import Mapping

from afedge.model import LM
from afedge.quant.policy import QuantPlan, QuantPolicy, plan_quant
from afedge.quant.schemes import AUTO

__all__ = ["resolve_plan"]


def resolve_plan(quant: str | QuantPlan, model: LM, claimed: tuple[str, ...], policy: QuantPolicy = QuantPolicy(),
                 simulated_as: Mapping[str, str] | None = None) -> QuantPlan:
    """A QuantPlan for `model`; "auto" chooses among `claimed` (the exporter's quant_schemes) by sensitivity.

    `simulated_as` (the exporter's) maps a scheme to the one whose simulation computes as the exporter realises it
    (ExecuTorch: int8 -> int8-dyn). `auto` validates its candidates that way, and a plan realised differently from
    its scheme is guarded (afedge.quant.guard). A ready QuantPlan is returned as it is."""
    if isinstance(quant, QuantPlan):
        return quant
    if quant == AUTO:   # guards its candidates itself
        from afedge.quant.auto import auto_plan
        return auto_plan(model, claimed, policy, simulated_as)
    plan = plan_quant(model, quant, policy)
    realised = (simulated_as or {}).get(quant, quant)
    if realised == quant:
        return plan
    from afedge.quant.guard import guarded
    return guarded(model, plan, realised)
