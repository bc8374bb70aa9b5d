"""Weight quantization in torch: symmetric per-channel int8 and groupwise int4 (packed two per byte).

These are the reference numerics of afedge's own realisations (TVM's dequantize-in-graph weights) and of the
sensitivity report's simulation; ONNX Runtime and torchao quantize with their own (equivalent) kernels.
`QuantLinear` holds the packed integers plus fp32 scales as buffers and dequantizes inside `forward`, so an
exported graph carries the small integers and the dequantization as ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["quantize", "dequantize", "pack_int4", "unpack_int4", "QuantLinear", "quantized_copy", "fake_quant_weight",
           "fake_quant_activation"]

_QMAX = {8: 127, 4: 7}


def quantize(w: Tensor, bits: int, group: int = 0) -> tuple[Tensor, Tensor]:
    """w: (N, K) float -> (q (N, K) int8, scale (N, K // group or 1) float32), symmetric (no zero point).

    int8: scale = amax / 127, q in [-127, 127]. int4: the group's largest-magnitude value maps to -8 (scale =
    that value / -8, q in [-8, 7]), as ONNX Runtime's MatMulNBits does: all 16 levels, a finer step than
    amax / 7 (measured on retnet d=32, worst-position logits SQNR 20.1 vs 18.2 dB); for int8 amax / 127 is the
    better of the two (41.6 vs 37.1 dB)."""
    if bits not in _QMAX:
        raise ValueError(f"weight quantization: bits must be 8 or 4, got {bits}")
    n, k = w.shape
    g = group or k
    if k % g:
        raise ValueError(f"weight quantization: in_features {k} is not divisible by the group size {g}")
    wg = w.detach().float().reshape(n, k // g, g)
    tiny = torch.finfo(torch.float32).tiny
    if bits == 8:
        scale = (wg.abs().amax(-1) / _QMAX[8]).clamp(min=tiny)                    # (N, K // g)
    else:
        peak = torch.gather(wg, -1, wg.abs().argmax(-1, keepdim=True))[..., 0]      # signed, (N, K // g)
        scale = peak / -8.0
        scale = torch.where(scale.abs() < tiny, torch.full_like(scale, tiny), scale)
    q = torch.clamp(torch.round(wg / scale[..., None]), -_QMAX[bits] - 1, _QMAX[bits])
    return q.reshape(n, k).to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """q: (N, K) integers, scale: (N, G) -> (N, K) float32."""
    n, k = q.shape
    g = scale.shape[1]
    return (q.to(torch.float32).reshape(n, g, k // g) * scale[..., None]).reshape(n, k)


def pack_int4(q: Tensor) -> Tensor:
    """q: (N, K) int8 in [-8, 7], K even -> (N, K // 2) uint8, element 2j in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _nibbles(p: Tensor) -> tuple[Tensor, Tensor]:
    """p: (N, K // 2) uint8 -> (elements 0, 2, 4, ..., elements 1, 3, 5, ...), each (N, K // 2) int32 in [-8, 7]
    (in int32: TVM's importer types scalar operands int32)."""
    p = p.to(torch.int32)
    return torch.remainder(p, 16) - 8, torch.div(p, 16, rounding_mode="floor") - 8


def unpack_int4(p: Tensor) -> Tensor:
    """p: (N, K // 2) uint8 -> (N, K) int32 in [-8, 7]."""
    return torch.stack(_nibbles(p), dim=-1).reshape(p.shape[0], -1)


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (int8, or int4 packed in uint8) with fp32 scales.

    forward(x (..., K)) -> (..., N): dequantize (in the graph) then an fp32 matmul; with one scale per output row
    (int8 per channel) the scale multiplies the matmul's output instead, so a fused kernel only casts the weight.
    An int4 weight applied to one row (a decode step) is `_gemv_int4`."""

    def __init__(self, linear: nn.Linear, bits: int, group: int = 0) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        q, scale = quantize(linear.weight, bits, group)
        # Parameters (frozen), not buffers: TVM's importer lifts only parameters to inputs (keep_params_as_input),
        # which is what keeps the integers from being folded back into fp32 constants.
        self.qweight = nn.Parameter(pack_int4(q) if bits == 4 else q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def _ints(self) -> Tensor:
        return unpack_int4(self.qweight) if self.bits == 4 else self.qweight

    def weight(self) -> Tensor:
        return dequantize(self._ints(), self.scale)

    def _gemv_int4(self, x: Tensor) -> Tensor:
        """x (..., K), one row -> (..., N) = sum_j x[2j] lo[:, j] + x[2j+1] hi[:, j], lo / hi the dequantized
        low / high nibbles (N, K // 2): one reduction over the packed bytes, which TVM fuses into one GEMV reading
        them contiguously (the matmul on `unpack_int4`'s interleaved (N, K) weight gathers each byte twice: a
        768 x 3072 GEMV, 2 threads, 202 -> 101 us; int8 55 us). A block of rows keeps the matmul: its kernel
        dequantizes each weight once for all its rows."""
        lo, hi = (dequantize(n, self.scale) for n in _nibbles(self.qweight))
        return (x[..., 0::2].unsqueeze(-2) * lo + x[..., 1::2].unsqueeze(-2) * hi).sum(-1)

    def forward(self, x: Tensor) -> Tensor:
        if self.bits == 4 and x.numel() == x.shape[-1]:  # one row
            y = self._gemv_int4(x)
        elif self.scale.shape[1] == 1:  # one scale per output row: it factors out of the sum, (x @ q^T) * scale
            y = F.linear(x, self._ints().to(torch.float32)) * self.scale[:, 0]
        else:
            return F.linear(x, self.weight(), self.bias)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"groups={self.scale.shape[1]}"


def fake_quant_weight(w: Tensor, bits: int, group: int = 0) -> Tensor:
    """quantize then dequantize `w` (N, K): the weight a realisation computes with."""
    return dequantize(*quantize(w, bits, group))


def fake_quant_activation(x: Tensor, bits: int = 8) -> Tensor:
    """Dynamic asymmetric per-token quantization of x (..., K), as int8 dynamic-activation kernels do."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=torch.finfo(torch.float32).eps)
    zero = qmin - torch.round(lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, qmin, qmax) - zero) * scale


def quantized_copy(model: nn.Module, layers: dict[str, tuple[int, int]]) -> nn.Module:
    """A deep copy of `model` whose Linear modules named in `layers` ({name: (bits, group)}) are QuantLinear
    (the original is untouched; a tied head becomes a separate quantized copy)."""
    import copy
    out = copy.deepcopy(model)
    for name, (bits, group) in layers.items():
        parent, _, leaf = name.rpartition(".")
        owner = out.get_submodule(parent) if parent else out
        setattr(owner, leaf, QuantLinear(getattr(owner, leaf), bits, group))
    return out.eval()
