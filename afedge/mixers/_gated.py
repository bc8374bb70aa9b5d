"""Kernels shared by the gated linear-attention families (GLA, HGRN2, Gated DeltaNet). Registers nothing.

Gates are carried as log-decays g <= 0, so every exponent below is non-positive and fp32 stays finite over any
number of steps. Activations are written with XNNPACK-delegable ops (relu/abs/exp/log instead of softplus/log1p).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from afedge.mixers.base import chunks
from afedge.mixers.ops import tril_ones

# The exact intra-chunk forms cost O(C^2 * Dk) memory: longer chunks (or chunk_size=None) are processed as runs
# of MAX_CHUNK-token chunks with the state passed between them, which is the same arithmetic.
MAX_CHUNK = 64


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), stable, from delegable ops."""
    return torch.relu(x) + torch.log(torch.exp(-torch.abs(x)) + 1.0)


def log_sigmoid(x: Tensor) -> Tensor:
    """log(sigmoid(x)) = -softplus(-x) <= 0, stable."""
    return -softplus(-x)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """RMS norm over the last dim. x: (..., D), weight: (D,)."""
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / ||x|| over the last dim (FLA's l2norm)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def spans(t: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Chunk spans capped at MAX_CHUNK tokens."""
    return chunks(t, min(chunk_size or t, MAX_CHUNK))


def unit_lower_inverse(a: Tensor) -> Tensor:
    """(I + A)^-1 for strictly lower-triangular A: (..., C, C), without torch.linalg.

    Bottom-up blocked inversion: from the 1x1 diagonal blocks (inverse 1), merge pairs of inverted s-blocks with
    [[T11, 0], [L21, T22]]^-1 = [[T11, 0], [-T22 L21 T11, T22]] for s = 1, 2, 4, ..: log2(C) levels of batched
    matmuls over static slices. As accurate as forward substitution (the doubling identity prod (I + (-A)^(2^i)) is
    exact in theory but loses ~1e-2 in fp32 on small-Dk keys: the powers of A cancel)."""
    c, lead = a.shape[-1], a.shape[:-2]
    n = 1 << (c - 1).bit_length()  # pad to a power of two: zero rows/cols invert to identity
    if n > c:
        a = F.pad(a, (0, n - c, 0, n - c))
    t = torch.ones(*lead, n, 1, 1, dtype=a.dtype, device=a.device)  # inverted 1x1 diagonal blocks
    s = 1
    while s < n:
        nb = n // (2 * s)
        eye = torch.eye(nb, dtype=a.dtype, device=a.device).view(nb, 1, nb, 1)
        l21 = (a.reshape(*lead, nb, 2 * s, nb, 2 * s) * eye).sum(-2)[..., s:, :s]  # (..., nb, s, s)
        pair = t.reshape(*lead, nb, 2 * s, s)  # two stacked s-blocks per 2s-block
        t11, t22 = pair[..., :s, :], pair[..., s:, :]
        t = torch.cat([torch.cat([t11, torch.zeros_like(t11)], -1), torch.cat([-(t22 @ l21 @ t11), t22], -1)], -2)
        s *= 2
    return t.reshape(*lead, n, n)[..., :c, :c]


def causal_decay(b: Tensor) -> Tensor:
    """exp(b_i - b_j) for j <= i else 0, from inclusive cumulative log-gates b: (..., C, X) -> (..., C, C, X).

    b is non-increasing along C, so the kept exponents are <= 0; the masked ones are clamped before exp."""
    c = b.shape[-2]
    diff = b[..., :, None, :] - b[..., None, :, :]  # (..., C, C, X)
    return torch.exp(-torch.relu(-diff)) * tril_ones(c, b)[:, :, None]


# --- diagonal (per key dim) gates: GLA, HGRN2 ---------------------------------------------------------------------
# S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = q_t S_t.  q, k, g: (B, H, T, Dk), v: (B, H, T, Dv), S: (B, H, Dk, Dv)


def gated_parallel(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor,
                   chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Chunkwise form. Within a chunk, b = inclusive cumsum of g; o_i = (q_i e^{b_i}) S + sum_{j<=i} (q_i . k_j
    e^{b_i - b_j}) v_j, with the (C, C, Dk) decays formed explicitly (exact and stable, unlike q e^b, k e^-b)."""
    outs = []
    for a, e in spans(q.shape[2], chunk_size):
        qc, kc, vc, gc = q[:, :, a:e], k[:, :, a:e], v[:, :, a:e], g[:, :, a:e]
        c = e - a
        b = tril_ones(c, gc) @ gc  # (B, H, C, Dk) inclusive cumsum, as a matmul
        att = (qc[:, :, :, None, :] * kc[:, :, None, :, :] * causal_decay(b)).sum(-1)  # (B, H, C, C)
        outs.append(att @ vc + (qc * torch.exp(b)) @ s)
        b_end = b[:, :, c - 1:c]  # (B, H, 1, Dk)
        s = torch.exp(b_end).transpose(-1, -2) * s + (kc * torch.exp(b_end - b)).transpose(-1, -2) @ vc
    return torch.cat(outs, dim=2), s


def gated_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """One token. q, k, g: (B, H, Dk), v: (B, H, Dv) -> o: (B, H, Dv), S."""
    s = torch.exp(g)[..., :, None] * s + k[..., :, None] * v[..., None, :]
    return (q[..., None, :] @ s)[..., 0, :], s


def gated_naive(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """The sequential recurrence from a zero state. -> o: (B, H, T, Dv)."""
    s = q.new_zeros(*q.shape[:2], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        s = torch.exp(g[:, :, t])[..., :, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ s)
    return torch.cat(outs, dim=2)
