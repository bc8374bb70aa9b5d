"""afedge `mamba` loads a Hugging Face `MambaMixer` state_dict 1:1 and computes the same function (HF's torch path)."""
from __future__ import annotations

import pytest
import torch

from afedge.mixers import MIXERS
from afedge.parity.metrics import max_rel

hf = pytest.importorskip("transformers.models.mamba.modeling_mamba")
from transformers import MambaConfig  # noqa: E402

D, T, B = 32, 64, 2


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    cfg = MambaConfig(hidden_size=D, state_size=8, conv_kernel=3, expand=2, time_step_rank=4, num_hidden_layers=1,
                      use_conv_bias=True, use_bias=True)
    ref = hf.MambaMixer(cfg, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial values everywhere (HF initialises some of them to constants)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MIXERS.get("mamba")(D, d_state=8, d_conv=3, expand=2, dt_rank=4, conv_bias=True, bias=True).eval()
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
    want = ref(x)  # cache_params=None: HF's sequential torch scan
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
