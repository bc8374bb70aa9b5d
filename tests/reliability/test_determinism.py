"""Case 23: parity is not flaky. On the CPU, running the same session twice gives bit-identical logits and state;
changing the thread count moves results by no more than the fp32 tolerance."""
from __future__ import annotations

import numpy as np
import pytest

from afedge.bundle import load_bundle
from afedge.parity.metrics import max_rel
from afedge.pipeline import open_session, reference_program
from afedge.runtimes.torch import TorchSession
from afedge.tolerances import tolerance

PROMPT = np.random.default_rng(23).integers(0, 256, (1, 40), dtype=np.int64)  # 2 prefill blocks + 8 steps
STEPS = 24


def trace(sess) -> list[np.ndarray]:
    """Logits after the prompt and after each greedy step, then the final state."""
    logits, state = sess.prefill(PROMPT, sess.init_state())
    out = [logits]
    for _ in range(STEPS):
        logits, state = sess.step(logits.argmax(-1).astype(np.int64), state)
        out.append(logits)
    return out + list(state)


def open_with(bundle_dir, runtime: str, threads: int):
    b = load_bundle(bundle_dir)
    if runtime == "torch":
        return TorchSession(reference_program(b), threads)
    return open_session(b, b.artifact(runtime), threads)


@pytest.mark.parametrize("runtime", ["torch", "onnx", "executorch", "tvm"])
def test_repeated_runs_are_bit_identical_and_threads_stay_within_tolerance(bundle_dir, runtime):
    one = open_with(bundle_dir, runtime, 1)
    first, again = trace(one), trace(one)
    fresh = trace(open_with(bundle_dir, runtime, 1))
    for a, b, c in zip(first, again, fresh):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    two = trace(open_with(bundle_dir, runtime, 2))
    worst = max(max_rel(b, a) for a, b in zip(first, two))
    assert worst <= tolerance("fp32").max_rel, f"{runtime}: 1 vs 2 threads differ by max_rel {worst:.2e}"
