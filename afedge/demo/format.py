"""The dialogue format, shared by the corpus, the trainer's loss mask, `afedge eval` and `afedge chat`.

    U: what is 12 plus 30?\n
    A: 2+0=2, 1+3=4, so 42\n

A conversation is these lines back to back from the initial state; the model is trained on the reply text and the
newline that ends it, and a reply is generated from the `A: ` prefix until that newline.
"""
from __future__ import annotations

USER, BOT, EOL = "U: ", "A: ", "\n"


def prompt(user: str) -> str:
    """What a user turn feeds the model before it replies."""
    return f"{USER}{user}{EOL}{BOT}"


def render(turns: list[tuple[str, str]]) -> str:
    """[(user, reply), ...] -> the conversation text."""
    return "".join(prompt(u) + r + EOL for u, r in turns)


def reply_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of every reply in `text`, each including the newline that ends it."""
    spans, pos = [], 0
    for line in text.splitlines(keepends=True):
        if line.startswith(BOT):
            spans.append((pos + len(BOT), pos + len(line)))
        pos += len(line)
    return spans
