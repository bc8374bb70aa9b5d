"""The Android app's pure-Kotlin core (examples/android/core), built with Debian's kotlinc and run on the JVM against
golden files from the Python side: token ids, manifest fields and fingerprint, greedy replies from recorded logits,
state files both ways. `make system-deps` installs kotlinc (apt package `kotlin`)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from afedge.chat.bundles import open_runtime
from afedge.chat.golden import write_goldens
from afedge.chat.statefile import bundle_fingerprint, load_state
from afedge.model import LM, LMConfig
from afedge.pipeline import export_bundle
from afedge.rewrite import to_recurrent
from afedge.target import load_target

CORE = Path(__file__).resolve().parents[1] / "examples" / "android" / "core" / "src"
MAIN = "org.afedge.chat.GoldenTestKt"


@pytest.fixture(scope="module")
def core_jar(tmp_path_factory) -> Path:
    kotlinc = shutil.which("kotlinc")
    if kotlinc is None:
        pytest.fail("kotlinc is not installed: run `make system-deps` (Debian package `kotlin`)")
    jar = tmp_path_factory.mktemp("kotlin") / "core.jar"
    sources = sorted(str(p) for p in CORE.rglob("*.kt"))
    out = subprocess.run([kotlinc, *sources, "-include-runtime", "-d", str(jar)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and jar.is_file(), out.stderr
    return jar


@pytest.fixture(scope="module")
def goldens(tmp_path_factory) -> tuple[Path, object]:
    """A tiny model's ExecuTorch bundle (the manifest names its .pte) and the goldens recorded on it."""
    target = load_target("android-arm64")
    model = LM(LMConfig(d_model=32, n_layers=1, mixer="retnet", mixer_kwargs={"n_heads": 2}, seed=5))
    root = tmp_path_factory.mktemp("android")
    bundle, _ = export_bundle(to_recurrent(model, target.chunk_size, target.prefill_len), target, root / "bundle",
                              ["executorch"], verify=False, progress=lambda _: None)
    return write_goldens(bundle, open_runtime(bundle, "torch"), root / "goldens"), bundle


def run_core(jar: Path, golden_dir: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["java", "-cp", str(jar), MAIN, str(golden_dir), str(out)], capture_output=True, text=True,
                          timeout=300)


def test_kotlin_core_reproduces_the_python_side(core_jar, goldens, tmp_path):
    golden_dir, bundle = goldens
    replay = json.loads((golden_dir / "replay.json").read_text())
    assert any(c["method"] == "prefill" for c in replay["calls"])  # the long turn exercises a prefill block
    out = run_core(core_jar, golden_dir, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok:")
    fp = bundle_fingerprint(bundle.manifest, bundle.info.spec)
    mine = load_state(golden_dir / "state.safetensors", bundle.info.spec, fp)
    theirs = load_state(tmp_path / "kotlin_state.safetensors", bundle.info.spec, fp)  # Kotlin-written, read here
    assert all(np.array_equal(a, b) for a, b in zip(mine.state, theirs.state))
    assert (theirs.pending, theirs.tokens_seen) == (mine.pending, mine.tokens_seen)


@pytest.mark.parametrize("case", ["reply", "token_ids", "fingerprint"])
def test_kotlin_core_notices_a_wrong_golden(core_jar, goldens, tmp_path, case):
    golden_dir = shutil.copytree(goldens[0], tmp_path / "g")
    name, key = {"reply": ("replay.json", "turns"), "token_ids": ("tokens.json", "cases"),
                 "fingerprint": ("expect_manifest.json", "fingerprint")}[case]
    data = json.loads((golden_dir / name).read_text())
    if case == "reply":
        data[key][0]["reply"] += "!"
    elif case == "token_ids":
        data[key][0]["ids"][0] += 1
    else:
        data[key] = "0" * 64
    (golden_dir / name).write_text(json.dumps(data))
    out = run_core(core_jar, golden_dir, tmp_path / "out")
    assert out.returncode == 1 and "FAIL:" in out.stderr, out.stderr


@pytest.mark.slow
def test_kotlin_core_answers_like_the_demo_model(core_jar, tmp_path):
    """The same check over the embedded demo model's own .pte (recorded on ExecuTorch), where replies are real."""
    from afedge.zoo import resolve_model
    target, resolved = load_target("android-arm64"), resolve_model(None)
    bundle, _ = export_bundle(to_recurrent(resolved.model, target.chunk_size, target.prefill_len), target,
                              tmp_path / "bundle", ["executorch"], verify=False, progress=lambda _: None,
                              tokenizer=resolved.tokenizer)
    golden_dir = write_goldens(bundle, open_runtime(bundle, "executorch"), tmp_path / "goldens")
    replay = json.loads((golden_dir / "replay.json").read_text())
    assert [t["reply"] for t in replay["turns"]][1:3] == ["nice to meet you, Alice.", "c-a-t"]
    out = run_core(core_jar, golden_dir, tmp_path / "out")
    assert out.returncode == 0, out.stderr
