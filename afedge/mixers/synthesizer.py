"""Synthesizer (Tay et al. 2021), causal: attention weights synthesized without token-token dot products.

  synthesizer_dense:  scores_t = W2 relu(W1 x_t + b1) + b2   (a per-token MLP, H x L scores)
  synthesizer_random: scores   = A B^T, A: (H, r), B: (L, r)   (factorized, learned, input-independent)
  y_t = W_o sum_{s} softmax_s(scores_t[lag t - s]) W_v x_s,  over lags t - s in 0..L-1 (L = max_len).

Choice: scores are indexed by LAG, not by absolute position as in the paper. Row t of the paper's L x L score
matrix needs the absolute position t (unbounded in a recurrence); a lag-indexed row needs only the last L values,
so a fixed-size state is exact for any sequence length. The model itself is windowed: lags >= L have no score and
get no weight in every form. Score slot j holds lag L-1-j (oldest first), matching the ring buffer's order, so
no form needs a flip or a gather.

The recurrent state is a ring buffer of the last `window` values (shifted with cat, static shapes) and a 0/1
validity mask for slots not yet filled. window == max_len (default) is exact. window < max_len truncates the
recurrence further: the mixer and its state slots are then marked approximate, and `report()` gives the softmax
mass the truncated window drops, measured on data. The parallel form always computes the exact model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import heads, merge_heads
from afedge.state import StateSlot

NEG = 1e4  # masked logits are pushed down by this much (fp16-safe, and exp(-1e4) is exactly 0 in fp32/fp64)
MAX_CHUNK = 128  # longer chunks run as 128-token pieces: memory O(T (L + 128)) instead of O(T^2)


def skew(s: Tensor) -> Tensor:
    """Lay lag-slot scores out by position. s: (..., C, L) -> (..., C, L + C), out[i, i + 1 + j] = s[i, j], else 0.

    Row i of [0 | s | 0_C] (width L + C + 1), read back with width L + C, lands shifted right by i (cat + views)."""
    *lead, c, l = s.shape
    pad = torch.cat([s.new_zeros(*lead, c, 1), s, s.new_zeros(*lead, c, c)], -1)  # (..., C, L + C + 1)
    return pad.reshape(*lead, c * (l + c + 1))[..., : c * (l + c)].reshape(*lead, c, l + c)


def masked_softmax(logits: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last dim where mask (0/1, broadcastable) is 1; masked entries get exactly 0."""
    return torch.softmax(logits * mask + (mask - 1.0) * NEG, -1)


class _Synthesizer(Mixer):
    """Shared forms; subclasses define `_scores(x) -> (B, H, T, L)` in slot order (slot j = lag L-1-j)."""

    fp32_params = ()

    def __init__(self, d_model: int, n_heads: int = 2, max_len: int = 64, window: int | None = None) -> None:
        super().__init__()
        window = max_len if window is None else window
        if not 1 <= window <= max_len:
            raise ValueError(f"{self.family}: window must be in 1..max_len={max_len} (slots beyond max_len hold "
                             f"values no score can reach), got {window}")
        self.n_heads, self.max_len, self.window = n_heads, max_len, window
        self.head_dim = d_model // n_heads
        inner = n_heads * self.head_dim
        self.v_proj, self.o_proj = nn.Linear(d_model, inner, bias=False), nn.Linear(inner, d_model, bias=False)
        self.exact = window == max_len  # per instance: a truncated ring buffer is an approximation

    def _scores(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def state_slots(self, batch: int) -> list[StateSlot]:
        note = "" if self.exact else (f"ring buffer keeps {self.window} of the model's {self.max_len} lags; "
                                      "see report() for the dropped attention mass")
        w, inner = self.window, self.n_heads * self.head_dim
        return [StateSlot("values", (batch, w, inner), exact=self.exact, note=note),
                StateSlot("valid", (batch, w), exact=self.exact, note=note)]

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        bsz, t, _ = x.shape
        l, w = self.max_len, self.window
        v, s = self.v_proj(x), self._scores(x)  # (B, T, inner), (B, H, T, L)
        buf, valid = state  # (B, W, inner), (B, W)
        ctx, cval = buf, valid  # widened to (B, L, inner), (B, L) below when the ring buffer is truncated; oldest first
        if w < l:
            ctx = torch.cat([buf.new_zeros(bsz, l - w, buf.shape[2]), buf], 1)
            cval = torch.cat([valid.new_zeros(bsz, l - w), valid], 1)
        outs = []
        for a, b in chunks(t, min(chunk_size or t, MAX_CHUNK)):
            c = b - a
            ext = torch.cat([ctx, v[:, a:b]], 1)  # (B, L + C, inner): token i sits at L + i
            ev = torch.cat([cval, x.new_ones(bsz, c)], 1)  # (B, L + C)
            mask = skew(x.new_ones(c, l)) * ev[:, None, None, :]  # (B, 1, C, L + C): lags 0..L-1, filled
            p = masked_softmax(skew(s[:, :, a:b]), mask)  # (B, H, C, L + C)
            outs.append(p @ heads(ext, self.n_heads))  # (B, H, C, Dh)
            ctx, cval = ext[:, c:], ev[:, c:]
        o = self.o_proj(merge_heads(torch.cat(outs, 2)))
        return o, (ctx[:, l - w:], cval[:, l - w:])

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        buf, valid = state
        buf = torch.cat([buf[:, 1:], self.v_proj(x)[:, None]], 1)  # (B, W, inner), newest last
        valid = torch.cat([valid[:, 1:], x.new_ones(x.shape[0], 1)], 1)  # (B, W)
        s = self._scores(x[:, None])[:, :, 0, self.max_len - self.window:]  # (B, H, W): lags W-1..0
        p = masked_softmax(s, valid[:, None])  # (B, H, W)
        o = p[:, :, None] @ heads(buf, self.n_heads)  # (B, H, 1, Dh)
        return self.o_proj(merge_heads(o))[:, 0], (buf, valid)

    def probs(self, x: Tensor) -> Tensor:
        """The exact model's attention weights, explicit (T, T) form. x: (B, T, D) -> (B, H, T, T)."""
        t, l = x.shape[1], self.max_len
        i = torch.arange(t, device=x.device)
        lag = i[:, None] - i[None, :]  # (T, T)
        slot = (l - 1 - lag).clamp(0, l - 1).expand(*x.shape[:1], self.n_heads, t, t)
        logits = torch.gather(self._scores(x), -1, slot)  # (B, H, T, T): scores_t[lag t - s]
        return torch.softmax(logits.masked_fill((lag < 0) | (lag >= l), float("-inf")), -1)

    def naive(self, x: Tensor) -> Tensor:
        return self.o_proj(merge_heads(self.probs(x) @ heads(self.v_proj(x), self.n_heads)))

    @torch.no_grad()
    def dropped_mass(self, x: Tensor) -> Tensor:
        """Softmax mass at lags >= window (what the truncated ring buffer drops), per query. -> (B, H, T)."""
        t = x.shape[1]
        i = torch.arange(t, device=x.device)
        far = ((i[:, None] - i[None, :]) >= self.window).to(x.dtype)  # (T, T)
        return (self.probs(x) * far).sum(-1)

    @torch.no_grad()
    def report(self, x: Tensor | None = None) -> dict[str, float | str]:
        """Window figures; the dropped softmax mass is measured on x (default: seeded N(0, 1), 256 tokens)."""
        out: dict[str, float | str] = {"max_len": float(self.max_len), "window": float(self.window),
                                       "exact": "yes" if self.exact else "no (truncated window)"}
        if self.exact:
            return out | {"dropped_mass_mean": 0.0, "dropped_mass_max": 0.0}
        source = "calibration input" if x is not None else "seeded N(0,1) input"
        if x is None:
            x = torch.randn(1, 256, self.v_proj.in_features, generator=torch.Generator().manual_seed(0))
        m = self.dropped_mass(x.to(self.v_proj.weight))
        return out | {"dropped_mass_mean": float(m.mean()), "dropped_mass_max": float(m.max()),
                      "measured_on": f"{source}, {x.shape[1]} tokens"}


@MIXERS.register("synthesizer_dense")
class DenseSynthesizer(_Synthesizer):
    """Dense Synthesizer: a per-token two-layer MLP synthesizes the H x L lag scores."""

    family = "synthesizer_dense"

    def __init__(self, d_model: int, n_heads: int = 2, max_len: int = 64, window: int | None = None,
                 hidden: int | None = None) -> None:
        super().__init__(d_model, n_heads, max_len, window)
        self.w1 = nn.Linear(d_model, hidden or d_model)
        self.w2 = nn.Linear(hidden or d_model, n_heads * max_len)

    def _scores(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        s = self.w2(F.relu(self.w1(x)))  # (B, T, H * L)
        return s.view(b, t, self.n_heads, self.max_len).transpose(1, 2)  # (B, H, T, L)


@MIXERS.register("synthesizer_random")
class RandomSynthesizer(_Synthesizer):
    """Factorized Random Synthesizer: learned input-independent lag scores A B^T of rank `rank`."""

    family = "synthesizer_random"

    def __init__(self, d_model: int, n_heads: int = 2, max_len: int = 64, window: int | None = None,
                 rank: int = 8) -> None:
        super().__init__(d_model, n_heads, max_len, window)
        self.a = nn.Parameter(torch.randn(n_heads, rank) / math.sqrt(rank))  # (H, r)
        self.b = nn.Parameter(torch.randn(max_len, rank))  # (L, r)

    def _scores(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        r = self.a @ self.b.transpose(0, 1)  # (H, L)
        return r[None, :, None, :].expand(b, self.n_heads, t, self.max_len)  # (B, H, T, L)
