"""HGRN2 (Qin et al. 2024): gated linear RNN with outer-product state expansion, after FLA's HGRN2Attention.

f_t = lb + (1 - lb) sigmoid(W_f x_t) in (lb, 1),  S_t = diag(f_t) S_{t-1} + (1 - f_t)^T v_t,  o_t = swish(W_q x_t) S_t,
out = W_o(RMSNorm(o)).   The input gate is tied to the forget gate (k = 1 - f); the forget gate is carried as
log f <= 0. The lower bound `lb` is a per-layer constant (0 for the first layer in FLA's stacks).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers._gated import gated_naive, gated_parallel, gated_step, log_sigmoid, rms_norm
from afedge.mixers.base import MIXERS, Mixer, State
from afedge.mixers.ops import heads, merge_heads
from afedge.state import StateSlot


def hgrn2_parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """q, k = 1 - f, g = log f: (B, H, T, Df), v: (B, H, T, Di), s: (B, H, Df, Di) -> o: (B, H, T, Di), s."""
    return gated_parallel(q, k, v, g, s, chunk_size)


def hgrn2_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """q, k, g: (B, H, Df), v: (B, H, Di) -> o: (B, H, Di), s."""
    return gated_step(q, k, v, g, s)


def hgrn2_naive(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    return gated_naive(q, k, v, g)


@MIXERS.register("hgrn2")
class HGRN2(Mixer):
    family = "hgrn2"
    fp32_params = ("f_proj", "g_norm")

    def __init__(self, d_model: int, n_heads: int = 2, expand_ratio: int | None = None, lower_bound: float = 0.0,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"hgrn2: lower_bound must be in [0, 1), got {lower_bound}")
        self.n_heads, self.lower_bound, self.norm_eps = n_heads, float(lower_bound), norm_eps
        self.head_f = expand_ratio or d_model // n_heads  # state expansion per head
        self.head_i = d_model // n_heads
        forget_dim = n_heads * self.head_f
        self.q_proj = nn.Linear(d_model, forget_dim, bias=False)
        self.f_proj = nn.Linear(d_model, forget_dim, bias=False)  # forget gate, kept fp32
        self.i_proj = nn.Linear(d_model, d_model, bias=False)
        self.g_norm = nn.Parameter(torch.ones(d_model))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("kv", (batch, self.n_heads, self.head_f, self.head_i))]

    def _qkvg(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k, g: (B, H, T, Df), v: (B, H, T, Di); g = log f <= 0, k = 1 - f."""
        h, lb, f = self.n_heads, self.lower_bound, self.f_proj(x)
        if lb == 0.0:  # static config: log sigmoid directly, no log(0) risk
            g, k = log_sigmoid(f), torch.sigmoid(-f)
        else:  # the argument of log stays >= lb > 0
            g, k = torch.log(lb + (1.0 - lb) * torch.sigmoid(f)), (1.0 - lb) * torch.sigmoid(-f)
        return heads(F.silu(self.q_proj(x)), h), heads(k, h), heads(self.i_proj(x), h), heads(g, h)

    def _out(self, o: Tensor) -> Tensor:
        """o: (B, H, T, Di) -> (B, T, D)."""
        return self.o_proj(rms_norm(merge_heads(o), self.g_norm, self.norm_eps))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        q, k, v, g = self._qkvg(x)
        o, s = hgrn2_parallel(q, k, v, g, state[0], chunk_size)
        return self._out(o), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, g = (t[:, :, 0] for t in self._qkvg(x[:, None]))
        o, s = hgrn2_step(q, k, v, g, state[0])
        return self._out(o[:, :, None])[:, 0], (s,)

    def naive(self, x: Tensor) -> Tensor:
        return self._out(hgrn2_naive(*self._qkvg(x)))
