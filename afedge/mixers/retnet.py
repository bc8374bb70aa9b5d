"""RetNet multi-scale retention (Sun et al. 2023): per-head fixed decays, parallel / chunkwise / recurrent forms.

S_t = gamma_h * S_{t-1} + k_t^T v_t,   o_t = q_t S_t,   out = W_o(swish(W_g x) * GroupNorm(o)).
xPos rotation is left out: the decay alone carries position.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import decay_matrix, head_norm, heads, merge_heads
from afedge.state import StateSlot


@MIXERS.register("retnet")
class RetNet(Mixer):
    family = "retnet"
    fp32_params = ("log_gamma",)

    def __init__(self, d_model: int, n_heads: int = 2, head_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        inner = n_heads * self.head_dim
        self.q_proj, self.k_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(d_model, inner, bias=False)
        self.v_proj, self.g_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)
        gamma = 1.0 - torch.exp2(-5.0 - torch.arange(n_heads, dtype=torch.float64))
        self.register_buffer("log_gamma", torch.log(gamma).float())  # (H,) kept fp32 by the quantizer

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("kv", (batch, self.n_heads, self.head_dim, self.head_dim))]

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k, v: (B, H, T, Dh), k pre-scaled by Dh^-1/2."""
        k = self.k_proj(x) * (1.0 / math.sqrt(self.head_dim))
        return heads(self.q_proj(x), self.n_heads), heads(k, self.n_heads), heads(self.v_proj(x), self.n_heads)

    def _out(self, x: Tensor, o: Tensor) -> Tensor:
        """Gate and project. x: (B, T, D), o: (B, H, T, Dh) -> (B, T, D)."""
        return self.o_proj(F.silu(self.g_proj(x)) * merge_heads(head_norm(o)))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        q, k, v = self._qkv(x)
        (s,) = state  # (B, H, Dh, Dh)
        lg = self.log_gamma.to(x.dtype)
        outs = []
        for a, b in chunks(x.shape[1], chunk_size):
            qc, kc, vc, c = q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], b - a
            pos = torch.arange(c, dtype=x.dtype, device=x.device)
            inner = (qc @ kc.transpose(-1, -2) * decay_matrix(lg, c)) @ vc
            cross = (qc @ s) * torch.exp((pos + 1)[None, :, None] * lg[:, None, None])  # (B, H, C, Dh)
            outs.append(inner + cross)
            k_decay = torch.exp((c - 1 - pos)[None, :] * lg[:, None])[..., None]  # (H, C, 1)
            s = torch.exp(c * lg)[:, None, None] * s + (kc * k_decay).transpose(-1, -2) @ vc
        return self._out(x, torch.cat(outs, dim=2)), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = (t[:, :, 0] for t in self._qkv(x[:, None]))  # (B, H, Dh)
        (s,) = state
        s = torch.exp(self.log_gamma.to(x.dtype))[:, None, None] * s + k[..., :, None] * v[..., None, :]
        o = (q[..., None, :] @ s)  # (B, H, 1, Dh)
        return self._out(x[:, None], o)[:, 0], (s,)

    def naive(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        t = x.shape[1]
        i = torch.arange(t, device=x.device)
        gamma = torch.exp(self.log_gamma.to(x.dtype))
        lag = (i[:, None] - i[None, :]).to(x.dtype)
        d = torch.where(lag >= 0, gamma[:, None, None] ** lag.clamp(min=0), torch.zeros((), dtype=x.dtype))
        return self._out(x, (q @ k.transpose(-1, -2) * d) @ v)
