"""TVM exporter + runtime parity against the torch reference, for every registered mixer.

Each case compiles a tiny LM (d_model=32, 2 layers) with the shipping pipeline ("cpu-fast"), runs a 40-token
prompt (two prefill blocks of 16 + 8 steps) then 32 greedy steps, and compares logits and every state slot.
Compilation costs tens of seconds per mixer on 2 cores, so the default run covers a representative subset
(FAST); the rest of the zoo runs under `-m slow` (`make test-slow`).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from afedge.exporters.tvm import TvmExporter  # noqa: E402
from afedge.mixers import MIXERS  # noqa: E402
from afedge.model import LM, LMConfig  # noqa: E402
from afedge.parity.metrics import max_rel  # noqa: E402
from afedge.rewrite import to_recurrent  # noqa: E402
from afedge.runtimes.torch import TorchSession  # noqa: E402
from afedge.runtimes.tvm import TvmSession  # noqa: E402
from afedge.session import ProgramInfo, RuntimeUnavailable  # noqa: E402
from afedge.target import host_arch, load_target  # noqa: E402
from afedge.tolerances import tolerance  # noqa: E402
from tests.parity.flows import REPRESENTATIVE  # noqa: E402

# The representative mixers run by default; the whole zoo's TVM numbers are in tests/parity's host matrix.
FAST = set(REPRESENTATIVE)
# Mixers whose TVM export is a known failure caused in the mixer file: name -> precise reason.
XFAIL: dict[str, str] = {}

TOL = tolerance("fp32")
PROMPT_LEN, DECODE = 40, 32


def _program(name: str):
    return to_recurrent(LM(LMConfig(d_model=32, n_layers=2, mixer=name)), chunk_size=8, prefill_len=16)


def _session(program, artifact, out_dir) -> TvmSession:
    return TvmSession({m: out_dir / f for m, f in artifact.files.items()}, ProgramInfo.of(program), 1,
                      artifact.arch)


def _check_parity(program, sess: TvmSession) -> None:
    ref = TorchSession(program, 1)
    prompt = np.random.default_rng(0).integers(0, program.vocab_size, (1, PROMPT_LEN))
    lt, st = sess.prefill(prompt, sess.init_state())
    lr, sr = ref.prefill(prompt, ref.init_state())
    names = program.spec.names
    for i in range(DECODE + 1):
        where = "prefill" if i == 0 else f"step {i}"
        assert max_rel(lt, lr) <= TOL.max_rel, f"{where}: logits max_rel {max_rel(lt, lr):.2e}"
        for n, a, b in zip(names, st, sr):
            assert max_rel(a, b) <= TOL.state_rel, f"{where}: state {n} max_rel {max_rel(a, b):.2e}"
        tok_t, tok_r = lt.argmax(-1), lr.argmax(-1)
        np.testing.assert_array_equal(tok_t, tok_r, err_msg=f"{where}: greedy tokens differ")
        if i < DECODE:
            lt, st = sess.step(tok_t, st)
            lr, sr = ref.step(tok_r, sr)


def _case(name: str):
    marks = [] if name in FAST else [pytest.mark.slow]
    if name in XFAIL:
        marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[name]))
    return pytest.param(name, marks=marks, id=f"{name}-tvm-host")


@pytest.mark.parametrize("mixer", [_case(n) for n in MIXERS.names()])
def test_tvm_host_parity(mixer, tmp_path):
    program = _program(mixer)
    (art,) = TvmExporter().export(program, load_target("host"), "fp32", tmp_path)
    assert art.name == "tvm-host" and art.arch == "x86_64" and art.files == {"step": "model-x86_64.so",
                                                                            "prefill": "model-x86_64.so"}
    assert art.info["pipeline"] == "cpu-fast" and art.info["target"] == load_target("host").tvm["target"]
    assert art.info["cpu_features"] == ["avx2", "fma"]
    sess = _session(program, art, tmp_path)
    try:
        _check_parity(program, sess)
    finally:
        sess.close()


EM_AARCH64 = 183


@pytest.mark.skipif(host_arch() != "x86_64", reason="checks the cross build from an x86_64 machine")
def test_tvm_android_cross_build_and_host_twin(tmp_path):
    program = _program("retnet")
    arts = {a.name: a for a in TvmExporter().export(program, load_target("android-arm64"), "fp32", tmp_path)}
    assert set(arts) == {"tvm-aarch64", "tvm-host"}
    dev, twin = arts["tvm-aarch64"], arts["tvm-host"]
    assert dev.arch == "aarch64" and dev.files["step"] == "model-aarch64.so" and dev.info["cc"] == "aarch64-linux-gnu-gcc"
    assert twin.arch == "x86_64" and twin.info["host_twin_of"] == "tvm-aarch64"

    head = (tmp_path / dev.files["step"]).read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2, "expected a 64-bit ELF"
    assert int.from_bytes(head[18:20], "little") == EM_AARCH64, "e_machine is not EM_AARCH64"

    with pytest.raises(RuntimeUnavailable, match="aarch64"):
        _session(program, dev, tmp_path)
    sess = _session(program, twin, tmp_path)
    try:
        _check_parity(program, sess)
    finally:
        sess.close()


def test_tvm_session_shares_aligned_inputs_and_never_alters_a_returned_state(tmp_path):
    """States go in and out of the VM without copies (DLPack views), yet a state the session returned is never
    written by a later call that took it as input, and unaligned inputs are copied rather than refused."""
    program = _program("retnet")
    (art,) = TvmExporter().export(program, load_target("host"), "fp32", tmp_path)
    sess = _session(program, art, tmp_path)
    try:
        _, state = sess.prefill(np.arange(20)[None] % 256, sess.init_state())
        aligned = next(s for s in state if s.ctypes.data % 64 == 0)
        assert np.shares_memory(np.from_dlpack(sess._tensor(aligned)), aligned)  # shared, not copied
        kept, returned = [s.copy() for s in state], state
        for t in range(4):
            _, state = sess.step(np.array([t]), state)
        for a, b in zip(kept, returned):
            np.testing.assert_array_equal(a, b)
        ref, _ = sess.step(np.array([1]), returned)
        odd = [_unaligned(s) for s in returned]
        frozen = [s.copy() for s in returned]
        for s in frozen:
            s.setflags(write=False)  # read-only: numpy cannot lend it to DLPack
        for other in (odd, frozen):
            logits, _ = sess.step(np.array([1]), other)
            np.testing.assert_array_equal(logits, ref)
    finally:
        sess.close()


def _unaligned(a: np.ndarray) -> np.ndarray:
    """A copy of `a` 4 bytes past an allocation: not 64-byte aligned."""
    out = np.empty(a.size + 1, a.dtype)[1:]
    out[:] = a.ravel()
    assert out.ctypes.data % 64
    return out.reshape(a.shape)
