"""Case 10: ONNX external data that points outside the model's directory (`..`, an absolute path) or through a
symlink is refused before ONNX Runtime reads anything; plain external data beside the model still loads."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime
import pytest

from afedge.bundle import MANIFEST, Bundle, BundleError, load_bundle
from afedge.pipeline import open_session
from afedge.runtimes.onnxruntime import OrtSession
from afedge.session import ArtifactError
from tests.reliability.conftest import assert_one_line_error, cli, resign


def externalise(model_path, location: str, data_path) -> str:
    """Move the largest initializer of model_path into data_path and point it at `location`; returns its name."""
    model = onnx.load(str(model_path))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data_path.write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(data_path.stat().st_size))):
        t.external_data.add(key=k, value=v)
    onnx.save(model, str(model_path))
    return t.name


@pytest.fixture
def no_ort(monkeypatch):
    """ONNX Runtime must never be reached: any InferenceSession fails the test."""
    def refuse(*a, **k):
        raise AssertionError("onnxruntime.InferenceSession was called on a refused model")
    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def _files(bundle) -> dict:
    return {"step": bundle / "step.onnx", "prefill": bundle / "prefill.onnx"}


def _info(bundle):
    """The bundle's ProgramInfo, read without load_bundle (which refuses links before a runtime could)."""
    return Bundle(bundle, json.loads((bundle / MANIFEST).read_text())).info


def _session(bundle):
    b = load_bundle(bundle)
    return open_session(b, b.artifact("onnx"))


def test_external_data_beside_the_model_loads(bundle_copy):
    ref = _session(bundle_copy).step(np.array([3]), _session(bundle_copy).init_state())[0]
    externalise(bundle_copy / "step.onnx", "step.onnx.data", bundle_copy / "step.onnx.data")
    resign(bundle_copy)
    sess = _session(bundle_copy)
    np.testing.assert_array_equal(sess.step(np.array([3]), sess.init_state())[0], ref)


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_external_data_outside_the_bundle_is_refused(bundle_copy, capsys, no_ort, where):
    """The outside file holds exactly the right bytes, so only afedge's check can stop the load."""
    outside = bundle_copy.parent / "outside.bin"
    location = "../outside.bin" if where == "parent" else str(outside)
    name = externalise(bundle_copy / "step.onnx", location, outside)
    resign(bundle_copy)
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", "onnx", "--tokens", "1,2")
    why = "leaves the model's directory ('..')" if where == "parent" else "an absolute path"
    assert_one_line_error(rc, err, "step.onnx", f"tensor '{name}'", f"'{location}'", why, "refused before reading")


def test_symlinked_external_data_is_refused_by_the_bundle_and_the_runtime(bundle_copy, tmp_path, no_ort):
    outside = tmp_path / "outside.bin"
    externalise(bundle_copy / "step.onnx", "w.bin", outside)
    os.symlink(outside, bundle_copy / "w.bin")
    with pytest.raises(BundleError, match=r"w\.bin: a link inside the bundle"):
        load_bundle(bundle_copy)
    with pytest.raises(ArtifactError, match=r"'w\.bin', a symbolic link \(w\.bin\); refused before reading"):
        OrtSession(_files(bundle_copy), _info(bundle_copy))


def test_external_data_in_a_symlinked_directory_is_refused(bundle_copy, tmp_path, no_ort):
    (tmp_path / "elsewhere").mkdir()
    externalise(bundle_copy / "step.onnx", "d/w.bin", tmp_path / "elsewhere" / "w.bin")
    os.symlink(tmp_path / "elsewhere", bundle_copy / "d")
    with pytest.raises(ArtifactError, match=r"a symbolic link \(d\)"):
        OrtSession(_files(bundle_copy), _info(bundle_copy))


def test_missing_external_data_is_named(bundle_copy, no_ort):
    externalise(bundle_copy / "step.onnx", "gone.bin", bundle_copy / "gone.bin")
    (bundle_copy / "gone.bin").unlink()
    with pytest.raises(ArtifactError, match="'gone.bin', a file that does not exist"):
        OrtSession(_files(bundle_copy), _info(bundle_copy))
