"""The baseline: a same-size softmax-attention transformer decoding with a KV cache (plain PyTorch).

Same d_model, layers and vocabulary as the afedge model; heads of 64; an MLP whose width makes the parameter
count per layer match the afedge model's (so both read about the same weight bytes per token). Pre-norm RMSNorm,
no positional encoding (it costs nothing per token at these sizes). The cache is preallocated for the whole
context, (L, 2, H, T_max, Dh) fp32, as static caches are; its size grows linearly with the context, which is the
point of the comparison."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionBlock(nn.Module):
    def __init__(self, d: int, n_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.n_heads, self.dh = n_heads, d // n_heads
        self.norm1, self.norm2 = nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, d)) if mlp_hidden else None

    def step(self, x: Tensor, cache: Tensor, pos: int) -> Tensor:
        """x: (1, D); cache: (2, H, T_max, Dh), written at `pos` (the baseline's cache is its own buffer)."""
        q, k, v = self.qkv(self.norm1(x)).view(3, self.n_heads, 1, self.dh).unbind(0)  # (H, 1, Dh) each
        cache[0, :, pos:pos + 1] = k
        cache[1, :, pos:pos + 1] = v
        att = F.scaled_dot_product_attention(q, cache[0, :, :pos + 1], cache[1, :, :pos + 1])  # (H, 1, Dh)
        x = x + self.proj(att.reshape(1, -1))
        return x if self.mlp is None else x + self.mlp(self.norm2(x))


class KVCacheTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, n_layers: int, mlp_hidden: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        n_heads = max(1, d // 64)
        if d % n_heads:
            raise ValueError(f"baseline: d_model {d} is not a multiple of {n_heads} heads")
        self.d, self.n_heads = d, n_heads
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(AttentionBlock(d, n_heads, mlp_hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.eval().requires_grad_(False)

    def new_cache(self, t_max: int, fill_random: int = 0) -> Tensor:
        """(L, 2, H, t_max, Dh) fp32; the first `fill_random` positions hold random keys and values (a context of
        that length, reached without its O(T^2) prefill: attention's cost does not depend on the values)."""
        cache = torch.zeros(len(self.blocks), 2, self.n_heads, t_max, self.d // self.n_heads)
        if fill_random:
            cache[:, :, :, :fill_random].normal_()
        return cache

    def cache_bytes(self, t_max: int) -> int:
        return len(self.blocks) * 2 * t_max * self.d * 4

    @torch.no_grad()
    def step(self, token: Tensor, cache: Tensor, pos: int) -> Tensor:
        """token: (1,) int64 -> logits (1, V); writes position `pos` of `cache`."""
        x = self.embed(token)
        for i, block in enumerate(self.blocks):
            x = block.step(x, cache[i], pos)
        return self.head(self.norm(x))


def matched_mlp_hidden(params_per_layer: float, d: int) -> int:
    """MLP width that gives an attention block (4 d^2 + 2 d h + norms) `params_per_layer` parameters."""
    return max(0, int(round((params_per_layer - 4 * d * d - 2 * d) / (2 * d + 1))))


def baseline_for(cfg: dict, parameters: int) -> KVCacheTransformer:
    """The baseline for an afedge model config (manifest `model.config`) with `parameters` parameters."""
    d, layers, vocab = cfg["d_model"], cfg["n_layers"], cfg["vocab_size"]
    per_layer = (parameters - vocab * d * (1 if cfg.get("tie_embeddings", True) else 2) - d) / layers
    return KVCacheTransformer(vocab, d, layers, matched_mlp_hidden(per_layer, d), cfg.get("seed", 0))


def describe(model: KVCacheTransformer) -> dict:
    n = sum(p.numel() for p in model.parameters())
    mlp = model.blocks[0].mlp
    return {"d_model": model.d, "n_layers": len(model.blocks), "n_heads": model.n_heads,
            "mlp_hidden": mlp[0].out_features if mlp is not None else 0, "parameters": n,
            "vocab_size": model.embed.num_embeddings, "head_dim": model.d // model.n_heads,
            "kv_bytes_per_token": model.cache_bytes(1), "attention": "softmax, KV cache fp32, SDPA"}


