"""Case 8: an op an exporter cannot lower ends the export with one line naming the exporter, the op, the layer it
sits in and the fallback that works (the target's other exporters are tried; the ones that export are named as a
`--runtimes` list), or that none does; nothing is written."""
from __future__ import annotations

import torch

from afedge.mixers.retnet import RetNet
from tests.reliability.conftest import assert_one_line_error, cli


def test_onnx_export_of_an_unsupported_op_names_op_layer_and_exporter(checkpoint_dir, tmp_path, capsys,
                                                                     monkeypatch):
    """aten.cummax has no ONNX translation; it is added to the RetNet chunked form (the prefill graph)."""
    forward = RetNet.forward

    def with_cummax(self, x, state, chunk_size=None):
        y, state = forward(self, x, state, chunk_size)
        return y + 0.0 * torch.cummax(y, dim=-1).values, state

    monkeypatch.setattr(RetNet, "forward", with_cummax)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                     "--out", out)
    assert_one_line_error(rc, err, "exporter 'onnx' (target host)", "method 'prefill'", "aten.cummax",
                          "blocks.0.mixer (RetNet)", "rewrite that op in the mixer",
                          "no other exporter of target host (onnx, executorch, tvm) exports it either")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_the_fallback_named_is_checked_to_export(checkpoint_dir, tmp_path, capsys, monkeypatch):
    """ONNX refuses an op (its lowering raises); ExecuTorch and TVM lower the model: the error names them."""
    from afedge.exporters.onnx import OnnxExporter
    from afedge.exporting import ExportError

    def refuse(self, program, target, *_):
        raise ExportError(f"exporter 'onnx' (target {target.name}) cannot export method 'step': op aten.foo")

    monkeypatch.setattr(OnnxExporter, "export", refuse)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", checkpoint_dir, "--out", out)
    assert_one_line_error(rc, err, "exporter 'onnx' (target host)", "op aten.foo",
                          "--runtimes executorch,tvm exports without onnx (checked)")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
