"""A bundle's ARM64 artifacts on every emulated CPU: errors against the PyTorch reference, and whether different
CPUs computed bit-identical logits (when they differ, the libraries chose different kernels for them).

    .venv/bin/afedge device setup emu-arm64
    .venv/bin/python benchmarks/arm64_devices.py out/android-arm64 [more bundles] [--cpus cortex-a53,max]

Prints one Markdown table per bundle: runtime x CPU -> logits max rel, SQNR (whole workload / worst position),
top-1, final state max rel, seconds, and the group of CPUs whose outputs are bit-identical.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def run(sess, prompt: np.ndarray, steps: int, ref_tokens: list[np.ndarray]) -> tuple[np.ndarray, list]:
    """Prefill `prompt`, then `steps` steps teacher-forced on the reference's greedy tokens: (logits, state)."""
    logits, state = sess.prefill(prompt, sess.init_state())
    out = [logits]
    for tok in ref_tokens[:steps]:
        logits, state = sess.step(tok, state)
        out.append(logits)
    return np.concatenate(out), state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--cpus", default="cortex-a53,cortex-a72,neoverse-n1,neoverse-v1,neoverse-n2,max")
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--steps", type=int, default=256)
    a = ap.parse_args()
    from afedge.bundle import load_bundle
    from afedge.device.devices import emu_device
    from afedge.device.session import open_device_session
    from afedge.parity import metrics
    from afedge.pipeline import reference_program
    from afedge.runtimes.torch import TorchSession
    from afedge.session import RuntimeUnavailable

    for path in a.bundles:
        b = load_bundle(path)
        ref = TorchSession(reference_program(b), 1)
        prompt = np.random.default_rng(0).integers(0, b.info.vocab_size, (1, a.prompt_len), dtype=np.int64)
        logits, state = ref.prefill(prompt, ref.init_state())
        r_out, toks = [logits], []
        for _ in range(a.steps):
            toks.append(logits.argmax(-1).astype(np.int64))
            logits, state = ref.step(toks[-1], state)
            r_out.append(logits)
        r_all, r_state = np.concatenate(r_out), state
        print(f"\n## {path} ({b.manifest['quant']}, {b.manifest['model']['config']['mixer']}, "
              f"{a.prompt_len}-token prompt + {a.steps} steps)\n")
        print("| artifact | CPU | max rel | SQNR dB (all / worst position) | top-1 | state max rel | s | "
              "bit-identical group |")
        print("|---|---|---|---|---|---|---|---|")
        for art in b.artifacts:
            outs: dict[str, np.ndarray] = {}
            for cpu in a.cpus.split(","):
                try:
                    t = time.perf_counter()
                    sess = open_device_session(b, art, emu_device(cpu), 1)
                except RuntimeUnavailable as e:
                    print(f"| {art.name} | {cpu} | not run: {str(e)[:90]} | | | | | |")
                    break
                s_all, s_state = run(sess, prompt, a.steps, toks)
                sess.close()
                dt = time.perf_counter() - t
                group = next((c for c, o in outs.items() if np.array_equal(o, s_all)), cpu)
                outs[cpu] = s_all
                per_pos = [metrics.sqnr_db(s, r) for s, r in zip(s_all, r_all)]
                st = max(metrics.max_rel(s, r) for s, r in zip(s_state, r_state))
                print(f"| {art.name} | {cpu} | {metrics.max_rel(s_all, r_all):.2e} | "
                      f"{metrics.sqnr_db(s_all, r_all):.1f} / {min(per_pos):.1f} | "
                      f"{metrics.top1_agreement(s_all, r_all):.3f} | {st:.2e} | {dt:.1f} | same as {group} |",
                      flush=True)


if __name__ == "__main__":
    main()
