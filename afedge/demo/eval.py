"""Exact-match accuracy on the held-out conversations, per skill, through the same loop `afedge chat` runs.

Each conversation starts from the initial state; every turn is fed as chat feeds it and the reply is decoded
greedily, so later turns see the model's own earlier replies (as in a real chat).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from afedge.chat.engine import Conversation
from afedge.demo.corpus import Dialogue
from afedge.demo.skills import SCORED_SKILLS
from afedge.session import Session


@dataclass
class Score:
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCORED_SKILLS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SCORED_SKILLS, 0))
    misses: list[tuple[str, str, str]] = field(default_factory=list)  # (question, expected, got), first few

    def accuracy(self, skill: str | None = None) -> float:
        c = sum(self.correct.values()) if skill is None else self.correct[skill]
        t = sum(self.total.values()) if skill is None else self.total[skill]
        return c / t if t else float("nan")

    def to_json(self) -> dict:
        return {"overall": self.accuracy(), "questions": sum(self.total.values()),
                "per_skill": {s: {"accuracy": self.accuracy(s), "correct": self.correct[s], "total": self.total[s]}
                              for s in SCORED_SKILLS},
                "misses": [{"question": q, "expected": e, "got": g} for q, e, g in self.misses]}


def evaluate(session: Session, tokenizer, dialogues: list[Dialogue], max_new: int = 32,
             progress: Callable[[int], None] | None = None, keep_misses: int = 8) -> Score:
    score = Score()
    for i, d in enumerate(dialogues):
        conv = Conversation(session, tokenizer, fingerprint="", max_new=max_new)
        for t in d.turns:
            got = conv.say(t.user)
            if not t.scored:
                continue
            score.total[t.skill] += 1
            if got == t.reply:
                score.correct[t.skill] += 1
            elif len(score.misses) < keep_misses:
                score.misses.append((t.user, t.reply, got))
        if progress:
            progress(i + 1)
    return score
