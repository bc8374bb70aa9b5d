"""`afedge bench` end to end on a tiny bundle (tiny contexts), its reports, and `--check` against budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from afedge.cli import main
from afedge.model import LM, LMConfig
from afedge.rewrite import to_recurrent
from afedge.target import load_target
from afedge.tolerances import TOLERANCES

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("matplotlib")

CONTEXTS, PROMPT = [4, 20], 24   # 20 > the 16-token prefill block: contexts are reached through the prefill graph
FAST = ["--contexts", ",".join(map(str, CONTEXTS)), "--prompt-len", str(PROMPT), "--steps", "4", "--repeats", "1",
        "--bandwidth-mib", "32"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from afedge.pipeline import export_bundle
    program = to_recurrent(LM(LMConfig(vocab_size=256, d_model=32, n_layers=1, mixer="retnet",
                                       mixer_kwargs={"n_heads": 2}, mlp_ratio=1)), chunk_size=8, prefill_len=16)
    out = tmp_path_factory.mktemp("bench") / "tiny"
    export_bundle(program, load_target("host"), out, exporters=["onnx"], verify=False, progress=lambda m: None)
    return out


@pytest.fixture(scope="module")
def report(bundle, tmp_path_factory) -> tuple[int, Path]:
    md = tmp_path_factory.mktemp("bench-report") / "tiny-bench.md"
    return main(["bench", str(bundle), *FAST, "--out", str(md)]), md


def budget_file(tmp_path: Path, table: str) -> Path:
    """A copy of targets/host.toml whose [budgets] table is `table`."""
    text = Path(load_target("host").path).read_text().split("[budgets]")[0]
    path = tmp_path / "host.toml"
    path.write_text(text.rstrip() + "\n\n[budgets]\n" + table + "\n")
    return path


def test_bench_writes_json_markdown_and_png(report):
    rc, md = report
    assert rc == 0
    res = json.loads(md.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in res["runtimes"]}
    assert set(rows) == {"onnx", "torch", "baseline", "hf"}
    for name in ("onnx", "torch"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert [d["context"] for d in r["decode"]] == CONTEXTS
        for d in r["decode"]:
            assert 0 < d["median_ms"] <= d["p90_ms"] and d["peak_rss_bytes"] > 0 and d["finite"]
        assert r["prefill"]["tokens"] == PROMPT and r["prefill"]["chunked_tok_s"] > 0
        assert r["prefill"]["token_by_token_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["state_bytes"] == res["model"]["state_bytes"] > 0
        assert r["growth"]["latency"] > 0 and r["growth"]["memory"] > 0
        assert 0 < r["roofline_ratio"] and r["decode_tok_s"] > 0
    assert rows["torch"]["prefill"]["parallel_tok_s"] > 0
    assert rows["onnx"]["artifact_bytes"] > 0 and rows["onnx"]["speedup_vs_torch"]["decode"] > 0
    assert rows["baseline"]["status"] == "ok" and rows["baseline"]["model"]["d_model"] == 32
    assert rows["hf"]["status"] == "skipped" and "not an imported Hugging Face model" in rows["hf"]["reason"]
    roof = res["roofline"]
    assert roof["bandwidth_gb_s"] > 0 and roof["decode_upper_bound_tok_s"] > 0
    assert len(res["machine"]["load_before"]) == 3 and res["measured_on_target"] is True
    text = md.read_text()
    for heading in ("## Decode and prefill", "## Decode latency against context", "## Budgets"):
        assert heading in text
    png = md.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(str(md.with_suffix(".png"))).shape[0] > 100


def test_check_fails_on_a_budget_that_cannot_be_met(bundle, tmp_path, capsys):
    budgets = budget_file(tmp_path, "decode_ms_p90 = 1e-9\nstate_kib = 1024")
    rc = main(["bench", str(bundle), *FAST, "--runtime", "onnx", "--check", "--budgets", str(budgets),
               "--out", str(tmp_path / "r.md")])
    assert rc == 1
    assert "FAIL onnx: decode_ms_p90" in capsys.readouterr().err
    verdicts = json.loads((tmp_path / "r.json").read_text())["budgets"]["verdicts"]
    assert {(v["budget"], v["status"]) for v in verdicts} == {("decode_ms_p90", "fail"), ("state_kib", "pass")}


def test_check_passes_on_a_budget_that_is_met(bundle, tmp_path):
    budgets = budget_file(tmp_path, "decode_ms_p90 = 60000\nprefill_tok_s = 0.001\nstate_kib = 1024\n"
                                    "artifact_mib = 64\npeak_rss_mib = 65536")
    rc = main(["bench", str(bundle), *FAST, "--runtime", "onnx", "--check", "--budgets", str(budgets),
               "--out", str(tmp_path / "r.md")])
    assert rc == 0
    verdicts = json.loads((tmp_path / "r.json").read_text())["budgets"]["verdicts"]
    assert len(verdicts) == 5 and all(v["status"] == "pass" for v in verdicts)


def test_reach_with_hands_one_runtimes_states_to_the_others(bundle, tmp_path):
    """`--reach-with onnx`: the torch reference decodes from the states ONNX Runtime's prefill reached; those are
    the states torch reaches itself (the shared state contract), so decode starts where it would have."""
    md = tmp_path / "r.md"
    assert main(["bench", str(bundle), *FAST, "--runtime", "torch", "--reach-with", "onnx", "--out", str(md)]) == 0
    res = json.loads(md.with_suffix(".json").read_text())
    assert res["reached_with"]["artifact"] == "onnx"
    assert [r["context"] for r in res["reached_with"]["reached"]] == CONTEXTS
    (torch_row,) = res["runtimes"]
    assert [d["fed_tokens"] for d in torch_row["decode"]] == [0, 0] and all(d["finite"] for d in torch_row["decode"])
    assert "reached once by **onnx**" in md.read_text()


def test_reached_states_round_trip_and_match_the_reference(bundle, tmp_path):
    from afedge.bench import measure
    from afedge.bundle import load_bundle
    from afedge.parity.metrics import max_rel
    from afedge.pipeline import open_session, reference_program
    from afedge.runtimes.torch import TorchSession
    b = load_bundle(bundle)
    ort = open_session(b, b.artifact("onnx"), 1)
    names, path = b.info.spec.names, str(tmp_path / "s.safetensors")
    rows = measure.save_reached(path, names, measure.reach(ort, b.info.vocab_size, CONTEXTS))
    assert [r["context"] for r in rows] == CONTEXTS and rows[1]["fed_tokens"] == CONTEXTS[1] - CONTEXTS[0]
    got = measure.load_reached(path, names)
    ref = {n: (lg, st) for n, _, _, lg, st in measure.reach(TorchSession(reference_program(b)), b.info.vocab_size,
                                                            CONTEXTS)}
    assert sorted(got) == CONTEXTS
    for n in CONTEXTS:
        assert max_rel(got[n][0], ref[n][0]) <= TOLERANCES["fp32"].max_rel
        assert all(max_rel(a, r) <= TOLERANCES["fp32"].state_rel for a, r in zip(got[n][1], ref[n][1]))


def test_reach_with_an_unknown_artifact_is_a_clear_error(bundle, capsys):
    assert main(["bench", str(bundle), "--reach-with", "nope"]) == 1
    assert "--reach-with nope: not in" in capsys.readouterr().err


def test_unknown_runtime_is_a_clear_error(bundle, capsys):
    assert main(["bench", str(bundle), "--runtime", "nope"]) == 1
    assert "--runtime nope: not in" in capsys.readouterr().err


def test_ort_iobinding_gives_the_same_numbers_and_never_reuses_a_returned_state(bundle):
    import numpy as np

    from afedge.bundle import load_bundle
    from afedge.runtimes.onnxruntime import OrtSession
    b = load_bundle(bundle)
    art = b.artifact("onnx")
    files = {m: b.file(f) for m, f in art.files.items()}
    plain, bound = (OrtSession(files, b.info, 1, art.arch, {"iobinding": flag}) for flag in (False, True))
    tokens = np.arange(20, dtype=np.int64)[None] % 256
    (la, sa), (lb, sb) = plain.prefill(tokens, plain.init_state()), bound.prefill(tokens, bound.init_state())
    kept, state = [s.copy() for s in sb], sb
    for t in range(3):
        la, sa = plain.step(np.array([t]), sa)
        lb, state = bound.step(np.array([t]), state)
    np.testing.assert_array_equal(la, lb)
    for x, y in zip(sa, state):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(kept, sb):  # the state returned by prefill is untouched by the later steps
        np.testing.assert_array_equal(x, y)
