"""Hyena's distilled recurrence: the fit improves with state order, is reported, and is marked approximate."""
from __future__ import annotations

import math

import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.mixers import MIXERS


def make(**kwargs):
    torch.manual_seed(0)
    return MIXERS.get("hyena")(32, **kwargs).eval()


def test_distillation_error_shrinks_with_order():
    small, large = make(order=4).report(), make(order=16).report()
    assert large["distill_rel_l2_max"] < small["distill_rel_l2_max"]
    assert large["distill_rel_l2_mean"] < 0.1 * small["distill_rel_l2_mean"]


def test_report_figures_are_finite():
    rep = make().report()
    for key in ("distill_rel_l2_max", "distill_rel_l2_mean", "step_vs_parallel_max_rel"):
        assert math.isfinite(rep[key]) and 0 <= rep[key] < 5e-2, (key, rep[key])
    assert rep["distill_rel_l2_mean"] <= rep["distill_rel_l2_max"]


def test_redistill_after_the_filter_changes():
    m = make()
    with torch.no_grad():
        m.filter_mlp[0].weight.mul_(1.5)  # as training would: the modal buffers are now stale
    stale = m.report()["distill_rel_l2_max"]
    m.distill()
    assert m.report()["distill_rel_l2_max"] < 0.1 * stale


def test_state_spec_marks_approximate():
    prog = to_recurrent(LM(LMConfig(d_model=32, n_layers=1, mixer="hyena")), chunk_size=8, prefill_len=16)
    assert not prog.spec.exact
    ssm = next(s for s in prog.spec.slots if s.name.endswith(".ssm"))
    assert not ssm.exact and ssm.note == "distilled modal SSM, order 16"
    assert "layers.0" in prog.report()
