"""Gated Linear Attention (Yang et al. 2024): data-dependent per-key-dim decay, after FLA's GatedLinearAttention.

alpha_t = sigmoid(W_2 W_1 x_t)^(1/16),   S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t,
out = W_o(RMSNorm_head(o) * swish(W_g x)).   The decay lives in log space: log alpha = logsigmoid(.) / 16 <= 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers._gated import gated_naive, gated_parallel, gated_step, log_sigmoid, rms_norm
from afedge.mixers.base import MIXERS, Mixer, State
from afedge.mixers.ops import heads, merge_heads
from afedge.state import StateSlot


def gla_parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor,
                 chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """q, k, g: (B, H, T, Dk), v: (B, H, T, Dv), s: (B, H, Dk, Dv) -> o: (B, H, T, Dv), s."""
    return gated_parallel(q, k, v, g, s, chunk_size)


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """q, k, g: (B, H, Dk), v: (B, H, Dv) -> o: (B, H, Dv), s."""
    return gated_step(q, k, v, g, s)


def gla_naive(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    return gated_naive(q, k, v, g)


@MIXERS.register("gla")
class GLA(Mixer):
    family = "gla"
    fp32_params = ("gk_proj", "g_norm")

    def __init__(self, d_model: int, n_heads: int = 2, expand_k: float = 0.5, expand_v: float = 1.0,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.n_heads, self.key_dim, self.value_dim = n_heads, int(d_model * expand_k), int(d_model * expand_v)
        self.head_k, self.head_v = self.key_dim // n_heads, self.value_dim // n_heads
        self.gate_logit_normalizer, self.norm_eps = gate_logit_normalizer, norm_eps
        self.q_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d_model, self.value_dim, bias=False)  # output gate
        self.gk_proj = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.key_dim, bias=True))  # decay, kept fp32
        self.g_norm = nn.Parameter(torch.ones(self.head_v))
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("kv", (batch, self.n_heads, self.head_k, self.head_v))]

    def _qkvg(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k, g: (B, H, T, Dk), v: (B, H, T, Dv); q pre-scaled by Dk^-1/2, g <= 0."""
        h = self.n_heads
        q = self.q_proj(x) * (1.0 / math.sqrt(self.head_k))
        g = log_sigmoid(self.gk_proj(x)) * (1.0 / self.gate_logit_normalizer)
        return heads(q, h), heads(self.k_proj(x), h), heads(self.v_proj(x), h), heads(g, h)

    def _out(self, x: Tensor, o: Tensor) -> Tensor:
        """x: (B, T, D), o: (B, H, T, Dv) -> (B, T, D)."""
        o = merge_heads(rms_norm(o, self.g_norm, self.norm_eps))
        return self.o_proj(o * F.silu(self.g_proj(x)))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        q, k, v, g = self._qkvg(x)
        o, s = gla_parallel(q, k, v, g, state[0], chunk_size)
        return self._out(x, o), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, g = (t[:, :, 0] for t in self._qkvg(x[:, None]))
        o, s = gla_step(q, k, v, g, state[0])
        return self._out(x[:, None], o[:, :, None])[:, 0], (s,)

    def naive(self, x: Tensor) -> Tensor:
        return self._out(x, gla_naive(*self._qkvg(x)))
