"""The seeded dialogue generator: conversations of 1-7 exchanges mixing the skills, recall woven across turns.

The training stream and the held-out set come from different seeds; a seed and an index always give the same
text (string seeds hash with SHA-512 in `random.Random`, independent of PYTHONHASHSEED).

    python -m afedge.demo.corpus --seed 0 --n 1000 --out corpus.txt     # a text corpus for `afedge train`
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass
from pathlib import Path

from afedge.demo.format import render
from afedge.demo.skills import GREETINGS, RECALL_KINDS, SKILLS, THANKS, Turn, recall, small_talk

TRAIN_SEED, HELD_OUT_SEED = 0, 7_777_777


@dataclass(frozen=True)
class Dialogue:
    turns: tuple[Turn, ...]

    @property
    def text(self) -> str:
        return render([(t.user, t.reply) for t in self.turns])


def dialogue(rng: random.Random, skill_weights: dict[str, float] | None = None) -> Dialogue:
    """1-4 single-turn skills, 0-2 recall pairs (statement ... question), sometimes a greeting and a goodbye.
    `skill_weights` overrides SKILLS' weights (a training mix; the held-out set keeps the defaults)."""
    fns = [fn for fn, _ in SKILLS.values()]
    weights = [(skill_weights or {}).get(name, w) for name, (_, w) in SKILLS.items()]
    body = [fn(rng) for fn in rng.choices(fns, weights, k=rng.randint(1, 4))]
    for kind in rng.sample(RECALL_KINDS, rng.choice((0, 1, 1, 2))):
        setup, question = recall(rng, kind)
        i = rng.randint(0, len(body))
        body.insert(i, setup)
        body.insert(rng.randint(i + 1, len(body)), question)
    if rng.random() < 0.2:
        body.insert(0, small_talk(rng, GREETINGS))
    if rng.random() < 0.15:
        body.append(small_talk(rng, THANKS))
    return Dialogue(tuple(body))


def dialogues(seed: int, n: int) -> list[Dialogue]:
    rng = random.Random(seed)
    return [dialogue(rng) for _ in range(n)]


def held_out(n: int) -> list[Dialogue]:
    """The evaluation set: `n` conversations from the held-out seed."""
    return dialogues(HELD_OUT_SEED, n)


def stream_text(seed: int, index: int, min_chars: int, skill_weights: dict[str, float] | None = None) -> str:
    """Training row `index`: whole conversations back to back until the text has at least `min_chars`
    characters (the trainer cuts it to length, so the last one is usually truncated)."""
    rng, parts, n = random.Random(f"{seed}:{index}"), [], 0
    while n < min_chars:
        parts.append(dialogue(rng, skill_weights).text)
        n += len(parts[-1])
    return "".join(parts)


def write_corpus(path: Path, seed: int, n: int) -> Path:
    """`n` conversations, one blank line between them, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(d.text for d in dialogues(seed, n)), encoding="utf-8")
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m afedge.demo.corpus", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--n", type=int, default=1000, help="conversations")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    print(write_corpus(a.out, a.seed, a.n))


if __name__ == "__main__":
    main()
