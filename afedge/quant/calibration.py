"""Calibration data from the program itself: what its graphs see while the fp32 reference runs.

A seeded prompt that visits every token id (a shuffled vocabulary, up to `MAX_PROMPT` tokens) goes through the
chunked `prefill` in whole blocks, and token by token through `step` (teacher-forced), then `steps` greedy decode
steps follow; every call's inputs (tokens and the incoming state, by graph input name) are recorded. Static QDQ
schemes calibrate their activation ranges on these feeds. A token never seen in calibration can push an
activation beyond its calibrated range, where static quantization clips: measured on retnet d=32, a 64-token
random prompt left the QDQ graphs 0.1 (max rel) away from fp32, and a greedy-only step calibration (a few
distinct tokens) cost the step graph 20 dB; covering the vocabulary in both methods removes both.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from afedge.rewrite import RecurrentProgram

__all__ = ["calibration_tokens", "calibration_feeds", "CALIBRATION_STEPS"]

CALIBRATION_STEPS, MAX_PROMPT, SEED = 64, 1024, 1234


def calibration_tokens(vocab_size: int, length: int, batch: int = 1, seed: int = SEED) -> Tensor:
    """(batch, length) int64 tokens: shuffled copies of the whole vocabulary (every id once per `vocab_size`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randperm(vocab_size, generator=g) for _ in range(-(-length // vocab_size))])
    return ids[:length].repeat(batch, 1)


@torch.no_grad()
def calibration_feeds(program: RecurrentProgram, steps: int = CALIBRATION_STEPS
                      ) -> dict[str, list[dict[str, np.ndarray]]]:
    """{"prefill": [feed per block], "step": [feed per call]}, each feed {input name: array}."""
    n = program.prefill_len
    length = -(-min(program.vocab_size, MAX_PROMPT) // n) * n
    tokens = calibration_tokens(program.vocab_size, length, program.batch)
    feeds: dict[str, list] = {"prefill": [], "step": []}
    state = program.init_state()
    for a in range(0, length, n):
        block = tokens[:, a:a + n]
        feeds["prefill"].append(_feed(program, "prefill", block, state))
        _, state = program.prefill(block, state)
    state = program.init_state()
    for t in range(length):
        feeds["step"].append(_feed(program, "step", tokens[:, t], state))
        logits, state = program.step(tokens[:, t], state)
    for _ in range(steps):
        token = logits.argmax(-1)
        feeds["step"].append(_feed(program, "step", token, state))
        logits, state = program.step(token, state)
    return feeds


def _feed(program: RecurrentProgram, method: str, tokens: Tensor, state) -> dict[str, np.ndarray]:
    return dict(zip(program.input_names(method), (t.numpy().copy() for t in (tokens, *state))))
