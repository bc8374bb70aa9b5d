"""State-aware quantization: scheme ids, the fp32 policy, the torch numerics, the sensitivity report and `auto`.

Everything here runs in torch on tiny models (seconds); the runtimes are judged in tests/parity (quant flows),
tests/test_quant_bytes.py (weight bytes) and tests/test_quant_state.py (int8 state caught by the drift check).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

from afedge import LM, LMConfig
from afedge.exporting import EXPORTERS, load_plugins
from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel
from afedge.quant import SCHEMES, QuantPolicy, plan_quant, resolve_plan, scheme
from afedge.quant.auto import AUTO_ORDER, auto_plan
from afedge.quant.policy import EMBEDDING, HEAD, NORM, STATE_SENSITIVE, mixer_fp32_names
from afedge.quant.sensitivity import gate_error, gate_logits, gate_probe, sensitivity_report, simulated_error
from afedge.quant.simulate import simulated
from afedge.quant.weights import QuantLinear, dequantize, fake_quant_weight, pack_int4, quantize, unpack_int4
from afedge.registry import RegistryError
from afedge.tolerances import AUTO_MARGIN_DB, TOLERANCES, tolerance

load_plugins()

# Parameter names that hold a decay, a step size or a state matrix, and module names of norms: a mixer must keep
# them fp32.
DECAY_NAME = re.compile(r"decay|gamma|(^|_)dt(_|$)|A_log|A_real|A_imag|time_first|^w[012]$|^(alpha|delta)$")
NORM_NAME = re.compile(r"norm|^ln(_|\d|$)")
# Mixers with no state-sensitive parameter at all (no decay: the state is a plain running sum or a window).
NOTHING_TO_DECLARE = {"aft_simple", "linear_transformer", "synthesizer_dense", "synthesizer_random"}


def _model(mixer: str = "mamba", d: int = 32) -> LM:
    return LM(LMConfig(d_model=d, n_layers=2, mixer=mixer))


def test_scheme_ids_are_stable_and_each_has_its_tolerance_entry():
    assert SCHEMES.names() == sorted(["fp32", "fp16", "int8", "int8-dyn", "int4-g32", "int4-g128", "8da4w",
                                      "qdq-u8", "qdq-u16a8w"])
    for sid in SCHEMES.names():
        assert scheme(sid).tolerance == sid and sid in TOLERANCES
    with pytest.raises(RegistryError, match="unknown quant scheme 'int3'; known: 8da4w, fp16"):
        scheme("int3")


def test_exporters_claim_only_registered_schemes():
    for name in EXPORTERS.names():
        claimed = EXPORTERS.get(name).quant_schemes
        assert "fp32" in claimed and set(claimed) <= set(SCHEMES.names()), (name, claimed)


def _mixer_case(name: str):
    slow = name == "hyena"   # distills its long filter at construction: ~1 min of CPU
    return pytest.param(name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("mixer", [_mixer_case(n) for n in MIXERS.names()])
def test_every_mixer_declares_its_state_sensitive_params(mixer):
    """Each `fp32_params` prefix names something real, and every decay / dt / A / norm parameter is covered."""
    m = MIXERS.get(mixer)(32)
    prefixes = type(m).fp32_params
    names = [n for n, _ in [*m.named_modules(), *m.named_parameters(), *m.named_buffers()] if n]
    for p in prefixes:
        assert any(n == p or n.startswith(p + ".") for n in names), f"{mixer}: fp32_params '{p}' matches nothing"
    covered = lambda n: any(n == p or n.startswith(p + ".") for p in prefixes)  # noqa: E731
    for n, t in [*m.named_parameters(), *m.named_buffers()]:
        parts = n.split(".")
        if t.is_floating_point() and (DECAY_NAME.search(parts[-1]) or any(NORM_NAME.search(p) for p in parts)):
            assert covered(n), f"{mixer}: '{n}' looks state-sensitive but is not in fp32_params {prefixes}"
    assert bool(prefixes) != (mixer in NOTHING_TO_DECLARE), f"{mixer}: fp32_params {prefixes}"


def test_plan_keeps_state_params_norms_and_embedding_fp32():
    model = _model("mamba")
    plan = plan_quant(model, "int8")
    for i in range(2):
        assert f"blocks.{i}.mixer.dt_proj" not in plan.quantized          # a Linear, but Δ: kept fp32
        assert plan.kept_fp32[f"blocks.{i}.mixer.dt_proj.weight"] == STATE_SENSITIVE
        assert plan.kept_fp32[f"blocks.{i}.mixer.A_log"] == STATE_SENSITIVE
        assert plan.kept_fp32[f"blocks.{i}.norm1.weight"] == NORM
        assert f"blocks.{i}.mixer.in_proj" in plan.quantized
    assert plan.kept_fp32["embed.weight"] == EMBEDDING
    assert mixer_fp32_names(model) >= {"blocks.0.mixer.A_log", "blocks.1.mixer.conv1d.weight"}
    # every float parameter is either a quantized weight or recorded as kept, with its reason
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    assert params == {f"{q}.weight" for q in plan.quantized} | (params & set(plan.kept_fp32))


def test_head_is_an_explicit_choice():
    model = _model("retnet")
    assert plan_quant(model, "int4-g32").overrides == {"head": "int8"}            # default: the 8-bit sibling
    assert plan_quant(model, "8da4w").overrides == {"head": "int8-dyn"}
    assert plan_quant(model, "int8").overrides == {} and "head" in plan_quant(model, "int8").quantized
    fp32_head = plan_quant(model, "int4-g32", QuantPolicy(head="fp32"))
    assert "head" not in fp32_head.quantized and fp32_head.kept_fp32["head.weight"] == HEAD
    assert plan_quant(model, "int4-g32", QuantPolicy(head="scheme")).overrides == {}
    with pytest.raises(ValueError, match="QuantPolicy.head must be one of"):
        QuantPolicy(head="int2")


def test_embedding_is_an_explicit_choice():
    from afedge.quant.policy import EmbeddingQuant
    model = _model("retnet")
    default = plan_quant(model, "int4-g32")
    assert default.embedding is None and default.kept_fp32["embed.weight"] == EMBEDDING
    assert "embed" not in default.layers
    int8 = plan_quant(model, "int4-g32", QuantPolicy(embedding="int8"))
    assert int8.embedding == EmbeddingQuant(8, 0) and int8.layers[-1] == "embed"
    assert "embed.weight" not in int8.kept_fp32
    assert int8.shares_tied   # the int8 head (per channel) and the int8 embedding (per row) are one table
    assert int8.to_json()["embedding"] == {"bits": 8, "group": 0} and int8.to_json()["policy"]["embedding"] == "int8"
    assert plan_quant(model, "int4-g32", QuantPolicy(embedding="scheme")).embedding == EmbeddingQuant(4, 32)
    assert not plan_quant(model, "int4-g32", QuantPolicy(embedding="scheme")).shares_tied   # head int8, table int4
    assert plan_quant(model, "int4-g32", QuantPolicy(embedding="scheme", head="scheme")).shares_tied
    assert plan_quant(model, "fp32", QuantPolicy(embedding="int8")).embedding is None
    # d_model 48: int8 rows in the largest power-of-two block (GatherBlockQuantized); int4-g32 does not divide it
    wide = _model("retnet", d=48)
    assert plan_quant(wide, "int8", QuantPolicy(embedding="int8")).embedding == EmbeddingQuant(8, 16)
    kept = plan_quant(wide, "int4-g32", QuantPolicy(embedding="scheme"))
    assert kept.embedding is None and "not divisible by the group size 32" in kept.kept_fp32["embed.weight"]
    with pytest.raises(ValueError, match="QuantPolicy.embedding must be one of"):
        QuantPolicy(embedding="int4")


def test_the_simulated_embedding_is_quantized_and_the_fp32_head_keeps_its_table():
    model = _model("retnet")
    plan = plan_quant(model, "int8", QuantPolicy(embedding="scheme", head="fp32"))
    sim = simulated(model, plan, plan.layers)
    assert sim.head.weight is not sim.embed.weight and torch.equal(sim.head.weight, model.embed.weight)
    assert torch.equal(sim.embed.weight, fake_quant_weight(model.embed.weight, 8, 0))
    assert not torch.equal(sim.embed.weight, model.embed.weight)


def test_group_size_must_divide_in_features():
    plan = plan_quant(_model("retnet"), "int4-g128")   # d=32: only the MLP's down projection (in 128) divides
    assert set(plan.quantized) == {"blocks.0.mlp.2", "blocks.1.mlp.2", "head"}
    assert plan.kept_fp32["blocks.0.mixer.q_proj.weight"] == "in_features 32 not divisible by the group size 128"


def test_float_schemes_quantize_nothing():
    for sid in ("fp32", "fp16"):
        plan = plan_quant(_model(), sid)
        assert plan.quantized == () and plan.overrides == {}


@pytest.mark.parametrize("bits,group", [(8, 0), (4, 32), (4, 128)])
def test_weight_quantization_roundtrip(bits, group):
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, bits, group)
    assert q.dtype == torch.int8 and s.shape == (16, 256 // (group or 256))
    assert int(q.min()) >= -(2 ** (bits - 1)) and int(q.max()) <= 2 ** (bits - 1) - 1
    err = (dequantize(q, s) - w).abs().reshape(16, s.shape[1], -1)
    assert bool((err <= s.abs()[..., None]).all())                     # within one step everywhere
    if bits == 4:
        packed = pack_int4(q)
        assert packed.dtype == torch.uint8 and packed.shape == (16, 128)
        assert torch.equal(unpack_int4(packed).to(torch.int8), q)


@pytest.mark.parametrize("group", [32, 0])
@pytest.mark.parametrize("rows", [1, 5])
def test_an_int4_linear_computes_with_its_dequantized_weight(group, rows):
    """One row (a decode step: QuantLinear's reduction over the packed nibbles) or a block of rows (the matmul)."""
    torch.manual_seed(0)
    lin = QuantLinear(torch.nn.Linear(256, 48), 4, group)
    x = torch.randn(1, rows, 256)
    want = torch.nn.functional.linear(x, lin.weight(), lin.bias)
    assert max_rel(lin(x).detach().numpy(), want.detach().numpy()) <= tolerance("fp32").max_rel


def test_sensitivity_report_covers_the_plan_most_sensitive_first():
    model = _model("retnet")
    rows = sensitivity_report(model, "int4-g32", length=32)
    assert {r.layer for r in rows} == set(plan_quant(model, "int4-g32").quantized)
    assert [r.sqnr_db for r in rows] == sorted(r.sqnr_db for r in rows)
    plan = plan_quant(model, "int4-g32")
    one = lambda layer: simulated_error(model, plan.__class__(plan.scheme, (layer,), overrides=plan.overrides),  # noqa: E731
                                        length=32)[0]
    assert one(rows[0].layer) == pytest.approx(rows[0].sqnr_db) and one(rows[0].layer) < one(rows[-1].layer)


def test_auto_promotes_the_most_sensitive_layers_until_the_prediction_clears_the_bound():
    model = _model("retnet")
    plan = auto_plan(model, ("fp32", "int8", "int4-g32"))
    [tried] = plan.auto["tried"]
    bound = tolerance("int4-g32").sqnr_db + AUTO_MARGIN_DB
    report = plan.auto["report"]
    assert [r["layer"] for r in report[:len(tried["promoted"])]] == tried["promoted"]   # most sensitive first
    noise = lambda rows: -10 * math.log10(sum(10 ** (-r["sqnr_db"] / 10) for r in rows))  # noqa: E731
    assert noise(report[len(tried["promoted"]):]) >= bound - 0.01 > noise(report[len(tried["promoted"]) - 1:])
    # under a 4-bit scheme the promoted layers get the 8-bit sibling; the plan is what was simulated
    assert plan.scheme == "int4-g32" and tried["chosen"] and tried["simulated_sqnr_db"] >= bound
    assert {n for n, s in plan.overrides.items() if s == "int8"} == {*tried["promoted"], "head"}
    sqnr, top1 = gate_error(model, plan, gate_probe(model))
    assert sqnr == pytest.approx(tried["simulated_sqnr_db"], abs=0.01) and top1 >= tolerance("int4-g32").top1


def test_gate_error_scores_what_the_export_gate_scores():
    """The simulated plan, run as a torch session through the gate's compare(), gives gate_error's figures: same
    prompt, same teacher-forced greedy tokens, same positions (parallel vs step form: rounding only)."""
    from afedge import to_recurrent
    from afedge.parity.compare import compare
    from afedge.parity.workloads import prompt_decode
    from afedge.quant.simulate import simulated
    from afedge.runtimes.torch import TorchSession
    model, workload = _model("retnet"), prompt_decode(20, 24)
    plan = plan_quant(model, "int4-g32")
    probe = gate_probe(model, workload)
    sqnr, top1 = gate_error(model, plan, probe)
    ref = TorchSession(to_recurrent(model, 8, 16))
    rep = compare(ref, TorchSession(to_recurrent(simulated(model, plan, plan.quantized), 8, 16)), workload,
                  tolerance("int4-g32"))
    assert sqnr == pytest.approx(rep.sqnr_db, abs=0.05) and top1 == pytest.approx(rep.top1, abs=1e-9)
    got, want = gate_logits(model, plan, probe), probe.ref
    per_position = [float((g - w).abs().max() / w.abs().max()) for g, w in zip(got[0], want[0])]
    assert per_position == pytest.approx(rep.per_step_rel, rel=1e-3) and sqnr < 40   # int4 noise, position by position


def test_auto_tries_most_compressing_first_and_falls_back_to_fp32():
    model = _model("mamba")
    plan = resolve_plan("auto", model, ("fp32", "int8"))         # an exporter claiming only int8
    assert plan.scheme == "int8" and [t["scheme"] for t in plan.auto["tried"]] == ["int8"]
    plan = resolve_plan("auto", model, ("fp32",))
    assert plan.scheme == "fp32" and plan.quantized == ()
    assert AUTO_ORDER.index("int4-g32") < AUTO_ORDER.index("int8")


def test_auto_validates_a_candidate_as_the_exporter_realises_it():
    """With `simulated_as` (ExecuTorch: int8 -> int8-dyn), auto scores its int8 candidate with dynamic
    activations, not as the weight-only int8 that ORT and TVM run."""
    model = _model("retnet")
    probe = gate_probe(model)
    for realised in ("int8", "int8-dyn"):
        plan = auto_plan(model, ("fp32", "int8"), simulated_as={"int8": realised})
        [tried] = plan.auto["tried"]
        want = gate_error(model, plan_quant(model, realised, plan.policy), probe)[0]
        assert plan.scheme == "int8" and tried["simulated_sqnr_db"] == pytest.approx(want, abs=0.01)
    weight_only = gate_error(model, plan_quant(model, "int8", plan.policy), probe)[0]
    assert abs(weight_only - tried["simulated_sqnr_db"]) > 0.1                   # the two simulations differ


def test_cli_accepts_auto():
    from afedge.cli import build_parser
    args = build_parser().parse_args(["export", "--target", "host", "--quant", "auto"])
    assert args.quant == "auto"
    help_text = next(a.help for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
                     if "--quant" in a.option_strings)
    assert all(s in help_text for s in (*SCHEMES.names(), "auto"))


def test_every_target_names_a_default_scheme_each_of_its_exporters_realises():
    from afedge.target import load_target, target_names
    for name in target_names():
        t = load_target(name)
        assert t.quant in SCHEMES and t.tolerance == scheme(t.quant).tolerance, name
        for exporter in t.exporters:
            EXPORTERS.get(exporter)().check_quant(t.quant, t)   # raises ExportError naming the gap


def test_the_export_guard_keeps_fp32_what_dynamic_activations_break():
    """The demo model's int8 as ExecuTorch realises it (dynamic int8 activations) misses the int8 bounds on the
    gate's workload; resolve_plan, given the exporter's `simulated_as`, guards it: the layers whose input rounding
    breaks it are kept fp32 (blocks 0 and 1 out_proj) and the plan meets the bounds. A plan that meets them
    already, or one realised as its own scheme, is returned as it is."""
    from afedge.quant.guard import _misses, guarded, local_errors
    from afedge.zoo import resolve_model
    load_plugins()
    demo, et = resolve_model(None).model.eval(), EXPORTERS.get("executorch")
    plan, probe = plan_quant(demo, "int8"), gate_probe(demo)
    assert et.simulated_as["int8"] == "int8-dyn" and _misses(demo, plan, "int8-dyn", probe) > 1.0
    kept = resolve_plan("int8", demo, et.quant_schemes, simulated_as=et.simulated_as)
    assert set(kept.policy.keep_fp32) == {"blocks.0.mixer.out_proj", "blocks.1.mixer.out_proj"}
    assert kept.scheme == "int8" and _misses(demo, kept, "int8-dyn", probe) <= 1.0
    assert set(kept.kept_fp32) >= {f"{n}.weight" for n in kept.policy.keep_fp32}
    assert resolve_plan("int8", demo, et.quant_schemes) == plan                     # realised as int8 (ORT, TVM)
    errors = local_errors(demo, plan_quant(demo, "int8-dyn"), probe.tokens)       # only the worst are tried
    assert guarded(demo, plan, "int8-dyn", suspects=1).policy.keep_fp32 == (max(errors, key=errors.get),)
    auto = resolve_plan("auto", demo, et.quant_schemes, simulated_as=et.simulated_as)  # guarded with auto's margin
    [int8] = [t for t in auto.auto["tried"] if t["scheme"] == "int8"]
    assert auto.scheme == "int8" and int8["chosen"] and set(int8["guard_kept_fp32"]) == set(auto.policy.keep_fp32)
    assert _misses(demo, auto, "int8-dyn", probe, AUTO_MARGIN_DB) <= 1.0 < _misses(demo, kept, "int8-dyn", probe,
                                                                                  AUTO_MARGIN_DB)
    tiny = _model("retnet")
    plain = plan_quant(tiny, "int8")
    assert _misses(tiny, plain, "int8-dyn", gate_probe(tiny)) <= 1.0
    assert resolve_plan("int8", tiny, et.quant_schemes, simulated_as=et.simulated_as) == plain
