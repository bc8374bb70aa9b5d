"""Weight bytes: every quantized scheme an exporter claims holds at most WEIGHT_BYTES_MAX_RATIO of its fp32 bytes.

The model is large enough (retnet, d_model 256, 4 layers: 3.5 M parameters) that the fp32 embedding, norms and
biases are a small share; a d=32 toy model is half embedding and would measure that instead. Bytes are counted
from what each artifact file holds: ONNX initializers (both graphs), the .pte's constant buffer plus XNNPACK's
named data, the tensors bound into the TVM library (checked against the library's own size).

Exporting this model costs 50-500 s per artifact on a loaded 2-core machine, so every case runs under `-m slow`
(`pytest -m slow tests/test_quant_bytes.py`). Measured (README "Quantization"): ONNX int8 0.274, int4-g32 0.178;
ExecuTorch int8 0.268, 8da4w 0.160; TVM int8 0.273, int4-g32 0.179 (its library, less code: 0.277, 0.184).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from afedge import LM, LMConfig, to_recurrent
from afedge.exporting import EXPORTERS, load_plugins
from afedge.quant import scheme
from afedge.target import load_target
from afedge.tolerances import WEIGHT_BYTES_MAX_RATIO

load_plugins()

pytestmark = pytest.mark.slow


def _cases():
    for exporter in EXPORTERS.names():
        for sid in EXPORTERS.get(exporter).quant_schemes:
            if scheme(sid).quantizes_weights:
                yield pytest.param(exporter, sid, id=f"{exporter}-{sid}")


@pytest.fixture(scope="module")
def program():
    return to_recurrent(LM(LMConfig(d_model=256, n_layers=4, mixer="retnet")), chunk_size=16, prefill_len=64)


@pytest.fixture(scope="module")
def exported(program, tmp_path_factory):
    """(exporter, scheme) -> (artifact, out dir), each exported once for the module."""
    cache = {}

    def get(exporter: str, quant: str):
        if (exporter, quant) not in cache:
            out = tmp_path_factory.mktemp(f"{exporter}-{quant}")
            [art] = EXPORTERS.get(exporter)().export(program, load_target("host"), quant, out)
            cache[exporter, quant] = art, out
        return cache[exporter, quant]
    return get


def _held_bytes(exporter: str, art, out: Path) -> int:
    """Weight bytes read back from the artifact's own files."""
    if exporter == "onnx":
        import onnx

        from afedge.quant.onnx_ort import weight_bytes
        return sum(weight_bytes(onnx.load(str(out / f))) for f in art.files.values())
    if exporter == "executorch":
        from afedge.exporters.executorch import pte_weight_bytes
        return pte_weight_bytes(out / art.files["step"])
    return art.info["quant"]["weight_bytes"]   # tvm: the bound tensors; the library's size is checked below


@pytest.mark.parametrize("exporter,quant", list(_cases()))
def test_quantized_weights_shrink(exporter, quant, exported):
    fp32, fp32_out = exported(exporter, "fp32")
    art, out = exported(exporter, quant)
    held, base = _held_bytes(exporter, art, out), _held_bytes(exporter, fp32, fp32_out)
    assert held == art.info["quant"]["weight_bytes"] and base == fp32.info["quant"]["weight_bytes"]
    bound = WEIGHT_BYTES_MAX_RATIO[scheme(quant).weight_bits]
    print(f"{exporter} {quant}: {held} / {base} weight bytes = {held / base:.3f} (bound {bound})")
    assert held / base <= bound, f"{exporter} {quant}: {held} / {base} = {held / base:.3f} > {bound}"
    if exporter == "tvm":   # the library itself: its size less the fp32 library's code (file - fp32 weights)
        so = lambda a, o: (o / a.files["step"]).stat().st_size  # noqa: E731
        code = so(fp32, fp32_out) - base
        in_file = so(art, out) - code
        print(f"tvm {quant}: library {so(art, out)} bytes, {in_file / base:.3f} of the fp32 weights besides code")
        assert in_file / base <= bound, f"tvm {quant}: the library holds {in_file} weight bytes of {base}"
