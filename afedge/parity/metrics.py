"""Error metrics between a tensor under test and its reference (numpy or torch in, floats out)."""
from __future__ import annotations

import numpy as np


def _np(x) -> np.ndarray:
    return x.detach().cpu().double().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float64)


def max_abs(x, ref) -> float:
    return float(np.max(np.abs(_np(x) - _np(ref)))) if _np(ref).size else 0.0


def max_rel(x, ref) -> float:
    """max|x - ref| / max|ref| (0 when both are zero; inf when x is non-finite)."""
    a, r = _np(x), _np(ref)
    if not np.all(np.isfinite(a)):
        return float("inf")
    scale = float(np.max(np.abs(r))) if r.size else 0.0
    err = float(np.max(np.abs(a - r))) if r.size else 0.0
    return err / scale if scale else err


def sqnr_db(x, ref) -> float:
    """10 log10(|ref|^2 / |x - ref|^2); inf when equal."""
    a, r = _np(x), _np(ref)
    noise = float(np.sum((a - r) ** 2))
    if not np.isfinite(noise):
        return float("-inf")
    return float("inf") if noise == 0 else 10.0 * float(np.log10(float(np.sum(r ** 2)) / noise))


def cosine(x, ref) -> float:
    a, r = _np(x).ravel(), _np(ref).ravel()
    den = float(np.linalg.norm(a) * np.linalg.norm(r))
    return float(a @ r) / den if den else 1.0


def argmax_agrees(x, ref, tie_abs: float = 0.0) -> np.ndarray:
    """Per row (last axis = vocab): the argmaxes agree, or the reference's logits of the two tokens are within
    `tie_abs` of each other (a tie at that noise level; 0 = exact agreement only)."""
    a, r = _np(x), _np(ref)
    ia, ir = a.argmax(-1)[..., None], r.argmax(-1)[..., None]
    margin = np.take_along_axis(r, ir, -1) - np.take_along_axis(r, ia, -1)
    return (ia == ir)[..., 0] | (margin[..., 0] <= tie_abs)


def top1_agreement(x, ref) -> float:
    """Fraction of rows (last axis = vocab) whose argmax agrees."""
    return float(np.mean(argmax_agrees(x, ref)))
