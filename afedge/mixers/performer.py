"""Performer (Choromanski et al. 2021): FAVOR+ positive orthogonal random features for the softmax kernel.

exp(q.k) = E_w[exp(w.q - |q|^2/2) exp(w.k - |k|^2/2)], w ~ N(0, I), estimated with m orthogonal rows of `proj`
(q, k pre-scaled by Dh^-1/4 so the kernel is exp(q.k / sqrt(Dh))). The features then run the linear-attention
recurrence of `linear_transformer`: S_t = S_{t-1} + phi_k(k_t)^T v_t, z_t = z_{t-1} + phi_k(k_t).

Stabilisation without any statistic over the sequence, so step == parallel exactly and nothing overflows:
  keys:    phi_k(k)_i = exp(c - |k - w_i|^2 / 2) = exp(w_i.k - |k|^2/2 - |w_i|^2/2 + c) <= e^c
  queries: phi_q(q)_i = exp(u_i - max_j u_j),  u_i = w_i.q + |w_i|^2/2  (undoes the per-feature factor)
c = min(max_i |w_i|^2 / 2, 60) is a constant fixed by `proj`: it keeps phi_q . phi_k near the scale of the FAVOR+
estimate (so the denominator guard never matters) while bounding z by T e^60 (< 1e31 at T = 65,536). phi_q . phi_k
is the FAVOR+ estimate times a per-query factor (the max shift, the dropped exp(-|q|^2/2), e^c, the estimator's
1/m) that numerator and denominator share, so the normalised output is FAVOR+'s. Beyond head_dim 128 the key
features underflow fp32 for typical inputs, so larger heads are refused.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State
from afedge.mixers.linear_transformer import linear_attn_naive, linear_attn_parallel, linear_attn_step
from afedge.mixers.ops import heads, merge_heads
from afedge.state import StateSlot


def orthogonal_features(n: int, d: int, seed: int = 0) -> Tensor:
    """(n, d) fp64 rows: blocks of d orthogonal directions with chi(d)-distributed norms (FAVOR+ ORFs)."""
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].T
              for _ in range(math.ceil(n / d))]
    norms = torch.randn(n, d, generator=g, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return torch.cat(blocks)[:n] * norms


MAX_HEAD_DIM = 128
GUARD = 1e-30  # denominator guard: only matters if every feature product underflows


def favor_key_shift(proj: Tensor) -> float:
    """The constant c of the key features: min(max_i |w_i|^2 / 2, 60)."""
    return min(float((proj.double() ** 2).sum(-1).max()) / 2, 60.0)


def favor_features(x: Tensor, proj: Tensor, query: bool, key_shift: float) -> Tensor:
    """Stabilised positive features. x: (..., Dh) pre-scaled, proj: (F, Dh) -> (..., F)."""
    wx = x @ proj.transpose(0, 1)  # (..., F)
    half_w2 = (proj * proj).sum(-1) * 0.5  # (F,)
    if query:
        u = wx + half_w2
        return torch.exp(u - torch.max(u, -1, keepdim=True).values)  # in (0, 1]
    return torch.exp(wx - half_w2 - (x * x).sum(-1, keepdim=True) * 0.5 + key_shift)  # in (0, e^c]


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Exact causal softmax(q k^T / sqrt(D)) v. q, k: (..., T, D), v: (..., T, Dv)."""
    t = q.shape[-2]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v


def favor_attention(q: Tensor, k: Tensor, v: Tensor, proj: Tensor) -> Tensor:
    """Causal FAVOR+ attention approximating `softmax_attention`. q, k: (..., T, D), proj: (F, D)."""
    scale, c = q.shape[-1] ** -0.25, favor_key_shift(proj)
    phi_q, phi_k = favor_features(q * scale, proj, True, c), favor_features(k * scale, proj, False, c)
    return linear_attn_naive(phi_q, phi_k, v, GUARD)


def performer_softmax_error(q: Tensor, k: Tensor, v: Tensor, n_features: int = 64, seed: int = 0,
                            proj: Tensor | None = None) -> dict[str, float]:
    """FAVOR+ vs EXACT causal softmax attention on the same q, k, v ((..., T, D), unscaled), computed in fp64.

    Uses `proj` if given (a module's buffer), else draws `n_features` orthogonal features with `seed`.
    Returns max abs error and relative Frobenius error ||favor - exact||_F / ||exact||_F of the attention output.
    """
    q, k, v = q.double(), k.double(), v.double()
    proj = orthogonal_features(n_features, q.shape[-1], seed) if proj is None else proj.double()
    exact, approx = softmax_attention(q, k, v), favor_attention(q, k, v, proj)
    return {"n_features": float(proj.shape[0]), "max_abs": float((approx - exact).abs().max()),
            "rel_fro": float((approx - exact).norm() / exact.norm())}


@MIXERS.register("performer")
class Performer(Mixer):
    family = "performer"
    fp32_params = ("proj",)

    def __init__(self, d_model: int, n_heads: int = 2, head_dim: int | None = None, n_features: int = 64,
                 seed: int = 0) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        self.n_features, self.seed = n_features, seed
        if self.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"performer: head_dim {self.head_dim} > {MAX_HEAD_DIM}: fp32 FAVOR+ features underflow; "
                             f"use more heads (n_heads) or a smaller head_dim")
        inner = n_heads * self.head_dim
        self.q_proj, self.k_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(d_model, inner, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(inner, d_model, bias=False)
        # (F, Dh) fixed random projection shared by the heads, a constant of the exported program; kept fp32.
        self.register_buffer("proj", orthogonal_features(n_features, self.head_dim, seed).float())
        self.key_shift = favor_key_shift(self.proj)  # a constant of the graphs, fixed by proj

    def state_slots(self, batch: int) -> list[StateSlot]:
        h, f, d = self.n_heads, self.n_features, self.head_dim
        return [StateSlot("kv", (batch, h, f, d)), StateSlot("z", (batch, h, f))]

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> q, k (pre-scaled by Dh^-1/4), v: (B, H, T, Dh)."""
        scale = self.head_dim ** -0.25
        q, k = heads(self.q_proj(x) * scale, self.n_heads), heads(self.k_proj(x) * scale, self.n_heads)
        return q, k, heads(self.v_proj(x), self.n_heads)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D) -> phi_q: (B, H, T, F), phi_k: (B, H, T, F), v: (B, H, T, Dh)."""
        q, k, v = self._heads(x)
        c = self.key_shift
        return favor_features(q, self.proj, True, c), favor_features(k, self.proj, False, c), v

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        o, s, z = linear_attn_parallel(*self._qkv(x), *state, chunk_size, GUARD)
        return self.o_proj(merge_heads(o)), (s, z)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        q, k, v = (t[:, :, 0] for t in self._qkv(x[:, None]))  # (B, H, F), (B, H, F), (B, H, Dh)
        o, s, z = linear_attn_step(q, k, v, *state, GUARD)
        return self.o_proj(merge_heads(o[:, :, None]))[:, 0], (s, z)

    def naive(self, x: Tensor) -> Tensor:
        return self.o_proj(merge_heads(linear_attn_naive(*self._qkv(x), GUARD)))

    @torch.no_grad()
    def report(self, x: Tensor | None = None) -> dict[str, float | str]:
        """Attention-output error of FAVOR+ vs exact causal softmax on this layer's own q, k, v, with its own
        `proj`. x: (B, T, D) calibration input; default a seeded N(0, 1) input of 256 tokens."""
        source = "calibration input" if x is not None else "seeded N(0,1) input"
        if x is None:
            x = torch.randn(1, 256, self.q_proj.in_features, generator=torch.Generator().manual_seed(0))
        q, k, v = self._heads(x.to(self.proj))
        s = self.head_dim ** 0.25  # undo the pre-scaling: the error function scales by D^-1/4 itself
        err = performer_softmax_error(q * s, k * s, v, proj=self.proj)
        return {"n_features": err["n_features"], "softmax_max_abs": err["max_abs"],
                "softmax_rel_fro": err["rel_fro"], "measured_on": f"{source}, {x.shape[1]} tokens"}
