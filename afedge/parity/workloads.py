"""Parity workloads: what a runtime is driven through while it is compared with the reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Workload:
    """Prefill `prompt_len` tokens, then `steps` decode steps (teacher-forced on the reference's greedy tokens so
    both sessions see the same inputs; greedy agreement is still measured at every step)."""

    name: str
    prompt_len: int
    steps: int
    seed: int = 0
    snapshot_at: int | None = None   # save the state after this many decode steps and resume from the copy

    def prompt(self, vocab_size: int, batch: int = 1) -> np.ndarray:
        return np.random.default_rng(self.seed).integers(0, vocab_size, (batch, self.prompt_len), dtype=np.int64)

    @property
    def id(self) -> str:
        return f"{self.name}-P{self.prompt_len}-N{self.steps}"


# What `afedge export` gates every artifact on (and `--quant auto` validates its plan on).
GATE_PROMPT_LEN, GATE_STEPS = 40, 256


def prompt_decode(prompt_len: int = GATE_PROMPT_LEN, steps: int = GATE_STEPS) -> Workload:
    """A prompt that is not a multiple of the prefill block (whole blocks + steps), then a decode."""
    return Workload("prompt-decode", prompt_len, steps)


def static_shapes(prefill_len: int, blocks: int = 2, steps: int = 16) -> Workload:
    """Exactly `blocks` prefill blocks: the target's static shapes, no step fallback inside prefill."""
    return Workload("static", prefill_len * blocks, steps, seed=1)


def long_horizon(steps: int = 4096) -> Workload:
    return Workload("long", 8, steps, seed=2)


def snapshot_resume(steps: int = 64) -> Workload:
    return Workload("snapshot", 24, steps, seed=3, snapshot_at=steps // 2)
