"""Hyena operator of order 2 (Poli et al. 2023), with its long filters distilled into modal SSMs for `step`
(Massaroli et al. 2023, "Laughing Hyena Distillery").

    x0, x1, v = short_causal_conv(W_in x)             (depthwise, kernel 3)
    z = x1 * v;   y = W_out(x0 * (h * z + D z))         (h: implicit long filter, one per channel)

h_l = MLP(pos(l / max_len)) * exp(-|delta_d| l / max_len) for l < max_len (zero beyond): a small Sin-MLP on
positional features with an exponential-decay window, as in the reference `HyenaFilter`.

A long convolution has no exact constant-size recurrence. `distill()` fits, per channel, the lags l >= 1 of h by
`order` complex modes: h_l ~= Re sum_m R_m lambda_m^(l-1), |lambda_m| < 1 (a matrix-pencil fit of the poles, then
least squares for the residues; fp64, a few ms per channel). The lag-0 tap h_0 + D stays exact. So the
recurrent state per channel is `order` complex numbers (2 * order fp32), plus the short conv's last 2 inputs.

Forms, all sharing one rule: *inside* the current chunk the filter is the true h; everything before the chunk
reaches it through the distilled modal state.
  - `forward(chunk_size=None)` from the initial state is the true Hyena (one FFT long conv).
  - `forward(chunk_size=C)` (the exported prefill) is a (C x C) Toeplitz product with the true h (no FFT:
    see s4d.py) + the carried modal state read out + the state update; it hands step a state.
  - `step` is the chunk of one token: h_0 exact, every older lag distilled.
  - `naive` is the true Hyena by a direct causal convolution sum.
So `step` and the chunked form approximate the true operator to the distillation error (`report()`).
The modal buffers are a snapshot of the filter: call `distill()` again after training or changing the MLP.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.s4d import (direct_causal_conv, fft_causal_conv, modal_readout, modal_step, modal_update,
                               toeplitz_conv)
from afedge.state import StateSlot


class Sin(nn.Module):
    """sin(w x) with a learnable frequency per feature (the reference `Sin` activation)."""

    def __init__(self, dim: int, w: float = 1.0) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.full((dim,), w))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.freq * x)


def fit_modes(g: Tensor, order: int, rtol: float = 1e-13) -> tuple[Tensor, Tensor]:
    """Fit g_k ~= Re sum_m R_m lambda_m^k (k = 0..n-1) with at most `order` complex modes, |lambda| < 1.
    g: (n,) fp64 -> lambda, R: (order,) complex128, unused modes zero.

    Matrix pencil: the poles are the eigenvalues of the shift map on the leading right singular vectors of a
    Hankel matrix of g (window 16 * order lags, rows subsampled to ~512 for speed; rank <= 2 * order, cut where
    singular values drop below rtol * the largest); each conjugate pair is one mode, since Re(R lambda^k) covers
    both. Then least squares for the residues; if real poles leave more than `order` modes, the weakest are
    dropped and the residues refitted. No gradient refinement: fine for smooth filters, far from optimal for
    oscillatory ones (see `report()`)."""
    n = g.shape[0]
    p = min(16 * order, n // 3)
    hankel = g.unfold(0, p + 1, 1)  # (n - p, p + 1)
    _, sv, vh = torch.linalg.svd(hankel[::max(1, hankel.shape[0] // 512)], full_matrices=False)
    rank = max(1, min(2 * order, int((sv > rtol * sv[0]).sum())))
    v = vh[:rank].T  # (p + 1, rank)
    lam = torch.linalg.eigvals(torch.linalg.pinv(v[:-1]) @ v[1:])
    lam = lam[lam.imag >= -1e-12]
    mag = lam.abs()
    lam = lam * (mag.clamp(1e-12, 1 - 1e-6) / mag.clamp(min=1e-300))  # stable recurrence, finite log
    k = torch.arange(n, dtype=g.dtype)

    def powers(lam: Tensor) -> Tensor:  # (n, m)
        return torch.exp(k[:, None] * torch.log(lam)[None, :])

    def residues(lam: Tensor) -> Tensor:
        pw = powers(lam)
        sol = torch.linalg.lstsq(torch.cat([pw.real, -pw.imag], 1), g[:, None], driver="gelsd").solution[:, 0]
        return torch.complex(sol[:len(lam)], sol[len(lam):])

    res = residues(lam)
    if len(lam) > order:
        energy = (res[None, :] * powers(lam)).real.norm(dim=0)
        lam = lam[torch.argsort(energy, descending=True)[:order]]
        res = residues(lam)
    pad = torch.zeros(order - len(lam), dtype=lam.dtype)
    return torch.cat([lam, pad]), torch.cat([res, pad])


@MIXERS.register("hyena")
class Hyena(Mixer):
    family = "hyena"
    exact = False
    fp32_params = ("log_r", "theta", "residue", "deltas", "filter_mlp")  # the filter feeds the Toeplitz as is

    def __init__(self, d_model: int, max_len: int = 2048, order: int = 16, filter_width: int = 64,
                 emb_dim: int = 5, short_kernel: int = 3, fast_decay_pct: float = 0.3, slow_decay_pct: float = 1.5,
                 target: float = 1e-2) -> None:
        super().__init__()
        d = d_model
        self.d_model, self.max_len, self.order, self.emb_dim, self.k_short = d, max_len, order, emb_dim, short_kernel
        self.in_proj = nn.Linear(d, 3 * d)
        self.short_filter = nn.Conv1d(3 * d, 3 * d, short_kernel, groups=3 * d)  # causal by left padding
        self.filter_mlp = nn.Sequential(
            nn.Linear(emb_dim, filter_width), Sin(filter_width),
            nn.Linear(filter_width, filter_width), Sin(filter_width),
            nn.Linear(filter_width, filter_width), Sin(filter_width),
            nn.Linear(filter_width, d, bias=False))
        # decay window: |delta| from log(target)/slow (slowest) to log(target)/fast (fastest), in units of max_len
        self.register_buffer("deltas", torch.linspace(math.log(target) / slow_decay_pct,
                                                      math.log(target) / fast_decay_pct, d).abs())
        self.D = nn.Parameter(torch.randn(d))
        self.out_proj = nn.Linear(d, d)
        self.register_buffer("log_r", torch.zeros(d, order))  # the distilled modes, set by distill()
        self.register_buffer("theta", torch.zeros(d, order))
        self.register_buffer("residue", torch.zeros(d, order, 2))
        self.distill()

    # -- the implicit long filter ----------------------------------------------------------------------------
    def filter(self, n: int, mlp: nn.Module | None = None, deltas: Tensor | None = None) -> Tensor:
        """True filter h_l, l < n (zero from max_len on): (D, n). `mlp`, `deltas` override the module's."""
        mlp, deltas = mlp or self.filter_mlp, self.deltas if deltas is None else deltas
        m = min(n, self.max_len)
        dtype, dev = deltas.dtype, deltas.device
        t = torch.arange(m, dtype=dtype, device=dev)[:, None] / self.max_len  # (m, 1)
        bands = (self.emb_dim - 1) // 2
        f = torch.linspace(1e-4, bands - 1, bands, dtype=dtype, device=dev)
        w = 2 * math.pi * t * f  # (m, bands)
        z = torch.cat([t, torch.cos(w), -torch.sin(w)], dim=-1)  # (m, emb_dim): the reference exp(-i f w) features
        h = mlp(z).transpose(0, 1) * torch.exp(-t.transpose(0, 1) * deltas[:, None])  # (D, m)
        return F.pad(h, (0, n - m)) if n > m else h

    @torch.no_grad()
    def distill(self) -> None:
        """Fit the modal buffers to the current filter's lags 1..max_len-1 (filter and fit in fp64)."""
        g = copy.deepcopy(self.filter_mlp).double()
        h = self.filter(self.max_len, mlp=g, deltas=self.deltas.double())[:, 1:].cpu()
        lam, res = (torch.stack(t) for t in zip(*(fit_modes(hc, self.order) for hc in h)))  # (D, order)
        like = self.log_r
        self.log_r.copy_(lam.abs().log().clamp(min=-30.0).to(like))  # unused modes: lambda ~ 1e-13, R = 0
        self.theta.copy_(lam.angle().to(like))
        self.residue.copy_(torch.view_as_real(res).to(like))

    def distilled_filter(self, n: int) -> Tensor:
        """The filter `step` actually applies: h_0 exact, then Re sum_m R_m lambda_m^(l-1). (D, n)."""
        s = torch.zeros(1, self.d_model, self.order, 2, dtype=self.log_r.dtype, device=self.log_r.device)
        s = s + torch.stack([torch.ones_like(self.log_r), torch.zeros_like(self.log_r)], -1)  # unit impulse state
        tail = modal_readout(s, self.residue, self.log_r, self.theta, n - 1, 0)[0]
        return torch.cat([self.filter(1), tail], dim=1)

    def report(self) -> dict[str, float | str]:
        with torch.no_grad():
            h = self.filter(self.max_len).double()[:, 1:]
            err = (self.distilled_filter(self.max_len).double()[:, 1:] - h).norm(dim=1) / h.norm(dim=1)
            x = torch.randn(1, min(self.max_len, 1024), self.d_model, generator=torch.Generator().manual_seed(0))
            x = x.to(self.log_r.dtype)
            true = self._operator(x, self.filter(x.shape[1]))
            dist = self._operator(x, self.distilled_filter(x.shape[1]))  # what step computes, in parallel
            e2e = ((dist - true).abs().max() / true.abs().max()).item()
        return {"state": f"distilled modal SSM, order {self.order}", "distill_rel_l2_max": err.max().item(),
                "distill_rel_l2_mean": err.mean().item(), "step_vs_parallel_max_rel": e2e}

    # -- the operator ----------------------------------------------------------------------------------------
    def state_slots(self, batch: int) -> list[StateSlot]:
        note = f"distilled modal SSM, order {self.order}"
        return [StateSlot("conv", (batch, 3 * self.d_model, self.k_short - 1), note="short conv window"),
                StateSlot("ssm", (batch, self.d_model, self.order, 2), exact=False, note=note)]

    def _short(self, u: Tensor, win: Tensor) -> tuple[Tensor, Tensor]:
        """Causal depthwise conv continuing from `win`. u: (B, 3D, T), win: (B, 3D, K-1) -> (B, 3D, T), win."""
        t, k = u.shape[-1], self.k_short
        full = torch.cat([win, u], dim=-1)  # (B, 3D, K-1+T)
        w = self.short_filter.weight[:, 0]  # (3D, K)
        y = self.short_filter.bias[:, None] + w[:, 0:1] * full[..., 0:t]
        for i in range(1, k):
            y = y + w[:, i:i + 1] * full[..., i:i + t]
        return y, full[..., t:t + k - 1]

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, 3D, ...) -> x0, x1, v, by slicing (XNNPACK delegates slices, not split)."""
        d = self.d_model
        return u[:, :d], u[:, d:2 * d], u[:, 2 * d:]

    def _operator(self, x: Tensor, h: Tensor) -> Tensor:
        """Stateless operator with a given long filter, FFT conv. x: (B, T, D), h: (D, T)."""
        zero = torch.zeros(x.shape[0], 3 * self.d_model, self.k_short - 1, dtype=x.dtype, device=x.device)
        x0, x1, v = self._split(self._short(self.in_proj(x).transpose(1, 2), zero)[0])
        z = x1 * v
        return self.out_proj((x0 * (fft_causal_conv(z, h) + self.D[:, None] * z)).transpose(1, 2))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        win, s = state
        t = x.shape[1]
        uc, win = self._short(self.in_proj(x).transpose(1, 2), win)
        x0, x1, v = self._split(uc)  # (B, D, T) each
        z = x1 * v
        h = self.filter(t if chunk_size is None else min(chunk_size, t))
        outs = []
        for a, b in chunks(t, chunk_size):
            zc = z[:, :, a:b]
            conv = fft_causal_conv(zc, h) if chunk_size is None else toeplitz_conv(zc, h[:, :b - a])
            outs.append(conv + modal_readout(s, self.residue, self.log_r, self.theta, b - a, 0))
            s = modal_update(s, zc, self.log_r, self.theta)
        y = x0 * (torch.cat(outs, dim=2) + self.D[:, None] * z)
        return self.out_proj(y.transpose(1, 2)), (win, s)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        win, s = state
        uc, win = self._short(self.in_proj(x)[..., None], win)
        x0, x1, v = self._split(uc[..., 0])  # (B, D) each
        z = x1 * v
        past = (self.residue[..., 0] * s[..., 0] - self.residue[..., 1] * s[..., 1]).sum(-1)  # Re sum R s
        y = x0 * ((self.filter(1)[:, 0] + self.D) * z + past)
        return self.out_proj(y), (win, modal_step(s, z, self.log_r, self.theta))

    def naive(self, x: Tensor) -> Tensor:
        """True Hyena: direct short conv, then the direct long causal convolution sum."""
        t, k = x.shape[1], self.k_short
        u = F.conv1d(F.pad(self.in_proj(x).transpose(1, 2), (k - 1, 0)), self.short_filter.weight,
                     self.short_filter.bias, groups=3 * self.d_model)
        x0, x1, v = self._split(u)
        z = x1 * v
        y = x0 * (direct_causal_conv(z, self.filter(t)) + self.D[:, None] * z)
        return self.out_proj(y.transpose(1, 2))
