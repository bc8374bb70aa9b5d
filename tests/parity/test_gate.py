"""The parity gate catches a corrupted artifact: one weight changed inside the ONNX file or inside the .pte (with the
manifest re-hashed, so only the numbers can give it away) fails with the runtime, the metric and the step named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from afedge.bundle import load_bundle, write_manifest
from afedge.cli import main
from afedge.parity.workloads import prompt_decode
from afedge.pipeline import export_bundle, run_gate
from afedge.target import load_target
from tests.parity.conftest import tiny_program

pytest.importorskip("onnx")
pytest.importorskip("executorch.runtime")


def _export(tmp_path, exporter: str):
    out = tmp_path / exporter
    export_bundle(tiny_program("retnet"), load_target("host"), out, [exporter], verify=False,
                  progress=lambda m: None)
    return out


def _rehash(out) -> None:
    """Recompute the manifest's file table, as a tamperer who knows the format would."""
    write_manifest(out, json.loads((out / "manifest.json").read_text()))


def _corrupt_onnx_step(out) -> str:
    """Add 1.0 to one element of a layer-0 weight inside step.onnx only (prefill.onnx stays intact)."""
    import onnx
    from onnx import numpy_helper
    path = out / "step.onnx"
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if "blocks.0" in t.name and len(t.dims) == 2)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    return init.name


def _corrupt_pte(out, program) -> None:
    """Find the raw fp32 bytes of a layer-0 weight inside model.pte and change one of them."""
    w = program.model.blocks[0].mlp[0].weight.detach().numpy().astype(np.float32)
    blob = bytearray((out / "model.pte").read_bytes())
    at = bytes(blob).find(w.tobytes()[:64])
    assert at >= 0, "weight bytes not found in the .pte (constants are no longer stored raw)"
    blob[at:at + 4] = np.float32(w.flat[0] + 1.0).tobytes()
    (out / "model.pte").write_bytes(bytes(blob))


def test_corrupted_onnx_weight_fails_the_gate_naming_runtime_metric_and_step(tmp_path):
    out = _export(tmp_path, "onnx")
    [ok] = run_gate(load_bundle(out), prompt_decode(40, 32), "fp32", progress=lambda m: None)
    assert ok.status == "pass", ok.reason
    _corrupt_onnx_step(out)
    _rehash(out)
    [bad] = run_gate(load_bundle(out), prompt_decode(40, 32), "fp32", progress=lambda m: None)
    assert bad.status == "fail"
    # 40 tokens = 2 prefill blocks of 16 + 8 steps through step.onnx, so the logits after the prompt already differ
    assert bad.reason.startswith("onnxruntime: logits max_rel ") and "first at prefill" in bad.reason, bad.reason


def test_corrupted_pte_weight_fails_the_gate_and_the_cli(tmp_path, capsys):
    out = _export(tmp_path, "executorch")
    _corrupt_pte(out, tiny_program("retnet"))
    _rehash(out)
    [bad] = run_gate(load_bundle(out), prompt_decode(40, 32), "fp32", progress=lambda m: None)
    assert bad.status == "fail" and bad.reason.startswith("executorch: logits max_rel "), bad.reason
    assert "first at prefill" in bad.reason
    code = main(["parity", str(out), "--steps", "16", "--report", str(tmp_path / "r.md")])
    assert code == 1
    assert "FAIL" in (tmp_path / "r.md").read_text()
    assert (tmp_path / "r.json").is_file() and (tmp_path / "r.png").stat().st_size > 0


def test_tampering_without_rehash_is_refused_before_any_runtime(tmp_path):
    out = _export(tmp_path, "onnx")
    _corrupt_onnx_step(out)
    with pytest.raises(Exception, match=r"step\.onnx: sha256 mismatch"):
        load_bundle(out)
