"""Weight quantization in torch: symmetric per-channel int8 and groupwise int4 (packed two per byte).

These are the reference numerics of afedge's own realisations (TVM's dequantize-in-graph weights, every exporter's
quantized embedding) and of the sensitivity report's simulation; ONNX Runtime and torchao quantize Linear layers
with their own (equivalent) kernels. `QuantLinear` and `QuantEmbedding` hold the packed integers plus fp32 scales
as frozen parameters and dequantize inside `forward`, so an exported graph carries the small integers and the
dequantization as ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["quantize", "dequantize", "pack_int4", "unpack_int4", "QuantLinear", "QuantEmbedding", "quantized_copy",
           "embedding_bytes", "fake_quant_weight", "fake_quant_activation"]

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
    """q: (..., K) integers, scale: (..., G) -> (..., K) float32."""
    g, k = scale.shape[-1], q.shape[-1]
    return (q.to(torch.float32).unflatten(-1, (g, k // g)) * scale[..., None]).flatten(-2)


def pack_int4(q: Tensor) -> Tensor:
    """q: (N, K) int8 in [-8, 7], K even -> (N, K // 2) uint8, element 2j in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def _nibbles(p: Tensor) -> tuple[Tensor, Tensor]:
    """p: (..., K // 2) uint8 -> (elements 0, 2, 4, ..., elements 1, 3, 5, ...), each (..., K // 2) int32 in
    [-8, 7] (in int32: TVM's importer types scalar operands int32)."""
    p = p.to(torch.int32)
    return torch.remainder(p, 16) - 8, torch.div(p, 16, rounding_mode="floor") - 8


def unpack_int4(p: Tensor) -> Tensor:
    """p: (..., K // 2) uint8 -> (..., K) int32 in [-8, 7]."""
    return torch.stack(_nibbles(p), dim=-1).flatten(-2)


def _stored(w: Tensor, bits: int, group: int) -> tuple[nn.Parameter, nn.Parameter]:
    """w (N, K) as frozen parameters (integers: int8, or int4 packed (N, K // 2) uint8; fp32 scales (N, G)).

    Parameters, not buffers: TVM's importer lifts only parameters to inputs (keep_params_as_input), which is what
    keeps the integers from being folded back into fp32 constants."""
    q, scale = quantize(w, bits, group)
    return (nn.Parameter(pack_int4(q) if bits == 4 else q, requires_grad=False),
            nn.Parameter(scale, requires_grad=False))


class QuantLinear(nn.Module):
    """A Linear whose weight is stored quantized (int8, or int4 packed in uint8) with fp32 scales.

    forward(x (..., K)) -> (..., N): dequantize (in the graph) then an fp32 matmul; with one scale per output row
    (int8 per channel) the scale multiplies the matmul's output instead, so a fused kernel only casts the weight.
    An int4 weight applied to one row (a decode step) is `_gemv_int4`."""

    def __init__(self, linear: nn.Linear, bits: int, group: int = 0) -> None:
        super().__init__()
        self.bits, self.in_features, self.out_features = bits, linear.in_features, linear.out_features
        self.qweight, self.scale = _stored(linear.weight, bits, group)
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


class QuantEmbedding(nn.Module):
    """A token embedding stored quantized: int8 (V, D), or int4 packed (V, D // 2), with fp32 scales (V, G).

    forward(tokens (...,) int64) -> (..., D): gathers the tokens' rows of integers and scales, then dequantizes
    only those rows (a decode step reads one row of the table, not the table)."""

    def __init__(self, embed: nn.Embedding, bits: int, group: int = 0) -> None:
        super().__init__()
        self.bits, self.num_embeddings, self.embedding_dim = bits, embed.num_embeddings, embed.embedding_dim
        self.qweight, self.scale = _stored(embed.weight, bits, group)

    def forward(self, tokens: Tensor) -> Tensor:
        rows = F.embedding(tokens, self.qweight)
        return dequantize(unpack_int4(rows) if self.bits == 4 else rows, F.embedding(tokens, self.scale))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, groups={self.scale.shape[1]}"


def embedding_bytes(model: nn.Module) -> int:
    """Bytes the token embedding (`model.embed`) holds: its integers and scales when quantized."""
    return sum(p.numel() * p.element_size() for p in model.embed.parameters())


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


def quantized_copy(model: nn.Module, layers: dict[str, tuple[int, int]],
                   embedding: tuple[int, int] | None = None) -> nn.Module:
    """A deep copy of `model` whose Linear modules named in `layers` ({name: (bits, group)}) are QuantLinear and,
    with `embedding` (bits, group), whose `embed` is a QuantEmbedding (the original is untouched). A tied head
    quantized as the embedding is shares its integers and scales; otherwise it becomes a separate quantized copy."""
    import copy
    out = copy.deepcopy(model)
    for name, (bits, group) in layers.items():
        parent, _, leaf = name.rpartition(".")
        owner = out.get_submodule(parent) if parent else out
        setattr(owner, leaf, QuantLinear(getattr(owner, leaf), bits, group))
    if embedding is not None:
        out.embed = QuantEmbedding(out.embed, *embedding)
        head = getattr(model, "head", None)
        if tuple(layers.get("head", ())) == tuple(embedding) and head is not None and head.weight is model.embed.weight:
            out.head.qweight, out.head.scale = out.embed.qweight, out.embed.scale
    return out.eval()
