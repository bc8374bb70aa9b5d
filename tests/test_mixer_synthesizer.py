"""Synthesizer: the windowed model is exact; a truncated ring buffer is marked approximate and reports the softmax
mass it drops, which matches a direct per-token computation."""
from __future__ import annotations

import pytest
import torch

from afedge.mixers import MIXERS

NAMES = ["synthesizer_dense", "synthesizer_random"]
T, L, W = 40, 16, 6


def make(name: str, **kw):
    torch.manual_seed(0)
    return MIXERS.get(name)(32, max_len=L, **kw).eval()


@torch.no_grad()
def direct_dropped_mass(m, x: torch.Tensor) -> torch.Tensor:
    """Per token: softmax over the lags it can see (0..min(t, L-1)), mass at lags >= W. -> (B, H, T)."""
    s = m._scores(x)  # (B, H, T, L), slot j = lag L-1-j
    out = torch.zeros(s.shape[:3])
    for t in range(x.shape[1]):
        lags = torch.arange(min(t + 1, L))
        p = torch.softmax(s[:, :, t, L - 1 - lags], -1)  # (B, H, n_lags)
        out[:, :, t] = p[..., lags >= W].sum(-1)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_exact_by_default(name):
    m = make(name)
    assert m.exact and all(s.exact for s in m.state_slots(1))
    rep = m.report()
    assert rep["dropped_mass_mean"] == rep["dropped_mass_max"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_truncated_window_reports_dropped_mass(name):
    m = make(name, window=W)
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(3))
    assert not m.exact
    assert all(not s.exact and s.note for s in m.state_slots(1))
    rep, want = m.report(x), direct_dropped_mass(m, x)
    print(f"\n{name} max_len {L} window {W}: dropped mass mean {rep['dropped_mass_mean']:.4f} "
          f"max {rep['dropped_mass_max']:.4f}; default report {m.report()}")
    assert 0 < rep["dropped_mass_mean"] <= rep["dropped_mass_max"] < 1
    assert rep["dropped_mass_mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert rep["dropped_mass_max"] == pytest.approx(float(want.max()), rel=1e-5)
    assert m.report()["dropped_mass_mean"] > 0  # also on the default seeded input


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_truncated_step_is_the_window_model(name):
    """The truncated recurrence equals attention renormalised over the last W lags; the parallel form stays exact."""
    m = make(name, window=W)
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(4))
    state, ys = m.init_state(1), []
    for t in range(T):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    s, v = m._scores(x), m.v_proj(x).view(1, T, m.n_heads, -1)  # (1, H, T, L), (1, T, H, Dh)
    for t in (0, W - 1, T - 1):
        lags = torch.arange(min(t + 1, W))
        p = torch.softmax(s[0, :, t, L - 1 - lags], -1)  # (H, n)
        o = torch.einsum("hn,nhd->hd", p, v[0, t - lags])
        assert torch.allclose(ys[t][0], m.o_proj(o.reshape(-1)), atol=1e-6)
    assert torch.allclose(m(x, m.init_state(1))[0], m.naive(x), atol=1e-6)
    assert not torch.allclose(torch.stack(ys, 1), m.naive(x), atol=1e-3)


def test_window_beyond_max_len_is_refused():
    with pytest.raises(ValueError, match="window"):
        MIXERS.get("synthesizer_dense")(32, max_len=8, window=9)
