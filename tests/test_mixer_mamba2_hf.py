"""afedge `mamba2` loads a Hugging Face `Mamba2Mixer` state_dict 1:1 and computes the same function (HF torch path)."""
from __future__ import annotations

import pytest
import torch

from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel

hf = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
from transformers import Mamba2Config  # noqa: E402

D, T, B = 32, 64, 2


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    # E = 64 = 8 heads x 8; 2 groups of 4 heads; HF's own chunk (16) differs from ours to cross chunk boundaries.
    cfg = Mamba2Config(hidden_size=D, state_size=8, conv_kernel=3, expand=2, head_dim=8, num_heads=8, n_groups=2,
                       chunk_size=16, num_hidden_layers=1, use_conv_bias=True, use_bias=True)
    ref = hf.Mamba2Mixer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF initialises some of them to constants)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MIXERS.get("mamba2")(D, d_state=8, d_conv=3, expand=2, head_dim=8, n_groups=2, conv_bias=True, bias=True,
                                norm_eps=cfg.layer_norm_epsilon).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_state_dict_names_and_shapes_match(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 16, 24])
def test_parallel_matches_hf(pair, chunk):
    ref, ours = pair
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(1))
    want = ref(x)  # cache_params=None: HF's chunked torch SSD
    got, _ = ours(x, ours.init_state(B), chunk)
    assert max_rel(got, want) <= 1e-4


@torch.no_grad()
def test_step_matches_hf(pair):
    ref, ours = pair
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(2))
    want, state, ys = ref(x), ours.init_state(B), []
    for t in range(T):
        y, state = ours.step(x[:, t], state)
        ys.append(y)
    assert max_rel(torch.stack(ys, 1), want) <= 1e-4
