"""Gated DeltaNet (Yang et al. 2025): the gated delta rule, after FLA's GatedDeltaNet (short conv left out).

S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = q_t S_t,   S: (Dk, Dv), rows indexed by keys,
q, k L2-normalised (q also scaled by Dk^-1/2), beta = sigmoid(W_b x), log alpha = -exp(A_log) softplus(W_a x + dt_bias)
<= 0 (Mamba2-style), out = W_o(RMSNorm_head(o) * swish(W_g x)).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers._gated import causal_decay, l2_norm, rms_norm, softplus, spans, unit_lower_inverse
from afedge.mixers.base import MIXERS, Mixer, State
from afedge.mixers.ops import heads, merge_heads, tril_ones
from afedge.state import StateSlot


def gated_deltanet_parallel(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, s: Tensor,
                            chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise WY/UT form. q, k: (B, H, T, Dk), v: (B, H, T, Dv), beta, g: (B, H, T), s: (B, H, Dk, Dv).

    Within a chunk (b = inclusive cumsum of g, D_ij = e^{b_i - b_j} for j <= i), the per-token new values
    u_i = beta_i (v_i - e^{b_i} k_i S - sum_{j<i} D_ij (k_i . k_j) u_j) solve (I + A) U = beta V - (beta e^b K) S
    with A = strictly-lower(beta K K^T * D); then o = (Q K^T * D) U + (Q e^b) S, S' = e^{b_C} S + (K e^{b_C - b})^T U.
    """
    outs = []
    for a, e in spans(q.shape[2], chunk_size):
        qc, kc, vc, bc, gc = q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], beta[:, :, a:e, None], g[:, :, a:e, None]
        c = e - a
        b = tril_ones(c, gc) @ gc  # (B, H, C, 1) inclusive cumsum, as a matmul
        decay = causal_decay(b)[..., 0]  # (B, H, C, C)
        kb = kc * bc
        t = unit_lower_inverse((kb @ kc.transpose(-1, -2)) * decay * tril_ones(c, gc, -1))  # (B, H, C, C)
        u = t @ (vc * bc) - (t @ (kb * torch.exp(b))) @ s  # (B, H, C, Dv)
        outs.append(((qc @ kc.transpose(-1, -2)) * decay) @ u + (qc * torch.exp(b)) @ s)
        b_end = b[:, :, c - 1:c]  # (B, H, 1, 1)
        s = torch.exp(b_end) * s + (kc * torch.exp(b_end - b)).transpose(-1, -2) @ u
    return torch.cat(outs, dim=2), s


def gated_deltanet_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One token. q, k: (B, H, Dk), v: (B, H, Dv), beta, g: (B, H) -> o: (B, H, Dv), s."""
    s = torch.exp(g)[..., None, None] * s
    u = beta[..., None] * (v - (k[..., None, :] @ s)[..., 0, :])  # (B, H, Dv)
    s = s + k[..., :, None] * u[..., None, :]
    return (q[..., None, :] @ s)[..., 0, :], s


def gated_deltanet_naive(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    """The recurrence S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T from zero, literally."""
    b, h, t_len, dk = k.shape
    eye = torch.eye(dk, dtype=k.dtype, device=k.device)
    s = k.new_zeros(b, h, dk, v.shape[-1])
    outs = []
    for t in range(t_len):
        kt, bt = k[:, :, t, :, None], beta[:, :, t, None, None]  # (B, H, Dk, 1), (B, H, 1, 1)
        s = torch.exp(g[:, :, t, None, None]) * (eye - bt * kt @ kt.transpose(-1, -2)) @ s \
            + bt * kt @ v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ s)
    return torch.cat(outs, dim=2)


@MIXERS.register("gated_deltanet")
class GatedDeltaNet(Mixer):
    family = "gated_deltanet"
    fp32_params = ("A_log", "dt_bias", "a_proj", "b_proj", "o_norm")

    def __init__(self, d_model: int, n_heads: int = 2, head_dim: int | None = None, expand_v: float = 2.0,
                 norm_eps: float = 1e-5, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        super().__init__()
        self.n_heads, self.head_k = n_heads, head_dim or d_model // n_heads
        self.head_v, self.norm_eps = int(self.head_k * expand_v), norm_eps
        key_dim, value_dim = n_heads * self.head_k, n_heads * self.head_v
        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.a_proj = nn.Linear(d_model, n_heads, bias=False)  # decay input, kept fp32
        self.b_proj = nn.Linear(d_model, n_heads, bias=False)  # beta, kept fp32
        self.g_proj = nn.Linear(d_model, value_dim, bias=False)  # output gate
        self.A_log = nn.Parameter(torch.log(torch.empty(n_heads).uniform_(0.0, 16.0)))
        dt = torch.exp(torch.rand(n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.o_norm = nn.Parameter(torch.ones(self.head_v))
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("kv", (batch, self.n_heads, self.head_k, self.head_v))]

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k: (B, H, T, Dk), v: (B, H, T, Dv), beta, g: (B, H, T); g <= 0."""
        h = self.n_heads
        q = l2_norm(heads(F.silu(self.q_proj(x)), h)) * (1.0 / math.sqrt(self.head_k))
        k = l2_norm(heads(F.silu(self.k_proj(x)), h))
        v = heads(F.silu(self.v_proj(x)), h)
        beta = torch.sigmoid(self.b_proj(x)).transpose(1, 2)  # (B, H, T)
        g = (-torch.exp(self.A_log) * softplus(self.a_proj(x) + self.dt_bias)).transpose(1, 2)
        return q, k, v, beta, g

    def _out(self, x: Tensor, o: Tensor) -> Tensor:
        """x: (B, T, D), o: (B, H, T, Dv) -> (B, T, D)."""
        o = merge_heads(rms_norm(o, self.o_norm, self.norm_eps))
        return self.o_proj(o * F.silu(self.g_proj(x)))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        q, k, v, beta, g = self._inputs(x)
        o, s = gated_deltanet_parallel(q, k, v, beta, g, state[0], chunk_size)
        return self._out(x, o), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v, beta, g = (t[:, :, 0] for t in self._inputs(x[:, None]))
        o, s = gated_deltanet_step(q, k, v, beta, g, state[0])
        return self._out(x[:, None], o[:, :, None])[:, 0], (s,)

    def naive(self, x: Tensor) -> Tensor:
        return self._out(x, gated_deltanet_naive(*self._inputs(x)))
