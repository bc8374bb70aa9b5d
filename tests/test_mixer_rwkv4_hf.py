"""rwkv4 loads a Hugging Face RwkvBlock's weights 1:1 and reproduces its CPU path (parallel, chunked, step, state)."""
from __future__ import annotations

import pytest
import torch

from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel
from afedge.tolerances import tolerance

rwkv = pytest.importorskip("transformers.models.rwkv.modeling_rwkv")

B, T, D, LAYER = 2, 96, 32, 1


@pytest.fixture(scope="module")
def pair():
    """(HF block, our mixer with its weights), layer 1 of 2 so the block has no pre_ln."""
    cfg = rwkv.RwkvConfig(vocab_size=64, hidden_size=D, num_hidden_layers=2, attention_hidden_size=D,
                          intermediate_size=3 * D, context_length=T)
    torch.manual_seed(0)
    block = rwkv.RwkvModel(cfg).blocks[LAYER].eval()
    with torch.no_grad():  # HF's init leaves some weights symmetric; perturb so every parameter matters
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MIXERS.get("rwkv4")(D, intermediate_size=3 * D, eps=cfg.layer_norm_epsilon).eval()
    ours.load_state_dict(block.state_dict(), strict=True)  # the same keys and shapes: ln1, attention, ln2, ffn
    return block, ours


@pytest.fixture(scope="module")
def h():
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))


def hf_run(block, h):
    """HF block with a zero cache -> (hidden out, our state layout)."""
    state = [torch.zeros(B, D, 2) for _ in range(5)]
    state[4] -= 1e38
    out, state, _ = block(h, state=state, use_cache=True)
    s = [x[:, :, LAYER] for x in state]
    return out, (s[1], s[2], s[3], s[4], s[0])  # att shift, num, den, max, ffn shift


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 16])
def test_parallel_matches_hf(pair, h, chunk):
    block, ours = pair
    want, want_state = hf_run(block, h)
    y, state = ours(h, ours.init_state(B), chunk)
    assert max_rel(h + y, want) <= tolerance("fp32").max_rel
    for a, b in zip(state, want_state):
        assert max_rel(a, b) <= tolerance("fp32").state_rel


@torch.no_grad()
def test_step_matches_hf(pair, h):
    block, ours = pair
    want, want_state = hf_run(block, h)
    state, ys = ours.init_state(B), []
    for t in range(T):
        y, state = ours.step(h[:, t], state)
        ys.append(y)
    assert max_rel(h + torch.stack(ys, 1), want) <= tolerance("fp32").max_rel
    for a, b in zip(state, want_state):
        assert max_rel(a, b) <= tolerance("fp32").state_rel
