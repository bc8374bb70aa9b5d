"""One measurement in a fresh process, so its RSS is its own: `python -m afedge.bench.worker SPEC.json OUT.json`.

SPEC kinds: "artifact" (one artifact of the bundle through its runtime), "torch" (the bundle's PyTorch reference,
eager: recurrent step and chunked parallel forms), "baseline" (the KV-cache transformer), "hf" (transformers'
own `generate`, for bundles whose manifest says the model was imported from Hugging Face) and "reach" (the decode
contexts' states, reached by one artifact for the others: `--reach-with`). OUT gets one JSON row.
Progress lines go to stderr."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from afedge.bench.memory import peak_rss_bytes, rss_bytes


def _progress(name: str):
    return lambda msg: print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def _session_row(sess, spec: dict, progress) -> dict:
    from afedge.bench.measure import decode_vs_context, growth, load_reached, prefill_figures
    vocab = sess.info.vocab_size
    prefill, ttft = prefill_figures(sess, vocab, spec["prompt_len"], spec["repeats"], spec["tbt_tokens"], progress)
    prefill_peak = peak_rss_bytes()  # before decode_vs_context resets the high-water mark per context
    reached = load_reached(spec["reached"], sess.info.spec.names) if spec.get("reached") else None
    decode = decode_vs_context(sess, vocab, spec["contexts"], spec["steps"], progress, reached)
    return {"prefill": prefill, "ttft_ms": ttft, "decode": decode, "growth": growth(decode),
            "state_bytes": int(sum(a.nbytes for a in sess.init_state())),
            "peak_rss_bytes": max([prefill_peak, *(d["peak_rss_bytes"] for d in decode)])}


def _open_artifact(spec: dict):
    from afedge.bundle import load_bundle
    from afedge.pipeline import open_session
    bundle = load_bundle(Path(spec["bundle"]))
    art = bundle.artifact(spec["artifact"])
    if spec.get("device"):
        from afedge.device.devices import parse_device
        from afedge.device.session import open_device_session
        return open_device_session(bundle, art, parse_device(spec["device"]), spec["threads"])
    return open_session(bundle, art, spec["threads"])


def run_reach(spec: dict, progress) -> dict:
    """Reach every context with one artifact's chunked prefill and save (logits, state) per context to
    spec["states"], for the other workers to decode from (`afedge bench --reach-with`)."""
    from afedge.bench.measure import reach, save_reached
    sess = _open_artifact(spec)
    points = reach(sess, sess.info.vocab_size, spec["contexts"])
    rows = save_reached(spec["states"], sess.info.spec.names, points)
    progress(f"reached {', '.join(str(r['context']) for r in rows)} in {sum(r['feed_s'] for r in rows):.1f} s")
    sess.close()
    return {"reached": rows}


def run_artifact(spec: dict, progress) -> dict:
    t = time.perf_counter()
    sess = _open_artifact(spec)
    row = {"load_s": round(time.perf_counter() - t, 3), "rss_after_load_bytes": rss_bytes()}
    row["session"] = {k: v for k, v in sess.__dict__.items() if k in ("providers", "effective_threads", "opened")}
    row |= _session_row(sess, spec, progress)
    if spec.get("device"):  # the memory that counts is the device process's, not this host process's
        row["host_peak_rss_bytes"], row["peak_rss_bytes"] = row["peak_rss_bytes"], sess.peak_rss_bytes()
    sess.close()
    return row


def run_torch(spec: dict, progress) -> dict:
    import numpy as np
    import torch

    from afedge.bench.measure import prompt
    from afedge.bundle import load_bundle
    from afedge.pipeline import reference_program
    from afedge.runtimes.torch import TorchSession
    torch.set_num_threads(spec["threads"])
    bundle = load_bundle(Path(spec["bundle"]))
    t = time.perf_counter()
    program = reference_program(bundle)
    sess = TorchSession(program, spec["threads"])
    row = {"load_s": round(time.perf_counter() - t, 3), "rss_after_load_bytes": rss_bytes()}
    row |= _session_row(sess, spec, progress)
    # The parallel form over the whole prompt in one call (chunk_size chunks, no static prefill blocks).
    tokens = torch.from_numpy(prompt(program.vocab_size, spec["prompt_len"]))
    program.prefill(tokens[:, :program.prefill_len], program.init_state())  # warm-up
    times = []
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        program.prefill(tokens, program.init_state())
        times.append(time.perf_counter() - t)
    row["prefill"]["parallel_tok_s"] = round(spec["prompt_len"] / float(np.median(times)), 2)
    progress(f"parallel form over {spec['prompt_len']} tokens: {row['prefill']['parallel_tok_s']:.1f} tok/s")
    return row


def run_baseline(spec: dict, progress) -> dict:
    import torch

    from afedge.bench.baseline import baseline_for, describe
    from afedge.bench.measure import baseline_decode, growth
    from afedge.bundle import load_bundle
    torch.set_num_threads(spec["threads"])
    m = load_bundle(Path(spec["bundle"])).manifest["model"]
    model = baseline_for(m["config"], m["parameters"])
    decode = baseline_decode(model, spec["contexts"], spec["steps"], spec["max_kv_bytes"], progress)
    return {"model": describe(model), "decode": decode, "growth": growth(decode),
            "state_bytes": None, "kv_bytes_per_token": model.cache_bytes(1)}


def hf_source(manifest: dict) -> dict | None:
    """The manifest's model source when the model was imported from Hugging Face, else None."""
    from afedge.hf.loader import SOURCE_KIND
    source = manifest.get("model", {}).get("source") or {}
    return source if source.get("kind") == SOURCE_KIND else None


def run_hf(spec: dict, progress) -> dict:
    """transformers' own `generate` on the original checkpoint (local directory or the local hub cache only)."""
    import numpy as np
    import torch

    from afedge.bench.measure import prompt
    from afedge.bundle import load_bundle
    from afedge.exporting import require
    manifest = load_bundle(Path(spec["bundle"])).manifest
    source = hf_source(manifest)
    if source is None:
        kind = (manifest.get("model", {}).get("source") or {}).get("kind", "unknown")
        return {"status": "skipped", "reason": f"the bundle's model source is '{kind}', not an imported "
                                               f"Hugging Face model: no transformers baseline to run"}
    transformers = require("transformers", "hf")
    where = source.get("path") or source.get("local_dir") or source.get("id")
    torch.set_num_threads(spec["threads"])
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(where, local_files_only=True,
                                                                  dtype=torch.float32).eval()
    except (OSError, ValueError) as e:
        return {"status": "skipped", "reason": f"cannot load {where} offline: {str(e).splitlines()[0]}"}
    vocab = manifest["program"]["vocab_size"]
    context = max(1, spec["contexts"][0])  # decode after the smallest context, as the other rows report it

    class Clock(transformers.generation.streamers.BaseStreamer):
        """Stamps the time each token reaches the streamer: the prompt first, then every generated token."""

        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    def gen(n_prompt: int, new: int) -> tuple[float, list[float]]:
        """(seconds of the whole call, stamps of the generated tokens) for one greedy `generate`."""
        ids = torch.from_numpy(prompt(vocab, n_prompt))
        clock = Clock()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        return time.perf_counter() - t, clock.stamps[1:]

    gen(context, 2)
    ttft = float(np.median([gen(spec["prompt_len"], 1)[0] for _ in range(spec["repeats"])]))
    # decode: the gaps between consecutive generated tokens of one call, each a real per-token latency (the first
    # token carries the prompt's prefill, so it is not a gap)
    gaps = np.diff(gen(context, spec["steps"] + 1)[1]) * 1e3
    decode_ms, p90_ms = float(np.median(gaps)), float(np.percentile(gaps, 90))
    progress(f"transformers generate: prefill {spec['prompt_len'] / ttft:.1f} tok/s, decode {decode_ms:.2f} ms/token "
             f"(p90 {p90_ms:.2f}, context {context})")
    return {"source": source,
            "prefill": {"tokens": spec["prompt_len"], "chunked_tok_s": round(spec["prompt_len"] / ttft, 2)},
            "ttft_ms": round(ttft * 1e3, 3),
            "decode": [{"context": context, "median_ms": round(decode_ms, 4), "p90_ms": round(p90_ms, 4),
                        "peak_rss_bytes": peak_rss_bytes(), "note": "gaps between tokens of one generate call"}]}


KINDS = {"artifact": run_artifact, "torch": run_torch, "baseline": run_baseline, "hf": run_hf, "reach": run_reach}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    progress = _progress(spec["name"])
    try:
        row = {"status": "ok"} | KINDS[spec["kind"]](spec, progress)
    except Exception as e:  # reported in the row; the orchestrator decides the exit code
        from afedge.session import RuntimeUnavailable
        status = "unavailable" if isinstance(e, RuntimeUnavailable) else "error"
        row = {"status": status, "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    row.setdefault("peak_rss_bytes", peak_rss_bytes())
    Path(argv[1]).write_text(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
