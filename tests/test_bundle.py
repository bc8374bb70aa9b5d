"""Bundle integrity: atomic replace, lock, sha256 verification, schema refusal."""
from __future__ import annotations

import json
import os

import pytest

from afedge.bundle import MANIFEST, BundleError, load_bundle, staged, write_manifest


def minimal_manifest() -> dict:
    return {k: {} for k in ("model", "program", "target", "parity")} | {"state": [], "quant": "fp32",
                                                                         "artifacts": []}


def make_bundle(out, payload: bytes = b"weights"):
    with staged(out) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        write_manifest(tmp, minimal_manifest())
    return out


def test_round_trip_and_hashes(tmp_path):
    b = load_bundle(make_bundle(tmp_path / "b"))
    assert set(b.manifest["files"]) == {"model.bin"}
    assert len(b.manifest["files"]["model.bin"]["sha256"]) == 64


def test_tampered_file_is_named(tmp_path):
    out = make_bundle(tmp_path / "b")
    (out / "model.bin").write_bytes(b"weightz")
    with pytest.raises(BundleError, match=r"model\.bin: sha256 mismatch"):
        load_bundle(out)


def test_unlisted_and_missing_files(tmp_path):
    out = make_bundle(tmp_path / "b")
    (out / "extra.so").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"not listed in the manifest: \['extra\.so'\]"):
        load_bundle(out)
    (out / "extra.so").unlink()
    (out / "model.bin").unlink()
    with pytest.raises(BundleError, match=r"model\.bin: listed in the manifest but missing"):
        load_bundle(out)


def test_unknown_schema_is_refused(tmp_path):
    out = make_bundle(tmp_path / "b")
    m = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps(m | {"schema_version": 99}))
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        load_bundle(out)


def test_failed_write_keeps_the_previous_bundle(tmp_path):
    out = make_bundle(tmp_path / "b", b"old")
    with pytest.raises(RuntimeError), staged(out) as tmp:
        (tmp / "model.bin").write_bytes(b"new")
        raise RuntimeError("exporter crashed")
    assert (out / "model.bin").read_bytes() == b"old"
    assert load_bundle(out)
    assert not list(tmp_path.glob(".b.tmp-*")) and not (tmp_path / ".b.lock").exists()


def test_second_writer_is_refused_while_locked(tmp_path):
    out = tmp_path / "b"
    with staged(out):
        with pytest.raises(BundleError, match=f"locked by PID {os.getpid()}"), staged(out):
            pass


def test_stale_lock_and_temps_are_cleaned(tmp_path):
    dead = 2 ** 22 + 12345  # above pid_max defaults: no such process
    (tmp_path / ".b.lock").write_text(str(dead))
    (tmp_path / f".b.tmp-{dead}").mkdir()
    make_bundle(tmp_path / "b")
    assert not (tmp_path / f".b.tmp-{dead}").exists()
