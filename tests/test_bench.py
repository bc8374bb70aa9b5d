"""`afedge bench` end to end on a tiny bundle (tiny contexts), its reports, and `--check` against budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from afedge.cli import main
from afedge.model import LM, LMConfig
from afedge.rewrite import to_recurrent
from afedge.target import load_target

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
