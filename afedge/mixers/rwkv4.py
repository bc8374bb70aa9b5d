"""RWKV-4 (Peng et al. 2023): time mixing (the WKV recurrence) and channel mixing, laid out like Hugging Face's
`RwkvBlock` so its `ln1.*`, `attention.*`, `ln2.*` and `feed_forward.*` keys load 1:1 into this mixer.

WKV per channel, with w = exp(time_decay) > 0 and u = time_first:
    y_t = (sum_{s<t} e^{-(t-1-s) w + k_s} v_s + e^{u + k_t} v_t) / (sum_{s<t} e^{-(t-1-s) w + k_s} + e^{u + k_t})
carried as the stable state (num, den, max): the true sums are num * e^max and den * e^max (max starts at -1e38).

The mixer is a whole RWKV block minus its residual adds: it takes the residual stream h and returns
a + f with a = attention(ln1(h)), f = feed_forward(ln2(h + a)), so h + mixer(h) is exactly HF's block output.
Use it with `mlp_ratio=0` (channel mixing is inside) and, for an exact HF layout, have the block feed the raw residual
stream (`residual_input`): behind the LM's own norm1 it is still a valid network, with one extra pre-norm.

The WKV kernels below (`wkv_*`) also serve AFT (afedge/mixers/aft.py): AFT-simple is w = u = 0, AFT with a decaying
position bias is u = w.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import tril_ones
from afedge.state import StateSlot

NEG = -1e38  # the initial running max (HF's value): exp(NEG - anything finite) == 0 in fp32 and fp64
# The chunked WKV forms a (B, A, C, C) weight tensor per channel: longer chunks (or chunk_size=None) run as
# MAX_CHUNK-token chunks with the state passed between them, which is the same arithmetic.
MAX_CHUNK = 64


def wkv_parallel(w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: tuple[Tensor, Tensor, Tensor],
                 chunk_size: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Chunked WKV, exact and stable. w, u: (A,), k, v: (B, T, A), state (num, den, max): (B, A) each.

    Within a chunk every weight is kept as a log-weight (state: max - i w; token j < i: k_j - (i-1-j) w; token i:
    u + k_i) and the per-row maximum is subtracted before exp, so no exponent is positive. The maxima reduce a 4-D
    tensor over dim 3 with keepdim (the only amax XNNPACK lowers; dim=-1 fails there), and the sums are matmuls
    against [v, 1] (bmm, which XNNPACK takes).
    """
    bsz, n_ch = state[0].shape
    num, den, mx = (s.reshape(bsz, n_ch, 1, 1) for s in state)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)  # (B, A, T)
    w3, u2 = w[:, None, None], u[:, None]  # (A, 1, 1), (A, 1)
    outs = []
    for a, e in chunks(k.shape[1], min(chunk_size or k.shape[1], MAX_CHUNK)):
        kc, vc, c = kt[:, :, a:e], vt[:, :, a:e], e - a
        v1 = torch.stack([vc, torch.ones_like(vc)], dim=-1)  # (B, A, C, 2)
        i = torch.arange(c, dtype=k.dtype, device=k.device)
        strict = tril_ones(c, k, -1)
        lag = (i[:, None] - 1 - i[None, :]) * strict  # (C, C): i-1-j below the diagonal, 0 elsewhere
        # (B, A, C, C) log-weights; on and above the diagonal the current token's u + k_i, which leaves the row max
        # unchanged and is masked out above the diagonal after the exp (no huge constants, fine in fp16 too)
        logw = (kc[:, :, None, :] - lag * w3) * strict + (u2 + kc)[..., None] * (1 - strict)
        logs = mx - i[:, None] * w3  # (B, A, C, 1): the incoming state's log-weight at each position
        top = torch.maximum(logw.max(3, keepdim=True).values, logs)  # (B, A, C, 1)
        p, ps = torch.exp(logw - top) * tril_ones(c, k), torch.exp(logs - top)
        nd = p @ v1  # (B, A, C, 2): sum of e^. v_j and of e^.
        outs.append(((nd[..., 0:1] + ps * num) / (nd[..., 1:2] + ps * den)).reshape(bsz, n_ch, c))
        # state after the chunk: log-weights max - C w and k_j - (C-1-j) w
        logk = (kc - (c - 1 - i) * w[:, None])[:, :, None, :]  # (B, A, 1, C)
        logs = mx - c * w3  # (B, A, 1, 1)
        top = torch.maximum(logk.max(3, keepdim=True).values, logs)
        pk, ps = torch.exp(logk - top), torch.exp(logs - top)
        nd = pk @ v1  # (B, A, 1, 2)
        num, den, mx = ps * num + nd[..., 0:1], ps * den + nd[..., 1:2], top
    return torch.cat(outs, dim=2).transpose(1, 2), tuple(s.reshape(bsz, n_ch) for s in (num, den, mx))


def wkv_step(w: Tensor, u: Tensor, k: Tensor, v: Tensor,
             state: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """One token of the stable recurrence (HF's CPU path). w, u: (A,), k, v: (B, A) -> y: (B, A), state."""
    num, den, mx = state
    top = torch.maximum(mx, u + k)
    e1, e2 = torch.exp(mx - top), torch.exp(u + k - top)
    y = (e1 * num + e2 * v) / (e1 * den + e2)
    new_mx = torch.maximum(mx - w, k)
    e1, e2 = torch.exp(mx - w - new_mx), torch.exp(k - new_mx)
    return y, (e1 * num + e2 * v, e1 * den + e2, new_mx)


def wkv_naive(w: Tensor, u: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The defining weighted average, one output row at a time. k, v: (B, T, A) -> (B, T, A)."""
    ys = []
    for t in range(k.shape[1]):
        lag = (t - 1 - torch.arange(t, dtype=k.dtype, device=k.device))[:, None]  # (t, 1)
        logw = torch.cat([k[:, :t] - lag * w, (u + k[:, t])[:, None]], dim=1)  # (B, t+1, A)
        p = torch.exp(logw - logw.max(1, keepdim=True).values)
        ys.append((p * v[:, :t + 1]).sum(1) / p.sum(1))
    return torch.stack(ys, 1)


def _shift(x: Tensor, prev: Tensor) -> Tensor:
    """The previous token's x at every position. x: (B, T, D), prev: (B, D) -> (B, T, D)."""
    return torch.cat([prev[:, None], x[:, :x.shape[1] - 1]], dim=1)


def _last(x: Tensor) -> Tensor:
    """x[:, -1] without a negative index (TVM). (B, T, D) -> (B, D)."""
    t = x.shape[1]
    return x[:, t - 1:t].reshape(x.shape[0], x.shape[2])


def _lerp(x: Tensor, prev: Tensor, mix: Tensor) -> Tensor:
    return x * mix + prev * (1 - mix)


class TimeMix(nn.Module):
    """HF `RwkvSelfAttention` parameters: time_decay, time_first (A,), time_mix_* (1, 1, D), key/value/receptance,
    output."""

    def __init__(self, d_model: int, attention_size: int, ratio_0_to_1: float = 0.5,
                 ratio_1_to_almost0: float = 0.5) -> None:
        super().__init__()
        # RWKV-4 initialisation (HF `_init_weights`, with the reference time_first = log 0.3 + zigzag)
        h = torch.arange(attention_size, dtype=torch.float64)
        self.time_decay = nn.Parameter((-5 + 8 * (h / max(attention_size - 1, 1)) ** (0.7 + 1.3 * ratio_0_to_1))
                                       .float())
        self.time_first = nn.Parameter((math.log(0.3) + 0.5 * ((h + 1) % 3 - 1)).float())
        tw = (torch.arange(d_model, dtype=torch.float32) / d_model)[None, None]
        self.time_mix_key = nn.Parameter(tw ** ratio_1_to_almost0)
        self.time_mix_value = nn.Parameter(tw ** ratio_1_to_almost0 + 0.3 * ratio_0_to_1)
        self.time_mix_receptance = nn.Parameter(tw ** (0.5 * ratio_1_to_almost0))
        self.key = nn.Linear(d_model, attention_size, bias=False)
        self.value = nn.Linear(d_model, attention_size, bias=False)
        self.receptance = nn.Linear(d_model, attention_size, bias=False)
        self.output = nn.Linear(attention_size, d_model, bias=False)

    def rkv(self, x: Tensor, prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, D), prev: (B, D) the token before x -> sigmoid(r), k, v: (B, T, A)."""
        sx = _shift(x, prev)
        r = torch.sigmoid(self.receptance(_lerp(x, sx, self.time_mix_receptance)))
        return r, self.key(_lerp(x, sx, self.time_mix_key)), self.value(_lerp(x, sx, self.time_mix_value))

    def decay(self) -> tuple[Tensor, Tensor]:
        """w = exp(time_decay) > 0 and u = time_first. (No `.to(dtype)`: a no-op cast of a parameter becomes an
        aliased constant that ExecuTorch's constant folding cannot unlift.)"""
        return torch.exp(self.time_decay), self.time_first


class ChannelMix(nn.Module):
    """HF `RwkvFeedForward`: time_mix_key, time_mix_receptance (1, 1, D), key, receptance, value."""

    def __init__(self, d_model: int, hidden: int, ratio_1_to_almost0: float = 0.5) -> None:
        super().__init__()
        tw = (torch.arange(d_model, dtype=torch.float32) / d_model)[None, None]
        self.time_mix_key = nn.Parameter(tw ** ratio_1_to_almost0)
        self.time_mix_receptance = nn.Parameter(tw ** ratio_1_to_almost0)
        self.key = nn.Linear(d_model, hidden, bias=False)
        self.receptance = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor, prev: Tensor) -> Tensor:
        """x: (B, T, D), prev: (B, D) -> (B, T, D)."""
        sx = _shift(x, prev)
        k = torch.square(torch.relu(self.key(_lerp(x, sx, self.time_mix_key))))
        return torch.sigmoid(self.receptance(_lerp(x, sx, self.time_mix_receptance))) * self.value(k)


@MIXERS.register("rwkv4")
class RWKV4(Mixer):
    family = "rwkv4"
    fp32_params = ("attention.time_decay", "attention.time_first", "ln1", "ln2")
    # Takes the residual stream and returns a + f (see the module docstring); use with mlp_ratio=0.
    residual_input: ClassVar[bool] = True

    def __init__(self, d_model: int, attention_size: int | None = None, intermediate_size: int | None = None,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.attention_size = attention_size or d_model
        self.ln1, self.ln2 = nn.LayerNorm(d_model, eps=eps), nn.LayerNorm(d_model, eps=eps)
        self.attention = TimeMix(d_model, self.attention_size)
        self.feed_forward = ChannelMix(d_model, intermediate_size or 4 * d_model)

    def state_slots(self, batch: int) -> list[StateSlot]:
        d, a = self.ln1.normalized_shape[0], self.attention_size
        return [StateSlot("att_shift", (batch, d), note="ln1 output of the previous token"),
                StateSlot("num", (batch, a), note="WKV numerator / e^max"),
                StateSlot("den", (batch, a), note="WKV denominator / e^max"),
                StateSlot("max", (batch, a), init=NEG, note="WKV running max (log scale)"),
                StateSlot("ffn_shift", (batch, d), note="ln2 output of the previous token")]

    def _block(self, h: Tensor, state: State, wkv) -> tuple[Tensor, State]:
        """h: (B, T, D); `wkv(w, u, k, v, (num, den, max))` -> (y, wkv state)."""
        att_shift, num, den, mx, ffn_shift = state
        xa = self.ln1(h)
        r, k, v = self.attention.rkv(xa, att_shift)
        y, (num, den, mx) = wkv(*self.attention.decay(), k, v, (num, den, mx))
        a = self.attention.output(r * y)
        xf = self.ln2(h + a)
        return a + self.feed_forward(xf, ffn_shift), (_last(xa), num, den, mx, _last(xf))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        return self._block(x, state, lambda w, u, k, v, s: wkv_parallel(w, u, k, v, s, chunk_size))

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        def one(w, u, k, v, s):
            y, s = wkv_step(w, u, k[:, 0], v[:, 0], s)
            return y[:, None], s
        y, state = self._block(x[:, None], state, one)
        return y[:, 0], state

    def naive(self, x: Tensor) -> Tensor:
        b, d = x.shape[0], x.shape[2]
        zero = x.new_zeros(b, d)
        xa = self.ln1(x)
        r, k, v = self.attention.rkv(xa, zero)
        a = self.attention.output(r * wkv_naive(*self.attention.decay(), k, v))
        return a + self.feed_forward(self.ln2(x + a), zero)
