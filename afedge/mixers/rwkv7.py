"""RWKV-7 "Goose" time mixing (Peng et al. 2025): the generalised delta rule with a vector-valued decay.

In FLA's / the paper's convention S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T, o_t = S_t r_t with S: (Dv, Dk).
We keep X = S^T: (Dk, Dv), rows indexed by keys like the other mixers, so
    X_t = diag(w_t) X_{t-1} + b_t (a_t^T X_{t-1}) + k_t v_t^T,   o_t = X_t^T r_t,
with a = -kappa_hat (the L2-normalised removal key) and b = kappa_hat * alpha (alpha = in-context learning rate).
The decay is data-dependent, w = exp(-exp(w_raw)) with w_raw = -softplus(-(w0 + tanh(x_w W1) W2)) - 0.5, so
w is in (0.545, 1). Around it: token shift with per-path lerps, k scaled by the learning rate (k_a), a per-head
group norm on o, the r.k "bonus" (r_k), and a low-rank sigmoid output gate. The value residual across layers
(v_first) is left out: a mixer sees only its own layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import head_norm, heads, merge_heads, tril_ones
from afedge.state import StateSlot

# The intra-chunk decays are formed explicitly as (B, H, C, C, Dk): longer chunks (or chunk_size=None) run as
# MAX_CHUNK-token chunks with the state passed between them, which is the same arithmetic.
MAX_CHUNK = 64


def _decays(hi: Tensor, lo: Tensor, mask: Tensor) -> Tensor:
    """exp(hi_i - lo_j) where mask[i, j] else 0; the kept exponents are <= 0 (clamped before exp elsewhere).
    hi, lo: (..., C, Dk), mask: (C, C) -> (..., C, C, Dk)."""
    diff = hi[..., :, None, :] - lo[..., None, :, :]
    return torch.exp(-torch.relu(-diff)) * mask[:, :, None]


def _pair(x: Tensor, y: Tensor, dec: Tensor) -> Tensor:
    """sum_d x_i,d y_j,d dec_i,j,d. x, y: (..., C, Dk), dec: (..., C, C, Dk) -> (..., C, C)."""
    return (x[..., :, None, :] * y[..., None, :, :] * dec).sum(-1)


def _unit_lower_inverse(m: Tensor) -> Tensor:
    """(I - M)^-1 for strictly lower-triangular M: (..., C, C), by recursive doubling of diagonal blocks.

    The standard divide-and-conquer triangular inverse: with N the inverse of I - M's diagonal blocks of size s, the
    inverse for blocks of 2s is N + N L N, where L is M's lower-left quarter of each 2s-block (the inverse of
    [[A, 0], [-L, D]] is [[A^-1, 0], [D^-1 L A^-1, D^-1]]). ceil(log2 C) rounds of two matmuls, static masks, and
    unlike the series (I + M)(I + M^2)(I + M^4)... it never forms high powers of M."""
    c = m.shape[-1]
    idx = torch.arange(c, dtype=m.dtype, device=m.device)  # float: TVM rejects int64 // int32 constants
    inv = torch.eye(c, dtype=m.dtype, device=m.device).expand_as(m)
    s = 1
    while s < c:
        block, half = torch.floor(idx * (0.5 / s)), torch.floor(idx * (1.0 / s))  # exact: s is a power of 2
        quarter = (block[:, None] == block[None, :]) & (half[:, None] > half[None, :])  # (C, C)
        inv = inv + inv @ (m * quarter.to(m.dtype)) @ inv
        s *= 2
    return inv


def rwkv7_parallel(r: Tensor, g: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s: Tensor,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise (WY / UT-transform) form. r, g, k, a, b: (B, H, T, Dk), g = log w <= 0; v: (B, H, T, Dv);
    s: (B, H, Dk, Dv).

    In a chunk, with G the inclusive cumsum of g and z_i^T = a_i^T X_{i-1} the (unknown) delta-rule reads,
        X_i = e^{G_i} X_0 + sum_{j<=i} e^{G_i - G_j} (k_j v_j^T + b_j z_j^T),
    so the z solve a unit-lower-triangular system (I - M_ab) Z = (a e^{G_{i-1}}) X_0 + M_ak V, with
    M_xy[i, j] = sum_d x_i y_j e^{G_{i-1} - G_j} for j < i; then O = (r e^G) X_0 + A_rk V + A_rb Z with
    A_xy[i, j] = sum_d x_i y_j e^{G_i - G_j} for j <= i, and X_C follows from the same sum at i = C.
    """
    outs = []
    for p, e in chunks(r.shape[2], min(chunk_size or r.shape[2], MAX_CHUNK)):
        rc, gc, kc, vc, ac, bc = (t[:, :, p:e] for t in (r, g, k, v, a, b))
        c = e - p
        cum = tril_ones(c, gc) @ gc  # (B, H, C, Dk) inclusive cumsum, as a matmul
        prev = cum - gc  # exclusive cumsum G_{i-1}
        incl = _decays(cum, cum, tril_ones(c, gc))  # (B, H, C, C, Dk)
        excl = _decays(prev, cum, tril_ones(c, gc, -1))
        m_ab, m_ak = _pair(ac, bc, excl), _pair(ac, kc, excl)  # (B, H, C, C)
        z = _unit_lower_inverse(m_ab) @ ((ac * torch.exp(prev)) @ s + m_ak @ vc)  # (B, H, C, Dv)
        outs.append((rc * torch.exp(cum)) @ s + _pair(rc, kc, incl) @ vc + _pair(rc, bc, incl) @ z)
        end = cum[:, :, c - 1:c]  # (B, H, 1, Dk)
        to_end = torch.exp(end - cum)  # (B, H, C, Dk)
        s = torch.exp(end).transpose(-1, -2) * s + (kc * to_end).transpose(-1, -2) @ vc \
            + (bc * to_end).transpose(-1, -2) @ z
    return torch.cat(outs, dim=2), s


def rwkv7_step(r: Tensor, g: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One token. r, g, k, a, b: (B, H, Dk), v: (B, H, Dv) -> o: (B, H, Dv), s."""
    sa = a[..., None, :] @ s  # (B, H, 1, Dv) = a^T X_{t-1}
    s = torch.exp(g)[..., :, None] * s + b[..., :, None] * sa + k[..., :, None] * v[..., None, :]
    return (r[..., None, :] @ s)[..., 0, :], s


def rwkv7_naive(r: Tensor, g: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """X_t = (diag(w_t) + b_t a_t^T) X_{t-1} + k_t v_t^T from zero, literally, with full transition matrices."""
    bsz, h, t_len, dk = k.shape
    s = k.new_zeros(bsz, h, dk, v.shape[-1])
    outs = []
    for t in range(t_len):
        trans = torch.diag_embed(torch.exp(g[:, :, t])) + b[:, :, t, :, None] @ a[:, :, t, None, :]  # (B,H,Dk,Dk)
        s = trans @ s + k[:, :, t, :, None] @ v[:, :, t, None, :]
        outs.append(r[:, :, t, None, :] @ s)
    return torch.cat(outs, dim=2)


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), stable, from XNNPACK-delegable ops."""
    return torch.relu(x) + torch.log(torch.exp(-torch.abs(x)) + 1.0)


@MIXERS.register("rwkv7")
class RWKV7(Mixer):
    family = "rwkv7"
    fp32_params = ("w0", "w1", "w2", "a0", "a1", "a2", "ln_x")   # decay LoRA, in-context rate (delta rule), norm

    def __init__(self, d_model: int, n_heads: int = 2, decay_rank: int = 8, a_rank: int = 8,
                 gate_rank: int = 8, ratio_0_to_1: float = 0.5) -> None:
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        d = d_model

        def lora(*shape: int) -> nn.Parameter:
            return nn.Parameter(0.1 * torch.randn(*shape))

        # token-shift lerps for r, w, k, v, a, g (RWKV-7's x_r ... x_g)
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (nn.Parameter(torch.rand(d)) for _ in range(6))
        n = torch.arange(d, dtype=torch.float64) / max(d - 1, 1)
        self.w0 = nn.Parameter((-7 + 5 * n ** (0.85 + ratio_0_to_1 ** 0.5) + 0.5).float())  # RWKV-7 decay init
        self.w1, self.w2 = lora(d, decay_rank), lora(decay_rank, d)
        self.a0, self.a1, self.a2 = nn.Parameter(torch.zeros(d)), lora(d, a_rank), lora(a_rank, d)
        self.g1, self.g2 = lora(d, gate_rank), lora(gate_rank, d)
        self.k_k, self.k_a = nn.Parameter(torch.full((d,), 0.85)), nn.Parameter(torch.ones(d))
        self.r_k = lora(n_heads, self.head_dim)
        self.receptance, self.key = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.value, self.output = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.ln_x = nn.GroupNorm(n_heads, d, eps=64e-5)  # per-head norm with affine (only its weights are used)
        nn.init.uniform_(self.ln_x.weight, 0.5, 1.5)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("shift", (batch, self.d_model), note="the previous token's x"),
                StateSlot("wkv", (batch, self.n_heads, self.head_dim, self.head_dim), note="X = S^T, (Dk, Dv)")]

    def _inputs(self, x: Tensor, prev: Tensor) -> tuple[tuple[Tensor, ...], Tensor, Tensor]:
        """x: (B, T, D), prev: (B, D) -> (r, g, k, v, a, b) as (B, H, T, Dh), the bonus (B, H, T, 1), the gate."""
        h = self.n_heads
        xx = torch.cat([prev[:, None], x[:, :x.shape[1] - 1]], dim=1) - x  # shift(x) - x
        xr, xw, xk, xv, xa, xg = (x + xx * m for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        w_raw = -_softplus(-(self.w0 + torch.tanh(xw @ self.w1) @ self.w2)) - 0.5
        alpha = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate, (0, 1)
        gate = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize(heads(k * self.k_k, h), dim=-1)
        k = heads(k * (1 + (alpha - 1) * self.k_a), h)
        alpha = heads(alpha, h)
        r, v = heads(r, h), heads(v, h)
        bonus = (r * k * self.r_k[:, None, :]).sum(-1, keepdim=True)  # (B, H, T, 1)
        return (r, heads(-torch.exp(w_raw), h), k, v, -kk, kk * alpha), bonus * v, gate

    def _out(self, o: Tensor, bonus: Tensor, gate: Tensor) -> Tensor:
        """o, bonus: (B, H, T, Dh), gate: (B, T, D) -> (B, T, D)."""
        o = merge_heads(head_norm(o, self.ln_x.eps)) * self.ln_x.weight + self.ln_x.bias
        return self.output((o + merge_heads(bonus)) * gate)

    def _last(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        return x[:, t - 1:t].reshape(x.shape[0], x.shape[2])

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        shift, s = state
        ins, bonus, gate = self._inputs(x, shift)
        o, s = rwkv7_parallel(*ins, s, chunk_size)
        return self._out(o, bonus, gate), (self._last(x), s)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        shift, s = state
        ins, bonus, gate = self._inputs(x[:, None], shift)
        o, s = rwkv7_step(*(t[:, :, 0] for t in ins), s)
        return self._out(o[:, :, None], bonus, gate)[:, 0], (x, s)

    def naive(self, x: Tensor) -> Tensor:
        ins, bonus, gate = self._inputs(x, x.new_zeros(x.shape[0], x.shape[2]))
        return self._out(rwkv7_naive(*ins), bonus, gate)
