"""Small tensor helpers shared by the mixers, written to export cleanly (no in-place ops, no data-dependent
Python control flow, masks as multiplications so XNNPACK can take them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def tril_ones(c: int, like: Tensor, diagonal: int = 0) -> Tensor:
    """(C, C) lower-triangular 0/1 matrix in `like`'s dtype and device."""
    return torch.ones(c, c, dtype=like.dtype, device=like.device).tril(diagonal)


def decay_matrix(log_decay: Tensor, c: int) -> Tensor:
    """Causal decay exp((i - j) * log_decay) for i >= j, else 0. log_decay: (H,) -> (H, C, C)."""
    i = torch.arange(c, dtype=log_decay.dtype, device=log_decay.device)
    lag = (i[:, None] - i[None, :]).clamp(min=0)  # (C, C)
    return torch.exp(lag * log_decay[:, None, None]) * tril_ones(c, log_decay)


def heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, hd = x.shape
    return x.view(b, t, n_heads, hd // n_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def head_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-head layer norm over the last dim (RetNet's group norm with one group per head). x: (..., D)."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)
