"""S4D, the diagonal state-space model (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal
State Space Models"): per channel h, N/2 complex modes A_n = -exp(log_A_real) + i A_imag, ZOH discretisation
with step exp(log_dt), D skip, then GELU and a GLU output projection, as in the reference `S4D` block.

    dA = exp(dt A),  C' = C (dA - 1) / A             (B = 1 folded into C')
    s_t = dA s_{t-1} + u_t,   y_t = 2 Re(C' . s_t) + D u_t,   i.e. y = K * u + D u with K_l = 2 Re(C' . dA^l)

Exported graphs cannot carry complex dtypes, so every complex tensor is a real pair: the state is (B, H, N/2, 2)
(real, imag) and the powers dA^k are exp(k Re(dt A)) (cos, sin)(k Im(dt A)) with k >= 0, stable in fp32 for any k.

Forms: `forward(chunk_size=None)` is one FFT convolution over the whole sequence (eager / training). With a
chunk size (what the exported prefill uses) each chunk is a (C x C) causal Toeplitz product with the kernel
materialised from the parameters, plus the carried state read out through dA^(i+1), plus the state update.
No FFT there on purpose: ExecuTorch/XNNPACK and TVM have no FFT op and ONNX DFT support is spotty across
runtimes, while the Toeplitz chunk is plain (batched) matmuls that every backend delegates.

The complex-mode helpers below (`modal_*`, `causal_toeplitz`, `fft_causal_conv`) are also used by the Hyena
distillation, whose recurrent form is an S4D-like modal SSM.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers.base import MIXERS, Mixer, State, chunks
from afedge.mixers.ops import tril_ones
from afedge.state import StateSlot


def modal_powers(log_r: Tensor, theta: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of lambda^k, lambda = exp(log_r + i theta), log_r <= 0, k >= 0.
    log_r, theta: (H, M), k: (n,) -> (H, M, n) each."""
    mag = torch.exp(k * log_r[..., None])
    ang = k * theta[..., None]
    return mag * torch.cos(ang), mag * torch.sin(ang)


def modal_readout(s: Tensor, c: Tensor, log_r: Tensor, theta: Tensor, n: int, start: int) -> Tensor:
    """Re sum_m c_m lambda_m^(start + i) s_m for i < n. s: (B, H, M, 2), c: (H, M, 2) -> (B, H, n)."""
    k = torch.arange(start, start + n, dtype=s.dtype, device=s.device)
    pr, pi = modal_powers(log_r, theta, k)
    cr, ci = c[..., 0:1], c[..., 1:2]
    wr, wi = cr * pr - ci * pi, cr * pi + ci * pr  # c lambda^k, (H, M, n)
    return torch.einsum("hmn,bhm->bhn", wr, s[..., 0]) - torch.einsum("hmn,bhm->bhn", wi, s[..., 1])


def modal_update(s: Tensor, u: Tensor, log_r: Tensor, theta: Tensor) -> Tensor:
    """State after a chunk: lambda^C s + sum_j lambda^(C-1-j) u_j. s: (B, H, M, 2), u: (B, H, C) -> s."""
    c = u.shape[-1]
    k = torch.arange(c, dtype=u.dtype, device=u.device)
    pr, pi = modal_powers(log_r, theta, (c - 1) - k)  # (H, M, C)
    lr, li = modal_powers(log_r, theta, k[:1] + c)  # lambda^C, (H, M, 1)
    sr, si = s[..., 0], s[..., 1]
    new_r = lr[..., 0] * sr - li[..., 0] * si + torch.einsum("hmc,bhc->bhm", pr, u)
    new_i = lr[..., 0] * si + li[..., 0] * sr + torch.einsum("hmc,bhc->bhm", pi, u)
    return torch.stack([new_r, new_i], dim=-1)


def modal_step(s: Tensor, u: Tensor, log_r: Tensor, theta: Tensor) -> Tensor:
    """One token: lambda s + u. s: (B, H, M, 2), u: (B, H) -> s."""
    mag = torch.exp(log_r)
    lr, li = mag * torch.cos(theta), mag * torch.sin(theta)  # (H, M)
    sr, si = s[..., 0], s[..., 1]
    return torch.stack([lr * sr - li * si + u[..., None], lr * si + li * sr], dim=-1)


def causal_toeplitz(k: Tensor) -> Tensor:
    """T[h, i, j] = k[h, i - j] for i >= j, else 0. k: (H, C) -> (H, C, C)."""
    c = k.shape[-1]
    i = torch.arange(c, device=k.device)
    lag = (i[:, None] - i[None, :]).clamp(min=0)  # positive indices only
    return k[:, lag] * tril_ones(c, k)


def toeplitz_conv(u: Tensor, k: Tensor) -> Tensor:
    """Causal conv of one chunk by matmul. u: (B, H, C), k: (H, C) -> (B, H, C)."""
    return torch.einsum("hij,bhj->bhi", causal_toeplitz(k), u)


def fft_causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """Causal conv by FFT (eager only). u: (B, H, T), k: (H, T) -> (B, H, T)."""
    t = u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * t) * torch.fft.rfft(k, n=2 * t), n=2 * t)
    return y[..., :t]


def direct_causal_conv(u: Tensor, k: Tensor) -> Tensor:
    """Reference causal conv, y_t = sum_{j<=t} k_{t-j} u_j. u: (B, H, T), k: (H, T) -> (B, H, T)."""
    t, h = u.shape[-1], u.shape[1]
    return F.conv1d(F.pad(u, (t - 1, 0)), k.flip(-1)[:, None], groups=h)


@MIXERS.register("s4d")
class S4D(Mixer):
    family = "s4d"
    fp32_params = ("log_dt", "log_A_real", "A_imag", "C")

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 init: str = "lin") -> None:
        super().__init__()
        h, m = d_model, d_state // 2
        self.d_model, self.n_modes = h, m
        self.log_dt = nn.Parameter(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((h, m), math.log(0.5)))
        n = torch.arange(m, dtype=torch.float32)
        match init:
            case "lin":  # S4D-Lin: A_n = -1/2 + i pi n
                imag = math.pi * n
            case "inv":  # S4D-Inv: A_n = -1/2 + i N/pi (N/(2n+1) - 1)
                imag = d_state / math.pi * (d_state / (2 * n + 1) - 1)
            case _:
                raise ValueError(f"s4d: init must be 'lin' or 'inv', got '{init}'")
        self.A_imag = nn.Parameter(imag.repeat(h, 1))  # (H, M)
        self.C = nn.Parameter(torch.view_as_real(torch.randn(h, m, dtype=torch.cfloat)).clone())  # (H, M, 2)
        self.D = nn.Parameter(torch.randn(h))
        self.output_linear = nn.Linear(h, 2 * h)  # then GLU, as the reference Conv1d(H, 2H, 1) + GLU

    def state_slots(self, batch: int) -> list[StateSlot]:
        return [StateSlot("ssm", (batch, self.d_model, self.n_modes, 2), note="complex modes as (real, imag)")]

    def _modes(self) -> tuple[Tensor, Tensor, Tensor]:
        """log|dA|, arg dA: (H, M); C' = 2 C (dA - 1) / A as (H, M, 2). All real arithmetic."""
        dt = torch.exp(self.log_dt)[:, None]
        a_re, a_im = -torch.exp(self.log_A_real), self.A_imag
        log_r, theta = dt * a_re, dt * a_im
        # dA - 1 without cancellation: e^x - 1 = 2 tanh(x/2) / (1 - tanh(x/2)) and cos(t) - 1 = -2 sin(t/2)^2.
        th = torch.tanh(0.5 * log_r)
        em1, mag = 2.0 * th / (1.0 - th), torch.exp(log_r)
        n_re = em1 * torch.cos(theta) - 2.0 * torch.sin(0.5 * theta) ** 2
        n_im = mag * torch.sin(theta)
        den = a_re * a_re + a_im * a_im
        q_re, q_im = (n_re * a_re + n_im * a_im) / den, (n_im * a_re - n_re * a_im) / den  # (dA - 1) / A
        c_re, c_im = self.C[..., 0], self.C[..., 1]
        c = torch.stack([c_re * q_re - c_im * q_im, c_re * q_im + c_im * q_re], dim=-1)
        return log_r, theta, 2.0 * c

    def kernel(self, n: int) -> Tensor:
        """K_l = 2 Re(C' dA^l) for l < n: (H, n)."""
        log_r, theta, c = self._modes()
        k = torch.arange(n, dtype=c.dtype, device=c.device)
        pr, pi = modal_powers(log_r, theta, k)
        return (c[..., 0:1] * pr - c[..., 1:2] * pi).sum(1)

    def _out(self, y: Tensor) -> Tensor:
        """(B, T, H) -> (B, T, H): GELU, then Linear(H, 2H) + GLU."""
        return F.glu(self.output_linear(F.gelu(y)), dim=-1)

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        (s,) = state  # (B, H, M, 2)
        u = x.transpose(1, 2)  # (B, H, T)
        log_r, theta, c = self._modes()
        t = x.shape[1]
        k = self.kernel(t if chunk_size is None else min(chunk_size, t))
        outs = []
        for a, b in chunks(t, chunk_size):
            uc = u[:, :, a:b]
            conv = fft_causal_conv(uc, k) if chunk_size is None else toeplitz_conv(uc, k[:, :b - a])
            outs.append(conv + modal_readout(s, c, log_r, theta, b - a, 1))
            s = modal_update(s, uc, log_r, theta)
        y = torch.cat(outs, dim=2) + self.D[:, None] * u
        return self._out(y.transpose(1, 2)), (s,)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        (s,) = state
        log_r, theta, c = self._modes()
        s = modal_step(s, x, log_r, theta)
        y = (c[..., 0] * s[..., 0] - c[..., 1] * s[..., 1]).sum(-1) + self.D * x  # (B, H)
        return self._out(y), (s,)

    def naive(self, x: Tensor) -> Tensor:
        """The reference S4DKernel in complex arithmetic, then a direct causal convolution sum."""
        t = x.shape[1]
        cdtype = torch.complex128 if x.dtype == torch.float64 else torch.complex64
        dt = torch.exp(self.log_dt).to(cdtype)[:, None]
        a = -torch.exp(self.log_A_real) + 1j * self.A_imag
        c = torch.view_as_complex(self.C.contiguous()) * (torch.exp(dt * a) - 1.0) / a
        k = 2 * (c[..., None] * torch.exp(dt[..., None] * a[..., None] * torch.arange(t, device=x.device))).sum(1)
        u = x.transpose(1, 2)
        y = direct_causal_conv(u, k.real.to(x.dtype)) + self.D[:, None] * u
        return self._out(y.transpose(1, 2))
