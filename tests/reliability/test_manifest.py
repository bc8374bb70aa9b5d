"""Case 13: a tampered manifest or an unknown schema version is refused before any file of the bundle is hashed or
parsed; the CLI says so in one line (a traceback only with --debug)."""
from __future__ import annotations

import subprocess
import sys

import pytest

import afedge.bundle
from afedge.bundle import MANIFEST, BundleError, load_bundle
from tests.reliability.conftest import assert_one_line_error, cli, edit_manifest


@pytest.fixture
def no_hashing(monkeypatch):
    def hashed(path):
        raise AssertionError(f"{path} was hashed before the manifest was accepted")
    monkeypatch.setattr(afedge.bundle, "sha256", hashed)


def _set(path: str, value):
    """An edit that sets manifest[a][b]... = value for path 'a.b...' (list indices as integers)."""
    def edit(m):
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = m
        for k in parents:
            node = node[k]
        node[last] = value
    return edit


HAND_EDITS = {
    "state shape": _set("state.0.shape", [1, 2, 8, 9]),
    "vocab": _set("program.vocab_size", 512),
    "artifact file": _set("artifacts.0.files.step", "prefill.onnx"),
    "verdict": _set("parity.verdict", "pass"),
}


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_hand_edited_manifest_is_refused_before_hashing(bundle_copy, no_hashing, capsys, edit):
    edit_manifest(bundle_copy, HAND_EDITS[edit])
    rc, _, err = cli(capsys, "inspect", bundle_copy)
    assert_one_line_error(rc, err, f"{bundle_copy / MANIFEST}", "field 'manifest_sha256' does not match")


def test_missing_digest_is_refused(bundle_copy, no_hashing):
    edit_manifest(bundle_copy, lambda m: m.pop("manifest_sha256"))
    with pytest.raises(BundleError, match="field 'manifest_sha256' is missing"):
        load_bundle(bundle_copy)


# A tamperer who recomputes the digest still cannot point the bundle outside itself or break its structure.
FORGED = {
    "path outside": (lambda m: m["files"].__setitem__("../outside.bin", {"sha256": "0" * 64, "bytes": 1}),
                     "field 'files.../outside.bin' is not a safe relative path"),
    "absolute path": (lambda m: m["files"].__setitem__("/etc/hostname", {"sha256": "0" * 64, "bytes": 1}),
                      "field 'files./etc/hostname' is not a safe relative path"),
    "unlisted artifact": (_set("artifacts.0.files.step", "elsewhere.onnx"),
                          "field 'artifacts[0].files' names files not in the file table: ['elsewhere.onnx']"),
    "bad artifact": (_set("artifacts.0", {"name": "x"}), "field 'artifacts[0]' is not an artifact"),
    "bad vocab": (_set("program.vocab_size", -1), "field 'program.vocab_size' must be a positive integer"),
    "bad state": (_set("state", [{"name": "x"}]), "field 'state' is not a state contract"),
    "bad hash": (lambda m: m["files"].__setitem__("step.onnx", {"sha256": "xyz", "bytes": 3}),
                 "field 'files.step.onnx' needs a sha256 (64 hex digits)"),
    "tokenizer": (_set("tokenizer", "../tokenizer.json"), "field 'tokenizer' names '../tokenizer.json'"),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_forged_manifest_is_refused_before_hashing(bundle_copy, no_hashing, case):
    edit, message = FORGED[case]
    edit_manifest(bundle_copy, edit, redigest=True)
    with pytest.raises(BundleError) as e:
        load_bundle(bundle_copy)
    assert message in str(e.value)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_schema_version_is_refused(bundle_copy, no_hashing, capsys, version):
    edit_manifest(bundle_copy, _set("schema_version", version), redigest=True)
    rc, _, err = cli(capsys, "run", bundle_copy, "--tokens", "1")
    assert_one_line_error(rc, err, f"schema_version {version!r} is not supported (this afedge reads 1)")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_unreadable_manifest_is_refused(bundle_copy, no_hashing, text):
    (bundle_copy / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="manifest.json: (not valid JSON|the manifest must be a JSON object)"):
        load_bundle(bundle_copy)


def test_the_real_command_exits_1_with_one_line_and_debug_shows_the_traceback(bundle_copy):
    edit_manifest(bundle_copy, _set("program.vocab_size", 7))
    cmd = [sys.executable, "-m", "afedge.cli", "inspect", str(bundle_copy)]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1
    assert plain.stderr.strip().splitlines() == [f"afedge: error: {bundle_copy / MANIFEST}: field 'manifest_sha256' "
                                                 f"does not match the manifest's content (the manifest was edited "
                                                 f"or corrupted)"]
    debug = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "BundleError" in debug.stderr


def test_int_keyed_tables_survive_the_digest(tmp_path):
    """Per-layer tables keyed by int (1, 2, ..., 10) sort differently once JSON turns the keys into strings."""
    from afedge.bundle import staged, write_manifest
    out = tmp_path / "b"
    with staged(out) as tmp:
        (tmp / "w.bin").write_bytes(b"w")
        write_manifest(tmp, {k: {} for k in ("model", "program", "target", "parity")}
                       | {"state": [], "quant": "fp32", "artifacts": [], "per_layer": {i: i for i in range(12)}})
    assert load_bundle(out).manifest["per_layer"]["10"] == 10
