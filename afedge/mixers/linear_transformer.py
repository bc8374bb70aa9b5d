"""Linear Transformer (Katharopoulos et al. 2020): causal kernel attention with phi(x) = elu(x) + 1.

S_t = S_{t-1} + phi(k_t)^T v_t,  z_t = z_{t-1} + phi(k_t),  o_t = phi(q_t) S_t / (phi(q_t) . z_t + eps),  out = W_o o.

The `linear_attn_*` kernels take already feature-mapped q, k (any positive feature map), so Performer reuses them.
Inside them the normaliser rides along as an extra all-ones value column: [S | z] = sum phi(k)^T [v | 1], so one
matmul gives numerator and denominator and no reduction op enters the exported graphs.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import heads, merge_heads, tril_ones
from afedge.state import StateSlot

EPS = 1e-6  # added to the denominator in every form (Katharopoulos et al.)


def elu_plus_one(x: Tensor) -> Tensor:
    """elu(x) + 1 > 0 from delegable ops: x + 1 for x > 0, e^x otherwise."""
    return torch.relu(x) + torch.exp(-torch.relu(-x))


def _with_ones(v: Tensor) -> Tensor:
    """(..., Dv) -> (..., Dv + 1): the last column carries the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)


def _split(o: Tensor, dv: int, eps: float) -> Tensor:
    """(..., Dv + 1) numerator | denominator -> normalised (..., Dv)."""
    return o[..., :dv] / (o[..., dv:] + eps)


def linear_attn_parallel(q: Tensor, k: Tensor, v: Tensor, s: Tensor, z: Tensor,
                         chunk_size: int | None = None, eps: float = EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Chunkwise form. q, k: (B, H, T, F) features, v: (B, H, T, Dv), s: (B, H, F, Dv), z: (B, H, F)."""
    dv, v1 = v.shape[-1], _with_ones(v)
    sz = torch.cat([s, z[..., None]], -1)  # (B, H, F, Dv + 1)
    outs = []
    for a, b in chunks(q.shape[2], chunk_size):
        qc, kc, vc = q[:, :, a:b], k[:, :, a:b], v1[:, :, a:b]
        att = (qc @ kc.transpose(-1, -2)) * tril_ones(b - a, q)  # (B, H, C, C)
        outs.append(qc @ sz + att @ vc)  # (B, H, C, Dv + 1)
        sz = sz + kc.transpose(-1, -2) @ vc
    return _split(torch.cat(outs, 2), dv, eps), sz[..., :dv], sz[..., dv:].flatten(-2)


def linear_attn_step(q: Tensor, k: Tensor, v: Tensor, s: Tensor, z: Tensor,
                     eps: float = EPS) -> tuple[Tensor, Tensor, Tensor]:
    """One token. q, k: (B, H, F), v: (B, H, Dv) -> o: (B, H, Dv), s, z."""
    dv = v.shape[-1]
    sz = torch.cat([s, z[..., None]], -1) + k[..., :, None] * _with_ones(v)[..., None, :]  # (B, H, F, Dv + 1)
    o = (q[..., None, :] @ sz).flatten(-2)  # (B, H, Dv + 1)
    return _split(o, dv, eps), sz[..., :dv], sz[..., dv:].flatten(-2)


def linear_attn_naive(q: Tensor, k: Tensor, v: Tensor, eps: float = EPS) -> Tensor:
    """y_t = sum_{s<=t} (q_t . k_s) v_s / (sum_{s<=t} q_t . k_s + eps), the explicit masked quadratic form."""
    att = (q @ k.transpose(-1, -2)).tril()  # (B, H, T, T)
    return (att @ v) / (att.sum(-1, keepdim=True) + eps)


@MIXERS.register("linear_transformer")
class LinearTransformer(Mixer):
    family = "linear_transformer"

    def __init__(self, d_model: int, n_heads: int = 2, head_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        inner = n_heads * self.head_dim
        self.q_proj, self.k_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(d_model, inner, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(inner, d_model, bias=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        h, d = self.n_heads, self.head_dim
        return [StateSlot("kv", (batch, h, d, d)), StateSlot("z", (batch, h, d))]

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> phi(q), phi(k), v: (B, H, T, Dh)."""
        q, k = elu_plus_one(self.q_proj(x)), elu_plus_one(self.k_proj(x))
        return heads(q, self.n_heads), heads(k, self.n_heads), heads(self.v_proj(x), self.n_heads)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        o, s, z = linear_attn_parallel(*self._qkv(x), *state, chunk_size)
        return self.o_proj(merge_heads(o)), (s, z)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = (t[:, :, 0] for t in self._qkv(x[:, None]))  # (B, H, Dh)
        o, s, z = linear_attn_step(q, k, v, *state)
        return self.o_proj(merge_heads(o[:, :, None]))[:, 0], (s, z)

    def naive(self, x: Tensor) -> Tensor:
        return self.o_proj(merge_heads(linear_attn_naive(*self._qkv(x))))
