"""Every registered mixer: recurrent step == parallel == chunked == fp64 naive reference; export; constant state."""
from __future__ import annotations

import copy

import pytest
import torch

from afedge import LM, LMConfig, to_recurrent
from afedge.mixers import MIXERS, Mixer
from afedge.parity.metrics import max_rel
from afedge.tolerances import tolerance

T, B, D = 2048, 2, 32
NAMES = MIXERS.names()


def make(name: str) -> Mixer:
    torch.manual_seed(0)
    return MIXERS.get(name)(D).eval()


def bound(m: Mixer) -> float:
    return tolerance("fp32" if m.exact else "approx").max_rel


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=NAMES)
def case(request, x):
    """(mixer, fp64 naive reference output) per registered mixer."""
    m = make(request.param)
    with torch.no_grad():
        ref = copy.deepcopy(m).double().naive(x.double())
    return m, ref


def run_steps(m: Mixer, x: torch.Tensor, state):
    ys = []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@torch.no_grad()
def test_step_matches_naive(case, x):
    m, ref = case
    y, _ = run_steps(m, x, m.init_state(B))
    assert max_rel(y, ref) <= bound(m), m.family


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 64])
def test_parallel_matches_naive(case, x, chunk):
    m, ref = case
    y, _ = m(x, m.init_state(B), chunk)
    assert max_rel(y, ref) <= tolerance("fp32").max_rel, (m.family, chunk)


@torch.no_grad()
def test_chunked_prefill_then_steps(case, x):
    m, ref = case
    split = 1000  # not a multiple of the chunk: the last chunk is short
    y1, state = m(x[:, :split], m.init_state(B), 64)
    y2, _ = run_steps(m, x[:, split:split + 200], state)
    assert max_rel(torch.cat([y1, y2], 1), ref[:, :split + 200]) <= bound(m), m.family


@torch.no_grad()
def test_states_agree_between_forms(case, x):
    m, _ = case
    _, s_par = m(x[:, :256], m.init_state(B), 32)
    _, s_rec = run_steps(m, x[:, :256], m.init_state(B))
    for a, b in zip(s_par, s_rec):
        assert max_rel(a, b) <= tolerance("fp32").state_rel, m.family


@torch.no_grad()
def test_reset_is_identical(case, x):
    m, _ = case
    first = m(x[:, :64], m.init_state(B), 16)[0]
    m(x[:, 64:128], m.init_state(B), 16)  # another sequence in between
    assert torch.equal(first, m(x[:, :64], m.init_state(B), 16)[0])


def test_state_is_never_mutated(case, x):
    m, _ = case
    state = m.init_state(B)
    before = [s.clone() for s in state]
    with torch.no_grad():
        m(x[:, :32], state, 16)
        m.step(x[:, 0], state)
    assert all(torch.equal(a, b) for a, b in zip(before, state))


@pytest.mark.parametrize("name", NAMES)
def test_program_exports_strict(name):
    prog = to_recurrent(LM(LMConfig(d_model=D, n_layers=1, mixer=name)), chunk_size=8, prefill_len=16)
    for method in ("step", "prefill"):
        ep = prog.export(method, strict=True)
        args = prog.example_inputs(method)
        want = prog.graph(method)(*args)
        got = ep.module()(*args)
        assert len(got) == len(want) == 1 + len(prog.spec.slots)
        assert all(torch.allclose(a, b) for a, b in zip(got, want)), (name, method)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_constant_size(name):
    prog = to_recurrent(LM(LMConfig(d_model=D, n_layers=2, mixer=name)), chunk_size=64, prefill_len=64)
    sizes = []
    for t in (128, 4_096):  # a million tokens: tests/reliability/test_long_prompt.py
        tokens = torch.randint(0, prog.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
        _, state = prog.prefill(tokens, prog.init_state())
        prog.spec.check(state)
        sizes.append(prog.spec.nbytes_of(state))
    assert sizes[0] == sizes[1] == prog.spec.nbytes
