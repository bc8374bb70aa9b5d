"""Performer: FAVOR+ approximates exact causal softmax attention, better with more features; figures are finite."""
from __future__ import annotations

import math

import pytest
import torch

from afedge.mixers import MIXERS
from afedge.mixers.performer import performer_softmax_error

SEEDS = (0, 1, 2)


def mean_error(n_features: int) -> dict[str, float]:
    """Mean FAVOR+ vs softmax error over a few feature draws, on fixed q, k, v (logits of std ~0.5)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 256, 16, generator=g) for _ in range(3))
    errs = [performer_softmax_error(q * 0.5, k * 0.5, v, n_features, seed=s) for s in SEEDS]
    return {key: sum(e[key] for e in errs) / len(errs) for key in ("max_abs", "rel_fro")}


def test_error_shrinks_with_more_features():
    few, many = mean_error(16), mean_error(256)
    print(f"\nFAVOR+ vs exact causal softmax (T=256, D=16, mean of {len(SEEDS)} draws): "
          f"16 features max_abs {few['max_abs']:.3f} rel_fro {few['rel_fro']:.3f}; "
          f"256 features max_abs {many['max_abs']:.3f} rel_fro {many['rel_fro']:.3f}")
    assert all(math.isfinite(x) for x in (*few.values(), *many.values()))
    assert many["rel_fro"] < 0.6 * few["rel_fro"]
    assert many["max_abs"] < few["max_abs"]


def test_estimator_converges():
    """Sanity: the estimator converges (rel error well under the 16-feature figure at 4096 features)."""
    assert mean_error(4096)["rel_fro"] < 0.25 * mean_error(16)["rel_fro"]


@pytest.mark.parametrize("n_features", [16, 64])
def test_report_is_finite(n_features):
    torch.manual_seed(0)
    rep = MIXERS.get("performer")(32, n_features=n_features).report()
    print(f"\nperformer report ({n_features} features): {rep}")
    assert rep["n_features"] == n_features
    assert all(math.isfinite(rep[k]) and rep[k] >= 0 for k in ("softmax_max_abs", "softmax_rel_fro"))


def test_projection_is_a_fixed_seeded_buffer():
    a, b = MIXERS.get("performer")(32), MIXERS.get("performer")(32)
    assert "proj" in dict(a.named_buffers()) and torch.equal(a.proj, b.proj)
    assert not torch.equal(a.proj, MIXERS.get("performer")(32, seed=1).proj)
    assert "proj" in a.fp32_params


def test_long_run_state_stays_finite():
    """Keys are bounded by a constant fixed by proj, so z grows at most linearly; no overflow on large inputs."""
    torch.manual_seed(0)
    m = MIXERS.get("performer")(32).eval()
    with torch.no_grad():
        y, (s, z) = m(torch.randn(1, 4096, 32) * 10, m.init_state(1), 512)
    assert torch.isfinite(y).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
