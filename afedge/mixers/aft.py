"""Attention Free Transformer (Zhai et al. 2021), causal: AFT-simple and AFT with a decaying position bias.

    y_t = sigmoid(q_t) * sum_{s<=t} e^{k_s + w_{t,s}} v_s / sum_{s<=t} e^{k_s + w_{t,s}},   out = W_o y
per channel. "aft_simple": w_{t,s} = 0 (a running softmax over the past). "aft_decay": w_{t,s} = -(t-s) lambda_c with
a learned rate lambda_c = exp(log_decay_c) > 0 per channel, which is what makes the bias an exact recurrence.

Both are the RWKV-4 WKV average with (w, u) = (lambda, lambda): scaling every weight of y_t by e^lambda gives
WKV's e^{-(t-1-s) lambda + k_s} for s < t and e^{lambda + k_t} for s = t, so the kernels and the stable state
(num, den, max with the running max subtracted, max starting at -1e38) come from afedge/mixers/rwkv4.py.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State
from afedge.mixers.rwkv4 import NEG, wkv_naive, wkv_parallel, wkv_step
from afedge.state import StateSlot


@MIXERS.register("aft_simple")
class AFTSimple(Mixer):
    family = "aft_simple"

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.q_proj, self.k_proj = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d_model, d_model, bias=False), nn.Linear(d_model, d_model, bias=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        d = self.d_model
        return [StateSlot("num", (batch, d), note="sum e^(k - max) v"), StateSlot("den", (batch, d)),
                StateSlot("max", (batch, d), init=NEG, note="running max of the log-weights")]

    def rate(self, x: Tensor) -> Tensor:
        """The per-channel decay rate lambda (A,) in x's dtype and device: zero for AFT-simple (taken from x, not
        from a projection's weight, which a quantized copy stores as integers)."""
        return x.new_zeros(self.d_model)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        lam = self.rate(x)
        y, state = wkv_parallel(lam, lam, self.k_proj(x), self.v_proj(x), tuple(state), chunk_size)
        return self.o_proj(torch.sigmoid(self.q_proj(x)) * y), state

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        lam = self.rate(x)
        y, state = wkv_step(lam, lam, self.k_proj(x), self.v_proj(x), tuple(state))
        return self.o_proj(torch.sigmoid(self.q_proj(x)) * y), state

    def naive(self, x: Tensor) -> Tensor:
        """Literally the defining causal average (WKV's naive form with u = w = lambda)."""
        lam = self.rate(x)
        return self.o_proj(torch.sigmoid(self.q_proj(x)) * wkv_naive(lam, lam, self.k_proj(x), self.v_proj(x)))


@MIXERS.register("aft_decay")
class AFTDecay(AFTSimple):
    family = "aft_decay"
    fp32_params = ("log_decay",)

    def __init__(self, d_model: int, min_rate: float = 1e-3, max_rate: float = 1.0) -> None:
        super().__init__(d_model)
        # rates spread geometrically from max_rate (a window of ~1 token) to min_rate (~1000 tokens)
        self.log_decay = nn.Parameter(torch.linspace(math.log(max_rate), math.log(min_rate), d_model))

    def rate(self, x: Tensor) -> Tensor:
        return torch.exp(self.log_decay)
