"""Mamba (S6) selective state space mixer (Gu & Dao 2023), parameter layout of Hugging Face `MambaMixer`.

    xs, z = in_proj(x)                                 # (E,) each, E = expand * d_model
    u     = silu(causal_depthwise_conv(xs))            # kernel d_conv
    dt, B, C = x_proj(u)                               # (R,), (N,), (N,)
    dt    = softplus(dt_proj(dt))                      # (E,)
    h_t   = exp(dt * A) * h_{t-1} + (dt * u) B^T       # (E, N), A = -exp(A_log) < 0
    y     = out_proj((h_t C + D * u) * silu(z))

`bcdt_rms_eps` set (FalconMamba): dt (before dt_proj), B and C each pass a weightless RMS norm with that eps.

State: `conv` (B, E, d_conv - 1) holds the last d_conv - 1 conv inputs (HF's cache keeps d_conv columns, the oldest
one stale; map it with `hf_conv_state[..., 1:]`), `ssm` (B, E, N).

Parallel form: chunked scan over segment sums of the log-decays dt * A (exponentials of non-positive numbers only),
carrying the ssm state across chunks. `chunk_size=None` means the module's `chunk_size` (default 64), not one chunk
of T: the intra-chunk decay tensor grows as L^2, so one chunk of T is neither cheap nor more exact.
`scan="sequential"` runs the recurrence itself inside each chunk instead (exp(dt A) and (dt u) B^T batched over the
chunk, then L multiply-adds): no L^2 work, the faster form on CPU runtimes (benchmarks/prefill_sweep.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import tril_ones
from afedge.state import StateSlot

# Log-decays are clamped to [-60, 0] before exp: exp(-60) ~ 1e-26 is nothing next to the terms that matter, and it
# keeps exp off its slow underflow path (3-4x slower for large negative arguments) and away from denormals.
_MIN_LOG_DECAY = -60.0
SCANS = ("segsum", "sequential")  # how the chunked parallel form scans inside a chunk (see the module docstring)


def softplus(u: Tensor) -> Tensor:
    """softplus(u) = relu(u) + log(exp(-|u|) + 1): exact, stable, and fully XNNPACK-delegable (no log1p/where)."""
    return torch.relu(u) + torch.log(torch.exp(-torch.abs(u)) + 1.0)


def causal_mask(tril: Tensor, l: int, like: Tensor) -> Tensor:
    """(L, L) lower-triangular 0/1 mask, sliced from a stored buffer when it is big enough (a constant in exported
    graphs, where building it in-graph leaves arange/le/where on portable kernels)."""
    return tril[:l, :l].to(like.dtype) if l <= tril.shape[0] else tril_ones(l, like)


def causal_conv(x: Tensor, conv: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over time with a carried window.

    x: (B, T, E), conv: (B, E, K-1) previous inputs, weight: (E, 1, K) -> silu(conv(x)): (B, T, E), new conv state.
    """
    t = x.shape[1]
    xpad = torch.cat([conv, x.transpose(1, 2)], dim=-1)  # (B, E, K-1+T)
    y = F.conv1d(xpad, weight, bias, groups=x.shape[-1])  # (B, E, T)
    return F.silu(y).transpose(1, 2), xpad[:, :, t:]


def conv_step(x: Tensor, conv: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """One token of `causal_conv`, as a bmm so XNNPACK takes it. x: (B, E), conv: (B, E, K-1) -> (B, E), state."""
    b, e = x.shape
    k = weight.shape[-1]
    win = torch.cat([conv, x.view(b, e, 1)], dim=-1)  # (B, E, K)
    y = torch.bmm(win.permute(1, 0, 2), weight.view(e, k, 1)).view(e, b).permute(1, 0)  # (B, E)
    if bias is not None:
        y = y + bias
    return F.silu(y), win[:, :, 1:]


@MIXERS.register("mamba")
class Mamba(Mixer):
    family = "mamba"
    fp32_params = ("A_log", "D", "dt_proj", "conv1d")

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", conv_bias: bool = True, bias: bool = False,
                 dt_min: float = 1e-3, dt_max: float = 0.1, chunk_size: int = 64,
                 bcdt_rms_eps: float | None = None, scan: str = "segsum") -> None:
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"mamba: scan must be one of {SCANS}, got '{scan}'")
        self.scan = scan
        self.d_state, self.d_conv = d_state, d_conv
        self.d_inner = e = expand * d_model
        self.dt_rank = r = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size  # used when a call passes chunk_size=None (one chunk of T is O(T^2 E N))
        self.bcdt_rms_eps = bcdt_rms_eps
        self.in_proj = nn.Linear(d_model, 2 * e, bias=bias)
        self.conv1d = nn.Conv1d(e, e, d_conv, groups=e, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(e, r + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(r, e, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(e, 1))
        self.D = nn.Parameter(torch.ones(e))
        self.out_proj = nn.Linear(e, d_model, bias=bias)
        self.register_buffer("tril", torch.ones(chunk_size, chunk_size).tril(), persistent=False)
        if bcdt_rms_eps is not None:  # means over the last dim as matmuls (XNNPACK takes them, not mean.dim)
            self.register_buffer("avg_dt", torch.full((r, 1), 1.0 / r), persistent=False)
            self.register_buffer("avg_bc", torch.full((d_state, 1), 1.0 / d_state), persistent=False)
        with torch.no_grad():  # HF init: dt = softplus(bias) log-uniform in [dt_min, dt_max]
            nn.init.uniform_(self.dt_proj.weight, -r ** -0.5, r ** -0.5)
            dt = torch.exp(torch.rand(e) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("conv", (batch, self.d_inner, self.d_conv - 1), note="last d_conv-1 conv inputs"),
                StateSlot("ssm", (batch, self.d_inner, self.d_state))]

    def _rms(self, x: Tensor, avg: Tensor) -> Tensor:
        """Weightless RMS norm over the last dim. x: (..., K), avg: (K, 1) of 1/K."""
        return x * torch.rsqrt((x * x) @ avg + self.bcdt_rms_eps)

    def _ssm_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (..., E) -> dt (..., E), B (..., N), C (..., N)."""
        r, n = self.dt_rank, self.d_state
        dbc = self.x_proj(u)
        dt, b, c = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:r + 2 * n]
        if self.bcdt_rms_eps is not None:
            dt, b, c = self._rms(dt, self.avg_dt), self._rms(b, self.avg_bc), self._rms(c, self.avg_bc)
        return softplus(self.dt_proj(dt)), b, c

    def _scan_chunk(self, u: Tensor, dt: Tensor, b: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """Selective scan of one chunk with segment sums. u, dt: (B, L, E), b, c: (B, L, N), h: (B, E, N)."""
        bs, l, e = u.shape
        n = self.d_state
        a = dt[..., None] * -torch.exp(self.A_log)  # (B, L, E, N), <= 0
        mask = causal_mask(self.tril, l, u)  # (L, L)
        cum = (mask @ a.reshape(bs, l, e * n)).view(bs, l, e, n)  # inclusive cumsum over the chunk
        seg = (cum[:, :, None] - cum[:, None, :]).clamp(_MIN_LOG_DECAY, 0.0)  # (B, L_t, L_s, E, N)
        decay = torch.exp(seg) * mask[:, :, None, None]  # exp(cum[t] - cum[s]) for s <= t, else 0
        xdt = u * dt  # (B, L, E)
        cb = (c[:, :, None, :] * b[:, None, :, :]).view(bs, l, l, n, 1)  # (B, L_t, L_s, N, 1)
        w = (decay @ cb).view(bs, l, l, e)  # (B, L_t, L_s, E)
        y = (w * xdt[:, None]).sum(2)  # intra-chunk, (B, L, E)
        y = y + (torch.exp(cum) * h[:, None] @ c.view(bs, l, n, 1)).view(bs, l, e)  # from the carried state
        last = decay[:, l - 1:l].view(bs, l, e, n)  # exp(cum[L-1] - cum[s])
        h = torch.exp(cum[:, l - 1:l]).view(bs, e, n) * h + (last * xdt[..., None] * b[:, :, None, :]).sum(1)
        return y, h

    def _scan_sequential(self, u: Tensor, dt: Tensor, b: Tensor, c: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """The recurrence within one chunk (same math as `step`): decays and inputs batched over the chunk, then
        one multiply-add per token on (B, 1, E, N) slices (slices and cat, which XNNPACK takes; not select/stack).
        u, dt: (B, L, E), b, c: (B, L, N), h: (B, E, N)."""
        bs, l, e = u.shape
        n = self.d_state
        da = torch.exp(dt.view(bs, l, e, 1) * -torch.exp(self.A_log))  # (B, L, E, N)
        dbu = (u * dt).view(bs, l, e, 1) * b.view(bs, l, 1, n)  # (B, L, E, N)
        h, hs = h.reshape(bs, 1, e, n), []
        for t in range(l):
            h = da[:, t:t + 1] * h + dbu[:, t:t + 1]
            hs.append(h)
        y = torch.bmm(torch.cat(hs, 1).view(bs * l, e, n), c.reshape(bs * l, n, 1)).view(bs, l, e)
        return y, h.view(bs, e, n)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        conv, h = state
        e = self.d_inner
        xz = self.in_proj(x)  # (B, T, 2E)
        u, conv = causal_conv(xz[..., :e], conv, self.conv1d.weight, self.conv1d.bias)  # (B, T, E)
        dt, b, c = self._ssm_inputs(u)
        ys, scan = [], self._scan_chunk if self.scan == "segsum" else self._scan_sequential
        for s, t in chunks(x.shape[1], chunk_size or self.chunk_size):
            y, h = scan(u[:, s:t], dt[:, s:t], b[:, s:t], c[:, s:t], h)
            ys.append(y)
        y = (torch.cat(ys, 1) + u * self.D) * F.silu(xz[..., e:])
        return self.out_proj(y), (conv, h)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        conv, h = state
        bs, e, n = x.shape[0], self.d_inner, self.d_state
        xz = self.in_proj(x)  # (B, 2E)
        u, conv = conv_step(xz[:, :e], conv, self.conv1d.weight, self.conv1d.bias)  # (B, E)
        dt, b, c = self._ssm_inputs(u)
        da = torch.exp(dt.view(bs, e, 1) * -torch.exp(self.A_log))  # (B, E, N)
        h = da * h + (dt * u).view(bs, e, 1) * b.view(bs, 1, n)
        y = torch.bmm(h, c.view(bs, n, 1)).view(bs, e) + u * self.D
        return self.out_proj(y * F.silu(xz[:, e:])), (conv, h)

    def naive(self, x: Tensor) -> Tensor:
        bs, t, _ = x.shape
        e = self.d_inner
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(xs.transpose(1, 2))[..., :t]).transpose(1, 2)  # (B, T, E)
        r, n = self.dt_rank, self.d_state
        dbc = self.x_proj(u)
        dt, b, c = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
        if self.bcdt_rms_eps is not None:
            dt, b, c = (v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + self.bcdt_rms_eps) for v in (dt, b, c))
        dt = F.softplus(self.dt_proj(dt))
        a = -torch.exp(self.A_log)  # (E, N)
        h = x.new_zeros(bs, e, n)
        ys = []
        for i in range(t):
            h = torch.exp(dt[:, i, :, None] * a) * h + (dt[:, i] * u[:, i])[..., None] * b[:, i, None, :]
            ys.append((h * c[:, i, None, :]).sum(-1))
        y = (torch.stack(ys, 1) + u * self.D) * F.silu(z)
        return self.out_proj(y)
