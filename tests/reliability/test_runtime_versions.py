"""Case 9: an artifact newer than the installed runtime (ONNX opset or IR version, ExecuTorch program format) is
refused with both versions named, before the runtime parses it; the manifest records what built it."""
from __future__ import annotations

from importlib import metadata

import onnx
import pytest

from afedge.runtimes.executorch import runtime_format
from afedge.runtimes.onnxruntime import max_opset
from tests.reliability.conftest import assert_one_line_error, cli, resign


def test_manifest_records_versions_and_formats(bundle_dir):
    from afedge.bundle import load_bundle
    b = load_bundle(bundle_dir)
    for pkg in ("onnx", "onnxruntime", "executorch", "apache-tvm", "torch"):
        assert b.manifest["versions"][pkg] == metadata.version(pkg)
    assert b.artifact("onnx").info["opset"] == 18
    assert (bundle_dir / "model.pte").read_bytes()[4:8] == runtime_format()


def _set_onnx(bundle, **fields) -> None:
    path = bundle / "step.onnx"
    model = onnx.load(str(path))
    if "opset" in fields:
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = fields["opset"]
    if "ir_version" in fields:
        model.ir_version = fields["ir_version"]
    onnx.save(model, str(path))
    resign(bundle)


def test_onnx_opset_newer_than_onnxruntime(bundle_copy, capsys):
    import onnxruntime
    _set_onnx(bundle_copy, opset=max_opset() + 1)
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", "onnx", "--tokens", "1,2")
    assert_one_line_error(rc, err, f"step.onnx needs ONNX opset {max_opset() + 1}",
                          f"onnxruntime {onnxruntime.__version__} supports opsets up to {max_opset()}")


def test_onnx_ir_version_newer_than_onnxruntime(bundle_copy, capsys):
    _set_onnx(bundle_copy, ir_version=99)
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", "onnx", "--tokens", "1,2")
    line = assert_one_line_error(rc, err, "step.onnx has ONNX IR version 99", "reads IR versions up to")
    assert int(line.split("up to ")[1].split()[0]) < 99


@pytest.mark.parametrize("ident", [b"ET99", b"ET01"])
def test_pte_format_other_than_the_runtime_reads(bundle_copy, capsys, ident):
    pte = bundle_copy / "model.pte"
    blob = bytearray(pte.read_bytes())
    blob[4:8] = ident
    pte.write_bytes(bytes(blob))
    resign(bundle_copy)
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", "executorch", "--tokens", "1,2")
    assert_one_line_error(rc, err, f"model.pte is program format {ident.decode()}",
                          f"executorch {metadata.version('executorch')} runtime reads {runtime_format().decode()}")
