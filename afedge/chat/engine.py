"""A conversation over a runtime `Session`: each turn feeds only its own tokens to `prefill` on the current state,
then decodes greedily with `step` until the newline that ends the reply. Nothing grows with the conversation: the
state is the contract's fixed set of tensors, and no transcript is kept.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from afedge.chat.statefile import SavedState, load_state, save_state
from afedge.demo.format import EOL, prompt
from afedge.session import NpState, Session


def valid_text(text: str) -> str:
    """`text` as valid Unicode: bytes that were not UTF-8 (read with errors="surrogateescape") and lone surrogates
    become U+FFFD, so any input line can be tokenized."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


@dataclass
class Counters:
    tokens_seen: int = 0        # every token the state has consumed (prompts and replies)
    generated: int = 0          # reply tokens decoded in this process
    gen_s: float = 0.0          # seconds spent decoding them
    prefilled: int = 0          # prompt tokens fed in this process
    prefill_s: float = 0.0


@dataclass
class Conversation:
    """One conversation. `fork()` is free: states are never mutated in place, so a branch shares the arrays."""

    session: Session
    tokenizer: object                   # a `tokenizers.Tokenizer`
    fingerprint: str                    # names the model in saved state files
    max_new: int = 64                   # reply length cap, tokens
    state: NpState = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # fed before the next turn (the newline ending a reply)
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        eol = self.tokenizer.encode(EOL).ids
        if len(eol) != 1:
            raise ValueError(f"the tokenizer must encode {EOL!r} as one token, got {eol}")
        self.eol = eol[0]
        if not self.state:
            self.state = self.session.init_state()

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Feed one user turn and return the reply; `on_text` receives it piece by piece as it is decoded."""
        ids = self.pending + self.tokenizer.encode(prompt(valid_text(text))).ids
        c, t0 = self.counters, time.perf_counter()
        logits, state = self.session.prefill(np.array([ids], dtype=np.int64), self.state)
        c.prefilled, c.prefill_s, c.tokens_seen = c.prefilled + len(ids), c.prefill_s + time.perf_counter() - t0, \
            c.tokens_seen + len(ids)
        out: list[int] = []
        shown = ""
        t0 = time.perf_counter()
        for _ in range(self.max_new):
            nxt = int(logits[0].argmax())
            if nxt == self.eol:
                break
            out.append(nxt)
            logits, state = self.session.step(np.array([nxt], dtype=np.int64), state)
            text_now = self.tokenizer.decode(out)
            if on_text and not text_now.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                on_text(text_now[len(shown):])
                shown = text_now
        c.generated, c.gen_s, c.tokens_seen = c.generated + len(out), c.gen_s + time.perf_counter() - t0, \
            c.tokens_seen + len(out)
        self.state, self.pending = state, [self.eol]
        reply = self.tokenizer.decode(out)
        if on_text and reply != shown:
            on_text(reply[len(shown):])
        return reply

    def reset(self) -> None:
        self.state, self.pending = self.session.init_state(), []
        self.counters = replace(self.counters, tokens_seen=0)

    def fork(self) -> Conversation:
        return replace(self, pending=list(self.pending), counters=replace(self.counters))

    def save(self, path: Path) -> Path:
        return save_state(path, SavedState(self.state, self.pending, self.counters.tokens_seen),
                          self.session.info.spec, self.fingerprint)

    def load(self, path: Path) -> None:
        """Replace the state with a saved one; on any error the current state is left as it was."""
        saved = load_state(path, self.session.info.spec, self.fingerprint)
        self.state, self.pending = saved.state, saved.pending
        self.counters.tokens_seen = saved.tokens_seen

    def stats(self) -> dict[str, float | int]:
        c = self.counters
        return {"state_bytes": self.session.info.spec.nbytes_of(self.state), "tokens_seen": c.tokens_seen,
                "decode_tok_s": c.generated / c.gen_s if c.gen_s else 0.0,
                "prefill_tok_s": c.prefilled / c.prefill_s if c.prefill_s else 0.0}
