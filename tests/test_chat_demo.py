"""The embedded demo chat model (afedge/demo/model) through its bundles: `afedge chat` answers the README prompt on
every runtime, `afedge eval` reports held-out exact match per skill and runtime, and the acceptance bound holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from afedge.chat.bundles import open_conversation, runnable
from afedge.pipeline import export_bundle
from afedge.rewrite import to_recurrent
from afedge.target import load_target
from afedge.tolerances import DEMO_MIN_ACCURACY, DEMO_QUANT_ACCURACY_DROP
from afedge.zoo import DEFAULT, resolve_model

AFEDGE = str(Path(sys.executable).with_name("afedge"))
README_PROMPT = "what is 12 plus 30?\n"
# Two-digit plus / minus replies show their working, units column first (afedge/demo/skills.py `worked`).
README_REPLY = "2+0=2, 1+3=4, so 42\n"


def demo_bundle(out: Path, exporters: list[str] | None, verify: bool, quant: str | None = None):
    target = load_target("host")
    resolved = resolve_model(None)
    bundle, _ = export_bundle(to_recurrent(resolved.model, target.chunk_size, target.prefill_len), target, out,
                              exporters, quant, verify=verify, source=resolved.source, progress=lambda _: None,
                              tokenizer=resolved.tokenizer)
    return bundle


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.mktemp("demo") / "onnx", ["onnx"], verify=False)


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory):
    """Every host runtime, through the parity gate."""
    return demo_bundle(tmp_path_factory.mktemp("demo") / "host", None, verify=True)


def chat(bundle, runtime: str, text: str) -> subprocess.CompletedProcess:
    return subprocess.run([AFEDGE, "chat", str(bundle.path), "--runtime", runtime], input=text, capture_output=True,
                          text=True, timeout=600)


def test_the_default_model_is_the_shipped_checkpoint():
    resolved = resolve_model(None)
    files = {p.name: p.stat().st_size for p in DEFAULT.iterdir()}
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert sum(files.values()) <= 20 * 1024 * 1024
    assert resolved.tokenizer == DEFAULT / "tokenizer.json" and resolved.source["kind"] == "default"
    assert sum(p.numel() for p in resolved.model.parameters()) < 5_000_000


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_readme_prompt(onnx_bundle, runtime):
    out = chat(onnx_bundle, runtime, README_PROMPT)
    assert out.returncode == 0, out.stderr
    assert out.stdout == README_REPLY


def test_eval_cli_reports_per_skill_and_runtime(onnx_bundle, tmp_path):
    report = tmp_path / "eval.json"
    out = subprocess.run([AFEDGE, "eval", str(onnx_bundle.path), "--dialogues", "4", "--reference", "--json",
                          str(report), "--min-accuracy", "1.01"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 1 and "below --min-accuracy" in out.stderr
    data = json.loads(report.read_text())
    assert set(data["runtimes"]) == {"onnx", "torch"} and data["dialogues"] == 4
    for r in data["runtimes"].values():
        assert set(r["per_skill"]) == {"arithmetic", "recall", "units", "facts", "spelling", "reversal"}
        assert r["questions"] == sum(s["total"] for s in r["per_skill"].values()) > 0
    assert data["runtimes"]["onnx"]["overall"] == data["runtimes"]["torch"]["overall"]


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_runtimes_agree_and_the_other_skills_work(onnx_bundle, runtime):
    """What the demo model does get right, on each runtime: recall across turns, units, facts, spelling, times."""
    script = "my name is Alice.\nhow many minutes are in 3 hours?\nwhat is the capital of france?\n" \
             "spell garden.\nwhat is 7 times 8?\nwhat is my name?\n"
    out = chat(onnx_bundle, runtime, script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["nice to meet you, Alice.", "180", "paris", "g-a-r-d-e-n", "56", "Alice"]


@pytest.mark.slow
def test_every_host_runtime_answers_and_meets_the_accuracy_bound(host_bundle, tmp_path):
    names, skipped = runnable(host_bundle)
    assert {"onnx", "executorch"} <= set(names) and not skipped
    for name in names:
        out = chat(host_bundle, name, README_PROMPT)
        assert out.returncode == 0 and out.stdout == README_REPLY, (name, out.stdout, out.stderr)
    report = tmp_path / "eval.json"
    out = subprocess.run([AFEDGE, "eval", str(host_bundle.path), "--json", str(report)], capture_output=True,
                         text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    worst = {n: r["overall"] for n, r in json.loads(report.read_text())["runtimes"].items()}
    assert set(worst) == set(names) and min(worst.values()) >= DEMO_MIN_ACCURACY, worst


@pytest.mark.slow
def test_state_saved_by_one_runtime_resumes_on_another(host_bundle, tmp_path):
    first, _ = open_conversation(host_bundle.path, "executorch")
    first.say("my name is Alice.")
    first.save(tmp_path / "s.safetensors")
    second, _ = open_conversation(host_bundle.path, "onnx")
    second.load(tmp_path / "s.safetensors")
    assert second.say("what is my name?") == first.say("what is my name?")


@pytest.mark.slow
def test_int4_weights_keep_the_task(tmp_path):
    """int4-g32 misses the gate's logit bounds on this model (README "Quantization") but keeps its task: written
    without the gate, ORT and TVM answer the held-out questions as the fp32 reference does (to within
    DEMO_QUANT_ACCURACY_DROP)."""
    bundle = demo_bundle(tmp_path / "int4", ["onnx", "tvm"], verify=False, quant="int4-g32")
    report = tmp_path / "eval.json"
    out = subprocess.run([AFEDGE, "eval", str(bundle.path), "--dialogues", "100", "--reference", "--json",
                          str(report)], capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr
    runtimes = json.loads(report.read_text())["runtimes"]
    overall = {n: r["overall"] for n, r in runtimes.items()}
    assert set(overall) == {"onnx", "tvm-host", "torch"}, overall
    drop = overall["torch"] - min(overall.values())
    assert min(overall.values()) >= DEMO_MIN_ACCURACY and drop <= DEMO_QUANT_ACCURACY_DROP, overall
