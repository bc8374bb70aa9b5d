"""Mamba's `scan="sequential"` chunked form (the CPU-fast prefill the benchmarks use): exact against the fp64
naive reference and the step form, the same state as the segment-sum form, and the same numbers through ONNX
Runtime; under `slow`, its ExecuTorch prefill leaves no more nodes on portable kernels than the segsum form."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.mixers.mamba import Mamba
from afedge.parity.metrics import max_rel
from afedge.tolerances import tolerance

TOL = tolerance("fp32")


def mixer(scan: str) -> Mamba:
    torch.manual_seed(0)
    return Mamba(32, scan=scan).eval()


@torch.no_grad()
def test_sequential_scan_is_exact():
    x = torch.randn(2, 300, 32, generator=torch.Generator().manual_seed(1))
    m = mixer("sequential")
    ref = copy.deepcopy(m).double().naive(x.double())
    y, state = m(x[:, :250], m.init_state(2), 16)          # 250 is not a multiple of the chunk
    ys = [y]
    for t in range(250, 300):
        y, state = m.step(x[:, t], state)
        ys.append(y[:, None])
    assert max_rel(torch.cat(ys, 1), ref) <= TOL.max_rel
    _, seg_state = mixer("segsum")(x[:, :250], m.init_state(2), 16)
    _, seq_state = m(x[:, :250], m.init_state(2), 16)
    for a, b in zip(seq_state, seg_state):
        assert max_rel(a, b) <= TOL.state_rel


def test_unknown_scan_is_refused():
    with pytest.raises(ValueError, match="mamba: scan must be one of"):
        Mamba(32, scan="parallel")


def _program(scan: str):
    return to_recurrent(LM(LMConfig(vocab_size=256, d_model=32, n_layers=2, mixer="mamba", mlp_ratio=0,
                                    mixer_kwargs={"scan": scan})), chunk_size=8, prefill_len=16)


def test_sequential_scan_through_onnx_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from afedge.exporting import EXPORTERS, load_plugins
    from afedge.runtimes.onnxruntime import OrtSession
    from afedge.runtimes.torch import TorchSession
    from afedge.session import ProgramInfo
    from afedge.target import load_target
    load_plugins()
    program = _program("sequential")
    art = EXPORTERS.get("onnx")().export(program, load_target("host"), "fp32", tmp_path)[0]
    ort = OrtSession({m: tmp_path / f for m, f in art.files.items()}, ProgramInfo.of(program))
    ref = TorchSession(program)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 40))  # two prefill blocks + 8 steps
    (a, sa), (b, sb) = ort.prefill(tokens, ort.init_state()), ref.prefill(tokens, ref.init_state())
    assert max_rel(torch.from_numpy(a), torch.from_numpy(b)) <= TOL.max_rel
    for x, y in zip(sa, sb):
        assert max_rel(torch.from_numpy(x), torch.from_numpy(y)) <= TOL.state_rel


@pytest.mark.slow
def test_sequential_scan_delegates_to_xnnpack_as_well_as_segsum():
    pytest.importorskip("executorch")
    from afedge.exporters.executorch import _xnnpack_partitioner, delegation_report, lower, xnnpack_safe
    portable = {}
    for scan in ("segsum", "sequential"):
        programs = xnnpack_safe({"prefill": _program(scan).export("prefill")})
        portable[scan] = delegation_report(lower(programs, [_xnnpack_partitioner()]))["prefill"]["portable_nodes"]
    assert portable["sequential"] <= portable["segsum"], portable
