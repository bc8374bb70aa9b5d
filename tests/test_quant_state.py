"""Why the recurrent state stays fp32: forcing the state itself to int8 is caught by the 4,096-step drift check.

The session under test is the torch program whose state is stored as int8 between calls (per slot, symmetric,
the scale calibrated on the program's own calibration run, as a static QDQ graph would store it). The control is
the same model with int8 weights (simulated) and an fp32 state: it passes the same check with the same (int8)
tolerance, so the check tells state quantization from weight quantization.
"""
from __future__ import annotations

import numpy as np
import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.parity.compare import compare
from afedge.parity.workloads import long_horizon
from afedge.quant import plan_quant
from afedge.quant.calibration import calibration_feeds
from afedge.quant.simulate import simulated
from afedge.runtimes.torch import TorchSession
from afedge.tolerances import tolerance

TOL = "int8"
HORIZON = long_horizon(4096)


def _program(model: LM | None = None):
    return to_recurrent(model or LM(LMConfig(d_model=32, n_layers=1, mixer="retnet")), chunk_size=8, prefill_len=16)


class Int8StateSession(TorchSession):
    """A TorchSession whose state leaves every call rounded to int8 (scale = calibrated max |slot| / 127)."""

    def __init__(self, program, threads: int = 1) -> None:
        super().__init__(program, threads)
        feeds = calibration_feeds(program)
        names = program.input_names("step")[1:]
        self.scales = {n: max(float(np.abs(f[n]).max()) for f in feeds["step"] + feeds["prefill"]) / 127 or 1.0
                       for n in names}
        self.names = names

    def _run(self, method, inputs):
        logits, *state = super()._run(method, inputs)
        return [logits, *((np.clip(np.round(s / self.scales[n]), -127, 127) * self.scales[n]).astype(np.float32)
                          for n, s in zip(self.names, state))]


def test_int8_state_is_caught_by_the_long_horizon_check_and_int8_weights_are_not():
    torch.manual_seed(0)
    program = _program()
    ref = TorchSession(program)
    rep = compare(ref, Int8StateSession(program), HORIZON, tolerance(TOL), TOL)
    assert not rep.passed, "an int8 state passed the 4,096-step drift check"
    print(f"int8 state: {rep.failure}")

    plan = plan_quant(program.model, "int8")
    weights_only = _program(simulated(program.model, plan, plan.quantized))
    control = compare(ref, TorchSession(weights_only), HORIZON, tolerance(TOL), TOL)
    assert control.passed, control.failure
    assert control.sqnr_db > rep.sqnr_db and max(control.state_rel.values()) < max(rep.state_rel.values())
