"""One parity body, run through every flow: each artifact that can run here against the PyTorch reference.

Acceptance (fp32): <= 1e-4 relative error on logits and identical greedy tokens for 256 steps; the state after a
snapshot resumes bit-identically; the target's static prefill blocks agree too.
"""
from __future__ import annotations

import pytest

from afedge.parity.compare import compare
from afedge.parity.workloads import long_horizon, prompt_decode, snapshot_resume, static_shapes
from afedge.pipeline import open_session, reference_program
from afedge.quant.gate import tolerance_name
from afedge.runtimes.torch import TorchSession
from afedge.session import RuntimeUnavailable
from afedge.tolerances import tolerance
from tests.parity.conftest import RESULTS
from tests.parity.flows import FLOWS, QUANT_TARGET, REPRESENTATIVE, Flow, claimed_on, registered_combinations


def _param(flow: Flow):
    marks = [pytest.mark.slow] if flow.slow else []
    if flow.gap:
        marks.append(pytest.mark.xfail(strict=True, raises=RuntimeUnavailable, reason=flow.gap))
    if flow.quant_gap:
        marks.append(pytest.mark.xfail(strict=True, raises=AssertionError, reason=flow.quant_gap))
    return pytest.param(flow, id=flow.id, marks=marks)


def workloads(flow: Flow, prefill_len: int):
    ws = [prompt_decode(40, 256), static_shapes(prefill_len), snapshot_resume()]
    if flow.mixer in REPRESENTATIVE:
        ws.append(long_horizon(4096))
    return ws


@pytest.mark.parametrize("flow", [_param(f) for f in FLOWS])
def test_parity(flow: Flow, bundle_for):
    bundle = bundle_for(flow)
    ref = TorchSession(reference_program(bundle), threads=2)
    ran, unavailable = 0, []
    for art in bundle.artifacts:
        # each artifact against the fp32 reference with its quant scheme's tolerance profile
        tol_name = tolerance_name(art.info, bundle.manifest["target"]["profile"]["tolerance"])
        assert art.info["quant"]["scheme"] == flow.quant
        if "xnnpack" in art.info.get("partitioners", []):  # the .pte really runs on XNNPACK, both methods
            for method, d in art.info["delegation"].items():
                assert d["backends"].get("XnnpackBackend", {}).get("subgraphs", 0) >= 1, f"{method}: nothing delegated"
        try:
            sess = open_session(bundle, art, threads=2)
        except RuntimeUnavailable as e:
            unavailable.append(e)
            continue
        for w in workloads(flow, bundle.info.prefill_len):
            rep = compare(ref, sess, w, tolerance(tol_name), tol_name)
            RESULTS[f"{flow.id}/{art.name}/{w.id}"] = rep.to_json() | {"per_step_rel": None}
            assert rep.passed, rep.failure
        ran += 1
    if not ran:
        raise unavailable[0]
    assert not flow.gap, "a known gap ran: remove it from GAPS"


def test_every_registered_thing_has_a_flow():
    """A mixer, runtime, exporter or target that no flow exercises fails here."""
    from afedge.exporting import EXPORTERS
    from afedge.mixers import MIXERS
    from afedge.session import RUNTIMES
    from afedge.target import target_names
    assert set(MIXERS.names()) <= {f.mixer for f in FLOWS}
    assert set(EXPORTERS.names()) <= {f.exporter for f in FLOWS}
    assert set(RUNTIMES.names()) <= {EXPORTERS.get(f.exporter).runtime for f in FLOWS}
    assert set(target_names()) <= {f.target for f in FLOWS}
    assert registered_combinations() <= {(f.mixer, f.exporter, f.target) for f in FLOWS}
    # every registered quant scheme is proven somewhere, and every scheme an exporter claims on the host is
    # proven there, for every mixer
    from afedge.quant import SCHEMES
    assert set(SCHEMES.names()) <= {f.quant for f in FLOWS}
    claimed = {(m, e, q) for e, q in claimed_on(QUANT_TARGET) for m in MIXERS.names()}
    assert claimed <= {(f.mixer, f.exporter, f.quant) for f in FLOWS if f.target == QUANT_TARGET}


def test_the_default_suite_runs_every_mixer_exporter_and_target():
    """The default selection may thin the matrix, never drop a mixer, an exporter or a target from it."""
    from afedge.mixers import MIXERS
    from afedge.target import target_names
    fast = [f for f in FLOWS if not f.slow]
    assert {f.mixer for f in fast} == set(MIXERS.names())
    assert {f.exporter for f in fast} == {f.exporter for f in FLOWS}
    assert {f.target for f in fast} == set(target_names())


@pytest.mark.slow
@pytest.mark.parametrize("flow", [pytest.param(f, id=f.id) for f in FLOWS
                                  if f.target == "host" and f.mixer in REPRESENTATIVE and not f.gap
                                  and not f.quant_flow])
def test_long_horizon_65k(flow: Flow, bundle_for):
    """65,536 decode steps on every host runtime of the representative mixers (`make test-slow`)."""
    bundle = bundle_for(flow)
    ref = TorchSession(reference_program(bundle), threads=2)
    for art in bundle.artifacts:
        tol_name = tolerance_name(art.info, bundle.manifest["target"]["profile"]["tolerance"])
        rep = compare(ref, open_session(bundle, art, threads=2), long_horizon(65_536), tolerance(tol_name), tol_name)
        RESULTS[f"{flow.id}/{art.name}/{rep.workload}"] = rep.to_json() | {"per_step_rel": None}
        assert rep.passed, rep.failure
