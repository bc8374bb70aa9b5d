"""The decode roofline: this machine's memory bandwidth and the bytes a decode step must read.

A recurrent step reads every weight once (the embedding only as one row unless it is tied to the head, which
reads it whole) and reads and writes the state once, so tokens/s <= bandwidth / bytes per token."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from torch import nn


def measure_bandwidth(mib: int = 512, repeats: int = 5, threads: int = 1) -> dict:
    """Best-of-`repeats` `np.copyto` of a `mib`-MiB float32 buffer, split over `threads` threads (numpy releases
    the GIL), as many as the runtimes use: one thread does not saturate this machine's memory (here 1 thread
    39.5 GB/s, 2 threads 55.6; TVM's 2-thread decode read its weights at 44 GB/s). Bandwidth counts the bytes
    read plus the bytes written, the way STREAM's copy does."""
    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    parts = [slice(a[0], a[-1] + 1) for a in np.array_split(np.arange(src.size), threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(lambda p: np.copyto(dst[p], src[p]), parts))
            best = min(best, time.perf_counter() - t)
    return {"method": f"numpy copyto of {mib} MiB float32, best of {repeats}, {threads} thread"
                      f"{'s' if threads > 1 else ''}, read+write bytes",
            "gb_s": round(2 * src.nbytes / best / 1e9, 2)}


def weight_bytes_per_token(model: nn.Module, embedding: nn.Embedding, head: nn.Linear | None = None) -> int:
    """Bytes of parameters one decode step reads: all of them once, the embedding table only as one row unless
    `head` shares its weight (then the head reads it whole)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    w = embedding.weight
    tied = head is not None and head.weight is w
    if not tied:
        total -= w.numel() * w.element_size() - w.shape[1] * w.element_size()
    return int(total)


def roofline(model, state_bytes: int, bandwidth_gb_s: float) -> dict:
    """Upper bound on decode tokens/s for an afedge LM: bandwidth / (weights read + state read and written)."""
    weights = weight_bytes_per_token(model, model.embed, model.head)
    per_token = weights + 2 * state_bytes
    return {"bandwidth_gb_s": bandwidth_gb_s, "weight_bytes_per_token": weights,
            "state_bytes_per_token": 2 * state_bytes, "bytes_per_token": per_token,
            "decode_upper_bound_tok_s": round(bandwidth_gb_s * 1e9 / per_token, 2)}


def artifact_roofline(roof: dict, quant: dict | None, model) -> dict | None:
    """The bound for an artifact holding quantized weights (None for fp32 ones: `roof` is theirs). Its weights are
    the bytes its step holds (`quant["methods"]["step"]["weight_bytes"]` where an artifact records each method's
    own file, as ONNX does with one graph per method; else `quant["weight_bytes"]`: integers + scales + the fp32
    tensors), less the token embedding but one row (its stored bytes, `embedding_bytes`, when quantized), unless an
    fp32 head tied to it reads the fp32 table whole."""
    if not quant or quant.get("scheme", "fp32") == "fp32" or not quant.get("weight_bytes"):
        return None
    step = (quant.get("methods") or {}).get("step") or quant
    w = model.embed.weight
    table = int(step.get("embedding_bytes") or quant.get("embedding_bytes") or w.numel() * w.element_size())
    whole = (model.head is not None and model.head.weight is w and quant.get("policy", {}).get("head") == "fp32"
             and not quant.get("embedding"))
    weights = int(step["weight_bytes"]) - (0 if whole else table - table // w.shape[0])
    per_token = weights + roof["state_bytes_per_token"]
    return {"scheme": quant["scheme"], "weight_bytes_per_token": weights, "bytes_per_token": per_token,
            "decode_upper_bound_tok_s": round(roof["bandwidth_gb_s"] * 1e9 / per_token, 2)}
