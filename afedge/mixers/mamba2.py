"""Mamba-2 SSD mixer (Dao & Gu 2024), parameter layout of Hugging Face `Mamba2Mixer`.

    z, xBC, dt = in_proj(x)                            # (E,), (E + 2GN,), (H,); E = expand * d_model = H * P
    x, B, C = silu(causal_depthwise_conv(xBC))         # (H, P), (G, N), (G, N); head h reads group h // (H / G)
    dt    = softplus(dt + dt_bias)                     # (H,)
    h_t   = exp(dt * A) * h_{t-1} + dt * x B^T         # (H, P, N), scalar A = -exp(A_log) < 0 per head
    y     = out_proj(rmsnorm_G((h_t C + D * x) * silu(z)) * norm.weight)   # RMS over E / G channels per group

State: `conv` (B, E + 2GN, d_conv - 1), the last d_conv - 1 conv inputs (HF's cache keeps d_conv columns; map it
with `[..., 1:]`), and `ssm` (B, H, P, N), laid out like HF's recurrent state.

Parallel form: chunked scan over segment sums of the log-decays dt * A (exponentials of non-positive numbers only),
carrying the ssm state across chunks. `chunk_size=None` means the module's `chunk_size` (default 64), not one chunk
of T: the intra-chunk decay tensor grows as L^2, so one chunk of T is neither cheap nor more exact.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.mamba import _MIN_LOG_DECAY, causal_conv, causal_mask, conv_step, softplus
from afedge.state import StateSlot


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) over groups of `group_size` channels, times `weight` (HF `MambaRMSNormGated`)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.group_size, self.eps = group_size, eps
        self.register_buffer("avg", torch.full((group_size, 1), 1.0 / group_size), persistent=False)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z: (..., D)."""
        g = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))  # (..., G, D / G)
        g = g * torch.rsqrt((g * g) @ self.avg + self.eps)  # mean as a matmul: XNNPACK takes it, not mean.dim
        return g.flatten(-2) * self.weight


@MIXERS.register("mamba2")
class Mamba2(Mixer):
    family = "mamba2"
    fp32_params = ("A_log", "D", "dt_bias", "conv1d", "norm")

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, head_dim: int = 16,
                 n_groups: int = 1, conv_bias: bool = True, bias: bool = False, norm_eps: float = 1e-5,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_limit: tuple[float, float] = (0.0, math.inf),
                 chunk_size: int = 64) -> None:
        super().__init__()
        self.d_inner = e = expand * d_model
        if e % head_dim or (e // head_dim) % n_groups:
            raise ValueError(f"mamba2: expand * d_model ({e}) must split into heads of {head_dim}, "
                             f"and the heads into n_groups={n_groups}")
        self.n_heads = h = e // head_dim
        self.head_dim, self.n_groups = head_dim, n_groups
        self.d_state, self.d_conv, self.dt_limit = d_state, d_conv, tuple(dt_limit)
        self.conv_dim = e + 2 * n_groups * d_state
        self.chunk_size = chunk_size  # used when a call passes chunk_size=None
        self.in_proj = nn.Linear(d_model, e + self.conv_dim + h, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1 of dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.norm = GatedRMSNorm(e, e // n_groups, norm_eps)
        self.D = nn.Parameter(torch.ones(h))
        self.out_proj = nn.Linear(e, d_model, bias=bias)
        self.register_buffer("tril", torch.ones(chunk_size, chunk_size).tril(), persistent=False)

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("conv", (batch, self.conv_dim, self.d_conv - 1), note="last d_conv-1 conv inputs"),
                StateSlot("ssm", (batch, self.n_heads, self.head_dim, self.d_state))]

    def _dt(self, dt: Tensor) -> Tensor:
        dt = softplus(dt + self.dt_bias)
        return dt if self.dt_limit == (0.0, math.inf) else dt.clamp(*self.dt_limit)

    def _split(self, x: Tensor, conv: Tensor) -> tuple[Tensor, ...]:
        """x: (B, T, D) -> z (B, T, E), x (B, T, E), B, C (B, T, G*N), dt (B, T, H), new conv state."""
        e, gn, cd = self.d_inner, self.n_groups * self.d_state, self.conv_dim
        p = self.in_proj(x)
        xbc, conv = causal_conv(p[..., e:e + cd], conv, self.conv1d.weight, self.conv1d.bias)
        return p[..., :e], xbc[..., :e], xbc[..., e:e + gn], xbc[..., e + gn:cd], self._dt(p[..., e + cd:]), conv

    def _scan_chunk(self, x: Tensor, dt: Tensor, b: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """SSD on one chunk. x: (B, L, E), dt: (B, L, H), b, c: (B, L, G*N), h: (B, H, P, N) -> y (B, L, E), h."""
        bs, l, _ = x.shape
        nh, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        hg = nh // g  # heads per group
        mask = causal_mask(self.tril, l, x)  # (L, L)
        cum = (mask @ (dt * -torch.exp(self.A_log))).transpose(1, 2)  # (B, H, L) inclusive cumsum of log-decays
        seg = (cum[..., :, None] - cum[..., None, :]).clamp(_MIN_LOG_DECAY, 0.0)
        decay = (torch.exp(seg) * mask).view(bs, g, hg, l, l)  # exp(cum[t] - cum[s]) for s <= t
        b = b.view(bs, l, g, n).transpose(1, 2)[:, :, None]  # (B, G, 1, L, N)
        c = c.view(bs, l, g, n).transpose(1, 2)[:, :, None]
        xdt = (x.view(bs, l, nh, p) * dt[..., None]).transpose(1, 2).reshape(bs, g, hg, l, p)
        hh = h.view(bs, g, hg, p, n)
        y = (c @ b.transpose(-1, -2) * decay) @ xdt  # intra-chunk, (B, G, Hg, L, P)
        y = y + (c @ hh.transpose(-1, -2)) * torch.exp(cum).reshape(bs, g, hg, l, 1)  # from the carried state
        w_last = decay[..., l - 1:l, :].transpose(-1, -2)  # (B, G, Hg, L, 1): exp(cum[L-1] - cum[s])
        hh = torch.exp(cum[..., l - 1:l]).reshape(bs, g, hg, 1, 1) * hh + (xdt * w_last).transpose(-1, -2) @ b
        return y.view(bs, nh, l, p).transpose(1, 2).reshape(bs, l, nh * p), hh.view(bs, nh, p, n)

    def _skip(self, y: Tensor, x: Tensor) -> Tensor:
        """y + D * x per head. y, x: (..., E)."""
        return y + (x.unflatten(-1, (self.n_heads, self.head_dim)) * self.D[:, None]).flatten(-2)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        conv, h = state
        z, xs, b, c, dt, conv = self._split(x, conv)
        ys = []
        for s, t in chunks(x.shape[1], chunk_size or self.chunk_size):
            y, h = self._scan_chunk(xs[:, s:t], dt[:, s:t], b[:, s:t], c[:, s:t], h)
            ys.append(y)
        return self.out_proj(self.norm(self._skip(torch.cat(ys, 1), xs), z)), (conv, h)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        conv, h = state
        bs, e, cd = x.shape[0], self.d_inner, self.conv_dim
        nh, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        gn = g * n
        proj = self.in_proj(x)  # (B, E + conv_dim + H)
        xbc, conv = conv_step(proj[:, e:e + cd], conv, self.conv1d.weight, self.conv1d.bias)  # (B, conv_dim)
        xs, b, c = xbc[:, :e], xbc[:, e:e + gn], xbc[:, e + gn:cd]
        dt = self._dt(proj[:, e + cd:])  # (B, H)
        xdt = (xs.view(bs, nh, p) * dt.view(bs, nh, 1)).view(bs, g, nh // g * p, 1)
        h = torch.exp(dt * -torch.exp(self.A_log)).view(bs, nh, 1, 1) * h \
            + (xdt * b.view(bs, g, 1, n)).view(bs, nh, p, n)  # (B, H, P, N)
        y = torch.bmm(h.view(bs * g, nh // g * p, n), c.reshape(bs * g, n, 1)).view(bs, e)
        return self.out_proj(self.norm(self._skip(y, xs), proj[:, :e])), (conv, h)

    def naive(self, x: Tensor) -> Tensor:
        bs, t, _ = x.shape
        e, cd, nh, p, n = self.d_inner, self.conv_dim, self.n_heads, self.head_dim, self.d_state
        proj = self.in_proj(x)
        z, xbc, dt = proj[..., :e], proj[..., e:e + cd], proj[..., e + cd:]
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :t]).transpose(1, 2)
        xs = xbc[..., :e].reshape(bs, t, nh, p)
        b, c = (u.reshape(bs, t, self.n_groups, n).repeat_interleave(nh // self.n_groups, dim=2)
                for u in xbc[..., e:].chunk(2, dim=-1))  # (B, T, H, N)
        dt = F.softplus(dt + self.dt_bias).clamp(*self.dt_limit)
        a = -torch.exp(self.A_log)
        h, ys = x.new_zeros(bs, nh, p, n), []
        for i in range(t):
            da = torch.exp(dt[:, i] * a)[..., None, None]
            h = da * h + (dt[:, i, :, None] * xs[:, i])[..., None] * b[:, i, :, None, :]
            ys.append((h * c[:, i, :, None, :]).sum(-1) + self.D[:, None] * xs[:, i])  # (B, H, P)
        y = torch.stack(ys, 1).reshape(bs, t, e)
        gated = (y * F.silu(z)).reshape(bs, t, self.n_groups, -1)
        gated = gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        return self.out_proj(gated.reshape(bs, t, e) * self.norm.weight)
