"""The token embedding as an explicit quant choice (`QuantPolicy.embedding`), realised by every exporter.

Each exporter quantizes only the embedding here (every Linear kept fp32 by the policy), so its artifact must compute
as the torch simulation of that one choice does (fp32 tolerance: the dequantization is exact arithmetic), and away
from the fp32 model (the table really is quantized). ONNX Runtime: GatherBlockQuantized; TVM and ExecuTorch:
afedge's QuantEmbedding gather, dequantized in the graph. A tied head quantized alike shares the integers.
The ONNX int8 and ExecuTorch cases run under `-m slow` (`pytest -m slow tests/test_quant_embedding.py`).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.exporting import EXPORTERS, load_plugins
from afedge.parity.metrics import max_rel
from afedge.quant import QuantPolicy, plan_quant
from afedge.quant.simulate import simulated
from afedge.session import RUNTIMES, ProgramInfo
from afedge.target import load_target
from afedge.tolerances import tolerance

load_plugins()

ONLY_EMBEDDING = dict(head="fp32", keep_fp32=("blocks",))   # every Linear stays fp32
CASES = [("onnx", "int8", "int8"), ("onnx", "int4-g32", "scheme"), ("tvm", "int4-g32", "scheme"),
         ("executorch", "int8", "int8")]
SLOW = {("onnx", "int8", "int8"), ("executorch", "int8", "int8")}   # the default suite keeps one case per op


def _model() -> LM:
    return LM(LMConfig(d_model=32, n_layers=2, mixer="retnet")).eval()


def _logits(session, tokens: np.ndarray) -> np.ndarray:
    """Prefill logits, then one step's, stacked (2, V)."""
    logits, state = session.prefill(tokens, session.init_state())
    step, _ = session.step(np.array([int(logits.argmax(-1)[0])]), state)
    return np.concatenate([logits, step])


@pytest.mark.parametrize("exporter,quant,embedding", [
    pytest.param(*c, id="-".join(c), marks=[pytest.mark.slow] if c in SLOW else []) for c in CASES])
def test_an_exported_quantized_embedding_computes_as_simulated(exporter, quant, embedding, tmp_path):
    from afedge.runtimes.torch import TorchSession
    model, target = _model(), load_target("host")
    policy = QuantPolicy(embedding=embedding, **ONLY_EMBEDDING)
    plan = plan_quant(model, quant, policy)
    assert plan.layers == ("embed",) and "embed.weight" not in plan.kept_fp32
    program = to_recurrent(model, 8, 16)
    [art] = EXPORTERS.get(exporter)().export(program, target, quant, tmp_path, policy)
    session = RUNTIMES.get(art.runtime)({m: tmp_path / f for m, f in art.files.items()}, ProgramInfo.of(program), 2,
                                        art.arch, target.onnx if exporter == "onnx" else {},
                                        tuple(art.info.get("cpu_features", ())))
    tokens = np.random.default_rng(0).integers(0, 256, (1, 16), dtype=np.int64)
    got = _logits(session, tokens)
    want = _logits(TorchSession(to_recurrent(simulated(model, plan, plan.layers), 8, 16)), tokens)
    fp32 = _logits(TorchSession(program), tokens)
    tol = tolerance("fp32")
    assert max_rel(got, want) <= tol.max_rel, f"{exporter}: {max_rel(got, want):.2e} from the simulated embedding"
    assert max_rel(got, fp32) > 10 * tol.max_rel, f"{exporter}: the artifact computes as the fp32 embedding does"
    q = art.info["quant"]
    assert q["policy"]["embedding"] == embedding and q["embedding"]["bits"] in (4, 8)
    held = (q.get("methods") or {}).get("step", q)["embedding_bytes"]   # ONNX records each graph's own
    assert held <= model.embed.weight.numel() * 4 // 3, f"{exporter}: the embedding holds {held} bytes"


def test_a_tied_head_quantized_as_the_embedding_shares_its_integers(tmp_path):
    """TVM holds one packed table for embedding and head; quantized differently, the head is a copy of its own."""
    model, target = _model(), load_target("host")
    program = to_recurrent(model, 8, 16)
    held = {}
    for head in ("scheme", "int8"):
        policy = QuantPolicy(embedding="scheme", head=head)
        assert plan_quant(model, "int4-g32", policy).shares_tied == (head == "scheme")
        [art] = EXPORTERS.get("tvm")().export(program, target, "int4-g32", tmp_path / head, policy)
        held[head] = art.info["quant"]["weight_bytes"]
    table = model.embed.weight
    int8_copy = table.numel() + table.shape[0] * 4   # the int8 head: a byte per weight plus a scale per row
    assert held["int8"] - held["scheme"] == int8_copy, held


def test_quantized_copy_shares_the_tied_table_and_gathers_only_rows():
    from afedge.quant.weights import QuantEmbedding, dequantize, quantize, quantized_copy, unpack_int4
    model = _model()
    q = quantized_copy(model, {"head": (4, 32)}, (4, 32))
    assert isinstance(q.embed, QuantEmbedding) and q.head.qweight is q.embed.qweight and q.head.scale is q.embed.scale
    tokens = torch.tensor([[3, 255, 0]])
    ints, scale = quantize(model.embed.weight, 4, 32)
    torch.testing.assert_close(q.embed(tokens), dequantize(ints, scale)[tokens], rtol=0, atol=0)
    assert torch.equal(unpack_int4(q.embed.qweight), ints.to(torch.int32))
    assert model.head.weight is model.embed.weight and model.embed.weight.dtype == torch.float32   # untouched
