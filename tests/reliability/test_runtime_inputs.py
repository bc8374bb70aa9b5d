"""Case 19: wrong inputs to a session (empty prompt, token id outside the vocabulary, wrong dtype or shape, wrong
state) are refused against the bundle's contract before any native call, on every runtime."""
from __future__ import annotations

import numpy as np
import pytest

from afedge.bundle import load_bundle
from afedge.pipeline import open_session, reference_program
from afedge.runtimes.torch import TorchSession
from tests.reliability.conftest import assert_one_line_error, cli

RUNTIMES = ["torch", "onnx", "executorch", "tvm"]


@pytest.fixture(scope="module", params=RUNTIMES)
def session(request, bundle_dir):
    b = load_bundle(bundle_dir)
    sess = (TorchSession(reference_program(b)) if request.param == "torch"
            else open_session(b, b.artifact(request.param)))
    yield sess
    sess.close()


@pytest.fixture
def guarded(session, monkeypatch):
    """The session with its native call replaced by a failure: nothing may reach it."""
    def native(method, inputs):
        raise AssertionError(f"{session.runtime}: the native '{method}' call was reached with bad inputs")
    monkeypatch.setattr(session, "_run", native)
    return session


V = 256  # the fixture's vocabulary
BAD_PROMPTS = {
    "empty": (np.zeros((1, 0), np.int64), r"tokens must have shape \(batch, T>=1\) with batch=1, got \(1, 0\)"),
    "id = vocab": (np.array([[1, V]]), rf"token id {V} is outside the vocabulary \[0, {V}\)"),
    "negative id": (np.array([[-3, 1]]), rf"token id -3 is outside the vocabulary \[0, {V}\)"),
    "float": (np.array([[1.0, 2.0]]), "tokens must be integers, got float64"),
    "bool": (np.array([[True]]), "tokens must be integers, got bool"),
    "batch 2": (np.zeros((2, 3), np.int64), r"tokens must have shape \(batch, T>=1\) with batch=1, got \(2, 3\)"),
    "3-d": (np.zeros((1, 2, 3), np.int64), r"tokens must have shape \(batch, T>=1\) with batch=1, got \(1, 2, 3\)"),
    "huge uint": (np.array([[2 ** 63]], np.uint64), rf"token id {2 ** 63} is outside the vocabulary"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_is_refused_before_the_native_call(guarded, case):
    tokens, message = BAD_PROMPTS[case]
    with pytest.raises(ValueError, match=f"^{guarded.runtime}: {message}"):
        guarded.prefill(tokens, guarded.init_state())


@pytest.mark.parametrize("token, message", [
    (np.array([[1]]), r"tokens must have shape \(batch,\) with batch=1, got \(1, 1\)"),
    (np.array([V + 5]), f"token id {V + 5} is outside"),
    (np.array([0.5]), "tokens must be integers"),
])
def test_bad_step_token_is_refused(guarded, token, message):
    with pytest.raises(ValueError, match=message):
        guarded.step(token, guarded.init_state())


def _bad_states(state: list[np.ndarray]) -> dict:
    slot = state[0]
    return {
        "shape": ([slot[..., :-1], *state[1:]],
                  r"slot 'layers.0.kv' must be float32\[1, 2, 8, 8\], got float32\[1, 2, 8, 7\]"),
        "dtype": ([slot.astype(np.float64), *state[1:]],
                  r"slot 'layers.0.kv' must be float32\[1, 2, 8, 8\], got float64"),
        "count": (state[1:], rf"expected {len(state)} state tensors, got {len(state) - 1}"),
        "extra": ([*state, slot], rf"expected {len(state)} state tensors, got {len(state) + 1}"),
        "not an array": ([slot.tolist(), *state[1:]], "slot 'layers.0.kv' must be float32"),
    }


@pytest.mark.parametrize("case", ["shape", "dtype", "count", "extra", "not an array"])
@pytest.mark.parametrize("method", ["step", "prefill"])
def test_bad_state_is_refused_naming_the_slot(guarded, method, case):
    state, message = _bad_states(guarded.init_state())[case]
    tokens = np.array([1]) if method == "step" else np.ones((1, 16), np.int64)
    with pytest.raises(ValueError, match=message):
        getattr(guarded, method)(tokens, state)


def test_good_inputs_reach_the_runtime(session):
    logits, state = session.prefill(np.arange(20)[None] % V, session.init_state())
    assert logits.shape == (1, V) and np.isfinite(logits).all()


def test_cli_refuses_an_empty_prompt_and_an_out_of_vocab_token(bundle_dir, capsys):
    rc, _, err = cli(capsys, "run", bundle_dir, "--prompt", "")
    assert_one_line_error(rc, err, "the prompt is empty")
    rc, _, err = cli(capsys, "run", bundle_dir, "--runtime", "onnx", "--tokens", f"1,{V + 1}")
    assert_one_line_error(rc, err, f"token id {V + 1} is outside the vocabulary [0, {V})")
