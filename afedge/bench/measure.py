"""Measurements over any `Session` (init_state / prefill / step, numpy in and out), and over the baseline.

Decode at a context of N: feed N tokens through the session's chunked prefill (whole prefill blocks, then steps),
then time `steps` single steps, each fed the previous step's greedy token, one step per context in turn.
The peak RSS of each context is the peak while that context was reached and decoded (VmHWM reset between
contexts)."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from afedge.bench.memory import peak_rss_bytes, reset_peak, rss_bytes

Progress = Callable[[str], None]
WARMUP = 3   # untimed steps before the timed ones


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1e3
    return {"median_ms": round(float(np.median(ms)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "min_ms": round(float(ms.min()), 4), "n": len(ms)}


def prompt(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    """(1, n) int64 uniform random token ids (fixed seed: every runtime sees the same prompt)."""
    return np.random.default_rng(seed).integers(0, vocab, size=(1, n), dtype=np.int64)


def _timed_steps(sess, logits: np.ndarray, state, steps: int, warmup: int = WARMUP
                 ) -> tuple[list[float], np.ndarray, list, bool]:
    """`warmup` untimed then `steps` timed greedy steps from (logits, state) -> (seconds each, logits, state,
    finite)."""
    samples = []
    for i in range(warmup + steps):
        tok = logits.argmax(-1).astype(np.int64)
        t = time.perf_counter()
        logits, state = sess.step(tok, state)
        dt = time.perf_counter() - t
        if i >= warmup:
            samples.append(dt)
    finite = bool(np.isfinite(logits).all())
    return samples, logits, state, finite


def reach(sess, vocab: int, contexts: list[int]):
    """Feed the contexts (ascending) through the session's chunked prefill, each from the last: yields
    (context, tokens fed, seconds, logits, state) as each is reached. The prompt of context n is seeded by n, so
    every runtime (and `--reach-with`) reaches the same states."""
    state, pos, logits = sess.init_state(), 0, None
    for n in sorted(contexts):
        feed = n - pos
        t = time.perf_counter()
        if feed > 0:
            logits, state = sess.prefill(prompt(vocab, feed, seed=n), state)
        feed_s = time.perf_counter() - t
        pos = max(pos, n)
        if logits is None:  # a context of 0
            logits, state = sess.step(np.zeros(1, dtype=np.int64), state)
            pos += 1
        yield n, max(feed, 0), feed_s, logits, state


def save_reached(path: str, names: list[str], points) -> list[dict]:
    """Write the (context, fed, seconds, logits, state) points of `reach` to one safetensors file (keys
    "<context>.logits", "<context>.<slot>"); returns a row per context."""
    from safetensors.numpy import save_file
    tensors, rows = {}, []
    for n, fed, feed_s, logits, state in points:
        tensors |= {f"{n}.logits": logits} | {f"{n}.{k}": np.ascontiguousarray(a) for k, a in zip(names, state)}
        rows.append({"context": n, "fed_tokens": fed, "feed_s": round(feed_s, 3)})
    save_file(tensors, path)
    return rows


def load_reached(path: str, names: list[str]) -> dict[int, tuple[np.ndarray, list]]:
    """context -> (logits, state in contract order), as save_reached wrote them."""
    from safetensors.numpy import load_file
    tensors = load_file(path)
    contexts = sorted({int(k.split(".", 1)[0]) for k in tensors})
    return {n: (tensors[f"{n}.logits"], [tensors[f"{n}.{k}"] for k in names]) for n in contexts}


def decode_vs_context(sess, vocab: int, contexts: list[int], steps: int, progress: Progress,
                      reached: dict[int, tuple[np.ndarray, list]] | None = None) -> list[dict]:
    """Per context (ascending): median/p90 step latency and the peak RSS while reaching and decoding it.

    Each context is reached once (its state kept: it is fixed-size) and warmed up; then the timed steps go round
    the contexts one step at a time, so that every context samples the same moments of the machine (its fast and
    slow spells, which at sub-millisecond steps swing a median by 15-40% from one 100 ms to the next) and the
    latency ratio between contexts measures the context, not the moment. `reached`: context -> (logits, state)
    reached by another session (`--reach-with`): decoded from there, so the peak RSS is decode's alone."""
    rows, warm = [], []
    points = ((n, 0, 0.0, *reached[n]) for n in sorted(contexts)) if reached else reach(sess, vocab, contexts)
    resettable = reset_peak()
    for n, fed, feed_s, logits, state in points:
        _, step_logits, step_state, _ = _timed_steps(sess, logits, state, 0)   # decode here, for its peak RSS
        warm.append((step_logits, step_state))
        rows.append({"context": n, "fed_tokens": fed, "feed_s": round(feed_s, 3),
                     "peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes(), "peak_is_per_context": resettable})
        resettable = reset_peak()  # the next context's peak starts here: the loop's iterator reaches it
    samples: list[list[float]] = [[] for _ in rows]
    for _ in range(steps):
        for i, (lg, st) in enumerate(warm):
            got, lg, st, _ = _timed_steps(sess, lg, st, 1, warmup=0)
            samples[i].extend(got)
            warm[i] = (lg, st)
    for row, got, (lg, _) in zip(rows, samples, warm):
        row |= {**percentiles(got), "finite": bool(np.isfinite(lg).all())}
        progress(f"context {row['context']}: {row['median_ms']:.3f} ms/token (p90 {row['p90_ms']:.3f}), "
                 f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    return rows


def prefill_figures(sess, vocab: int, prompt_len: int, repeats: int, tbt_tokens: int,
                    progress: Progress) -> tuple[dict, float]:
    """Chunked prefill (median of `repeats`) vs token by token (`tbt_tokens` steps from the initial state);
    returns (figures, time to first token in ms: fresh state -> prefill -> greedy token)."""
    tokens = prompt(vocab, prompt_len)
    warm = sess.info.prefill_len + 1  # one prefill block and one step: first-call allocations of both methods
    logits, _ = sess.prefill(tokens[:, :warm], sess.init_state())
    times, ttfts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        logits, _ = sess.prefill(tokens, sess.init_state())
        times.append(time.perf_counter() - t)
        int(logits.argmax(-1)[0])
        ttfts.append(time.perf_counter() - t)
    chunked = prompt_len / float(np.median(times))
    progress(f"prefill {prompt_len}: chunked {chunked:.1f} tok/s")
    n = min(tbt_tokens, prompt_len)
    state = sess.init_state()
    t = time.perf_counter()
    for i in range(n):
        _, state = sess.step(tokens[:, i], state)
    tbt = n / (time.perf_counter() - t)
    progress(f"prefill token by token ({n} tokens): {tbt:.1f} tok/s")
    return ({"tokens": prompt_len, "chunked_tok_s": round(chunked, 2), "chunked_runs_s": [round(x, 4) for x in times],
             "token_by_token_tok_s": round(tbt, 2), "token_by_token_tokens": n,
             "speedup": round(chunked / tbt, 2)}, round(float(np.median(ttfts)) * 1e3, 3))


def growth(decode: list[dict]) -> dict:
    """Largest-context / smallest-context ratios of the median latency and of the peak RSS."""
    ok = [d for d in decode if d.get("median_ms") is not None]
    if len(ok) < 2:
        return {"latency": None, "memory": None, "contexts": [d["context"] for d in ok]}
    lo, hi = ok[0], ok[-1]
    return {"latency": round(hi["median_ms"] / lo["median_ms"], 4),
            "memory": round(hi["peak_rss_bytes"] / lo["peak_rss_bytes"], 4), "contexts": [lo["context"], hi["context"]]}


def baseline_decode(model, contexts: list[int], steps: int, max_kv_bytes: int, progress: Progress) -> list[dict]:
    """The KV-cache transformer at each context: a cache holding `context` random keys/values, then `steps` timed
    steps. Contexts whose cache would exceed `max_kv_bytes` are reported as skipped, not run."""
    import torch
    rows = []
    for n in sorted(contexts):
        t_max = n + WARMUP + steps
        need = model.cache_bytes(t_max)
        if need > max_kv_bytes:
            rows.append({"context": n, "median_ms": None, "p90_ms": None, "skipped":
                         f"KV cache {need / 2**30:.2f} GiB > the {max_kv_bytes / 2**30:.2f} GiB cap "
                         f"(--baseline-max-kv-gib)"})
            progress(f"baseline context {n}: skipped ({rows[-1]['skipped']})")
            continue
        reset_peak()
        cache = model.new_cache(t_max, fill_random=n)
        token, samples = torch.zeros(1, dtype=torch.long), []
        for i in range(WARMUP + steps):
            t = time.perf_counter()
            logits = model.step(token, cache, n + i)
            dt = time.perf_counter() - t
            token = logits.argmax(-1)
            if i >= WARMUP:
                samples.append(dt)
        rows.append({"context": n, **percentiles(samples), "peak_rss_bytes": peak_rss_bytes(),
                     "rss_bytes": rss_bytes(), "kv_cache_bytes": need, "finite": bool(torch.isfinite(logits).all())})
        del cache
        progress(f"baseline context {n}: {rows[-1]['median_ms']:.3f} ms/token, KV {need / 2**20:.0f} MiB")
    return rows
