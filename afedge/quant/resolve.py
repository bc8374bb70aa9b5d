"""What an exporter calls first: its `quant` argument (a scheme id, "auto", or a ready QuantPlan) as a QuantPlan."""
from __future__ import annotations

from afedge.model import LM
from afedge.quant.policy import QuantPlan, QuantPolicy, plan_quant
from afedge.quant.schemes import AUTO

__all__ = ["resolve_plan"]


def resolve_plan(quant: str | QuantPlan, model: LM, claimed: tuple[str, ...],
                 policy: QuantPolicy = QuantPolicy()) -> QuantPlan:
    """A QuantPlan for `model`; "auto" chooses among `claimed` (the exporter's quant_schemes) by sensitivity."""
    if isinstance(quant, QuantPlan):
        return quant
    if quant == AUTO:
        from afedge.quant.auto import auto_plan
        return auto_plan(model, claimed, policy)
    return plan_quant(model, quant, policy)
