"""Case 24: 65,536 decode steps of an fp16 and an int8-weight program stay within their tolerance profiles of the
fp64 reference, and a deliberately unstable recurrence (decay > 1) is caught by the same comparison.

fp16 (the scheme's definition: fp16 weights and activations, fp32 state): weights rounded to fp16 and every leaf
module's output rounded to fp16, while the recurrence's own arithmetic stays fp32. int8: per-channel symmetric int8
weights on every Linear but the tied embedding / head (the quant policy's default). Both go through
afedge.parity.compare, teacher-forced on the reference's tokens. A step computed entirely in fp16, state included
(what a delegate with one fp16 compute precision does), drifts past the fp16 state bound and is caught too.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from afedge.parity.compare import compare
from afedge.parity.noise import Fp64Reference
from afedge.parity.workloads import long_horizon
from afedge.rewrite import RecurrentProgram
from afedge.runtimes.torch import TorchSession
from afedge.session import ProgramInfo, Session
from afedge.tolerances import tolerance
from tests.reliability.conftest import tiny_program

pytestmark = pytest.mark.slow


class CastSession(Session):
    """The program's graphs computed in `dtype` (fp32 or fp16); state crosses the boundary as fp32 (the contract).
    The fp64 reference is afedge.parity.noise.Fp64Reference (state kept fp64, so it does not round between steps)."""

    runtime = "torch-cast"

    def __init__(self, program: RecurrentProgram, dtype: torch.dtype) -> None:
        super().__init__(ProgramInfo.of(program), threads=1)
        model = copy.deepcopy(program.model).to(dtype)
        cast = RecurrentProgram(model, program.chunk_size, program.prefill_len, program.batch)
        self.dtype, self._graphs = dtype, {m: cast.graph(m) for m in ("step", "prefill")}

    @torch.no_grad()
    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch.set_num_threads(self.threads)  # one thread: a d=16 step is ~50x slower with 2 on a busy machine
        tokens, *state = (torch.from_numpy(np.ascontiguousarray(a)) for a in inputs)
        logits, *state = self._graphs[method](tokens, *(s.to(self.dtype) for s in state))
        return [logits.float().numpy(), *(s.float().numpy() for s in state)]


def fp64_reference(program: RecurrentProgram) -> Fp64Reference:
    return Fp64Reference(TorchSession(program))


def _to_fp16(_module, _inputs, output):
    return output.half().float() if isinstance(output, torch.Tensor) and output.is_floating_point() else output


def fp16_compute(program: RecurrentProgram) -> RecurrentProgram:
    """A copy with fp16-rounded parameters whose leaf modules (Linear, norms, embedding, GELU) emit fp16-rounded
    outputs; what happens between them (the state update) stays fp32."""
    model = copy.deepcopy(program.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(_to_fp16)
    return RecurrentProgram(model, program.chunk_size, program.prefill_len, program.batch)


def int8_weights(program: RecurrentProgram) -> RecurrentProgram:
    """A copy whose Linear weights (not the tied head) are rounded to per-output-channel symmetric int8."""
    model = copy.deepcopy(program.model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.head:
                scale = m.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
                m.weight.copy_((m.weight / scale).round().clamp(-127, 127) * scale)
    return RecurrentProgram(model, program.chunk_size, program.prefill_len, program.batch)


@pytest.mark.parametrize("scheme", ["fp16", "int8"])
def test_65k_step_drift_is_bounded(scheme):
    program = tiny_program()
    ref = fp64_reference(program)
    sess = CastSession(fp16_compute(program) if scheme == "fp16" else int8_weights(program), torch.float32)
    rep = compare(ref, sess, long_horizon(65_536), tolerance(scheme), scheme)
    assert rep.passed, rep.failure
    assert len(rep.per_step_rel) == 65_537 and rep.max_rel > 0


def test_all_fp16_state_is_caught():
    """fp16 state, not only fp16 compute: measured state max_rel 0.033 > the fp16 profile's 0.02 after 65,536 steps
    while the logits stay within; the Core ML delegate's compute_precision=float16 does this to the state unless
    the exporter keeps the state ops fp32, so the drift check must see it."""
    program = tiny_program()
    rep = compare(fp64_reference(program), CastSession(program, torch.float16), long_horizon(65_536),
                  tolerance("fp16"), "fp16")
    assert not rep.passed
    assert rep.failure.startswith("torch-cast: state '") and "after decode step" in rep.failure, rep.failure


def test_unstable_recurrence_is_caught():
    """RetNet with log(decay) = +0.05: the state grows by 5% a step; fp16 overflows, the comparison names it."""
    program = tiny_program()
    with torch.no_grad():
        program.model.blocks[0].mixer.log_gamma.fill_(0.05)
    rep = compare(fp64_reference(program), CastSession(program, torch.float16), long_horizon(4096),
                  tolerance("fp16"), "fp16")
    assert not rep.passed
    assert "step" in rep.failure
