"""Mega's multi-dimensional damped EMA (Ma et al. 2023, "Mega: Moving Average Equipped Gated Attention").

Per channel d, an n-dimensional EMA with alpha, delta in (0, 1) (sigmoid-parametrised), expansion beta, readout eta:

    h_t = alpha beta x_t + (1 - alpha delta) h_{t-1}        (elementwise over the n dims)
    ema_t = silu(eta . h_t / sqrt(n) + omega x_t)

i.e. ema = silu(K * x + omega x) with K_l = sum_n eta_n alpha_n beta_n q_n^l / sqrt(n), q = 1 - alpha delta.
The gated unit around it follows Mega's single-head gate with the attention left out: equivalently Mega-chunk
with chunk size 1, where each token attends only to itself so the attention output is v itself. So:

    v = silu(W_v x);  u, r, hx = split(W_mx ema);  h = silu(hx + W_h(v * silu(r)));  out = sigmoid(u) * (h - x)

Mega's block ends with x + sigmoid(u) (h - x); the afedge block adds x back, so the mixer returns the update only.

Forms: chunked = kernel materialised from the parameters, (C x C) causal Toeplitz per chunk (no FFT: see s4d.py),
plus the carried state read out through q^(i+1), plus the state update; `chunk_size=None` uses one FFT conv
(eager only). `step` is the recurrence, `naive` the literal recurrence in a Python loop.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.s4d import fft_causal_conv, toeplitz_conv
from afedge.state import StateSlot


@MIXERS.register("mega")
class Mega(Mixer):
    family = "mega"
    fp32_params = ("alpha", "delta", "beta", "eta")

    def __init__(self, d_model: int, ndim: int = 16, hdim: int | None = None) -> None:
        super().__init__()
        d, self.ndim, self.hdim = d_model, ndim, hdim or 2 * d_model
        self.d_model = d
        self.alpha = nn.Parameter(torch.randn(d, ndim) * 0.2)  # sigmoid -> EMA weight
        self.delta = nn.Parameter(torch.randn(d, ndim) * 0.2)  # sigmoid -> damping
        sign = torch.tensor([1.0 if i % 2 == 0 else -1.0 for i in range(ndim)])  # Mega's [1, -1, 1, ...]
        self.beta = nn.Parameter(torch.randn(d, ndim) * 0.02 + sign)
        self.eta = nn.Parameter(torch.randn(d, ndim))
        self.omega = nn.Parameter(torch.randn(d))
        self.v_proj = nn.Linear(d, self.hdim)
        self.mx_proj = nn.Linear(d, d + self.hdim + d)  # update gate u, reset gate r, hx
        self.h_proj = nn.Linear(self.hdim, d)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("ema", (batch, self.d_model, self.ndim))]

    def _coeffs(self) -> tuple[Tensor, Tensor, Tensor]:
        """Input weight alpha*beta, log q = log(1 - alpha*delta) and readout eta/sqrt(n), each (D, n)."""
        a, dl = torch.sigmoid(self.alpha), torch.sigmoid(self.delta)
        return a * self.beta, torch.log(1.0 - a * dl), self.eta * (1.0 / math.sqrt(self.ndim))

    def _gate(self, x: Tensor, ema: Tensor) -> Tensor:
        """x, ema (pre-activation): (..., D) -> (..., D)."""
        v = F.silu(self.v_proj(x))
        u, r, hx = self.mx_proj(F.silu(ema)).split([self.d_model, self.hdim, self.d_model], dim=-1)
        h = F.silu(hx + self.h_proj(v * F.silu(r)))
        return torch.sigmoid(u) * (h - x)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        (s,) = state  # (B, D, n)
        u = x.transpose(1, 2)  # (B, D, T)
        w_in, log_q, w_out = self._coeffs()
        t = x.shape[1]
        c = t if chunk_size is None else min(chunk_size, t)
        lag = torch.arange(c + 1, dtype=x.dtype, device=x.device)
        q_pow = torch.exp(lag * log_q[..., None])  # q^l, l = 0..C: (D, n, C+1)
        k = (w_in * w_out)[..., None].mul(q_pow[..., :c]).sum(1)  # (D, C)
        outs = []
        for a, b in chunks(t, chunk_size):
            uc, n = u[:, :, a:b], b - a
            conv = fft_causal_conv(uc, k) if chunk_size is None else toeplitz_conv(uc, k[:, :n])
            outs.append(conv + torch.einsum("dnc,bdn->bdc", w_out[..., None] * q_pow[..., 1:n + 1], s))
            q_rev = torch.exp((n - 1 - lag[:n]) * log_q[..., None])  # q^(n-1-j)
            s = q_pow[..., n] * s + torch.einsum("dnc,bdc->bdn", w_in[..., None] * q_rev, uc)
        y = torch.cat(outs, dim=2) + self.omega[:, None] * u
        return self._gate(x, y.transpose(1, 2)), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        (s,) = state
        w_in, log_q, w_out = self._coeffs()
        s = torch.exp(log_q) * s + w_in * x[..., None]
        return self._gate(x, (w_out * s).sum(-1) + self.omega * x), (s,)

    def naive(self, x: Tensor) -> Tensor:
        a, dl = torch.sigmoid(self.alpha), torch.sigmoid(self.delta)
        h, ys = torch.zeros(x.shape[0], self.d_model, self.ndim, dtype=x.dtype, device=x.device), []
        for t in range(x.shape[1]):
            h = a * self.beta * x[:, t, :, None] + (1 - a * dl) * h
            ys.append((self.eta * h).sum(-1) / math.sqrt(self.ndim) + self.omega * x[:, t])
        return self._gate(x, torch.stack(ys, 1))
