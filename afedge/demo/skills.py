"""The skills: each draws one exchange (a user line and its one correct reply) from a seeded `random.Random`.

Scored skills are the ones `afedge eval` reports; the recall set-ups and small talk make the conversation but are
not scored (their replies are fixed strings).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from afedge.demo.tables import facts, names, words


@dataclass(frozen=True)
class Turn:
    user: str
    reply: str
    skill: str
    scored: bool = True


ARITHMETIC = {
    "plus": ("what is {a} plus {b}?", "what is {a} + {b}?", "add {a} and {b}."),
    "minus": ("what is {a} minus {b}?", "what is {a} - {b}?", "subtract {b} from {a}."),
    "times": ("what is {a} times {b}?", "what is {a} * {b}?", "multiply {a} by {b}."),
}
# (singular, plural, smaller unit, factor)
UNITS = (("meter", "meters", "centimeters", 100), ("kilometer", "kilometers", "meters", 1000),
         ("kilogram", "kilograms", "grams", 1000), ("liter", "liters", "milliliters", 1000),
         ("hour", "hours", "minutes", 60), ("minute", "minutes", "seconds", 60), ("day", "days", "hours", 24),
         ("week", "weeks", "days", 7), ("foot", "feet", "inches", 12), ("year", "years", "months", 12))
FACT_QUESTIONS = {"capital": "what is the capital of {s}?", "color": "what color is {s}?",
                  "legs": "how many legs does a {s} have?", "opposite": "what is the opposite of {s}?",
                  "sound": "what sound does a {s} make?"}


def _cap(rng: random.Random, text: str) -> str:
    """Capitalise the first letter now and then, so 'What is ...' is in distribution too."""
    return text[0].upper() + text[1:] if rng.random() < 0.15 else text


def worked(a: int, b: int, op: str) -> str:
    """Two-digit plus / minus (0 <= b <= a for minus) shown column by column, units first, then the result:
    `17 plus 25` -> '7+5=12, 1+2+1=4, so 42'; `42 minus 17` -> '12-7=5, 4-1-1=2, so 25'. Each step is a one-digit
    sum the model can learn like the times table, reading digits it has just seen or written."""
    (ta, ua), (tb, ub) = divmod(a, 10), divmod(b, 10)
    if op == "plus":
        carry = (ua + ub) // 10
        units, tens = f"{ua}+{ub}={ua + ub}", f"{ta}+{tb}{'+1' * carry}={ta + tb + carry}"
        return f"{units}, {tens}, so {a + b}"
    borrow = int(ua < ub)
    units, tens = f"{ua + 10 * borrow}-{ub}={ua + 10 * borrow - ub}", f"{ta}-{tb}{'-1' * borrow}={ta - tb - borrow}"
    return f"{units}, {tens}, so {a - b}"


def arithmetic(rng: random.Random) -> Turn:
    """Times over 0-12 answers directly; plus / minus over 0-99 show their working (`worked`)."""
    op = rng.choice(tuple(ARITHMETIC))
    if op == "times":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        reply = str(a * b)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        if op == "minus":
            a, b = max(a, b), min(a, b)
        reply = worked(a, b, op)
    return Turn(_cap(rng, rng.choice(ARITHMETIC[op]).format(a=a, b=b)), reply, "arithmetic")


def units(rng: random.Random) -> Turn:
    one, many, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 20)
    big = one if n == 1 else many
    if rng.random() < 0.5:
        return Turn(_cap(rng, f"how many {small} are in {n} {big}?"), str(n * factor), "units")
    return Turn(_cap(rng, f"convert {n} {big} to {small}."), f"{n * factor} {small}", "units")


def fact(rng: random.Random) -> Turn:
    relation, subject, answer = rng.choice(facts())
    return Turn(_cap(rng, FACT_QUESTIONS[relation].format(s=subject)), answer, "facts")


def spelling(rng: random.Random) -> Turn:
    w = rng.choice(words())
    user = f"spell {w}." if rng.random() < 0.5 else f"how do you spell {w}?"
    return Turn(_cap(rng, user), "-".join(w), "spelling")


def reversal(rng: random.Random) -> Turn:
    w = rng.choice(words())
    user = f"reverse {w}." if rng.random() < 0.5 else f"what is {w} backwards?"
    return Turn(_cap(rng, user), w[::-1], "reversal")


def recall(rng: random.Random, kind: str) -> tuple[Turn, Turn]:
    """A statement (unscored acknowledgement) and the later question that asks for it back."""
    if kind == "name":
        n = rng.choice(names())
        setup = rng.choice((f"my name is {n}.", f"i am {n}.", f"call me {n}."))
        return (Turn(_cap(rng, setup), f"nice to meet you, {n}.", "recall", scored=False),
                Turn(_cap(rng, rng.choice(("what is my name?", "what's my name?"))), n, "recall"))
    if kind == "number":
        x = str(rng.randint(0, 9999))
        setup, question = rng.choice(((f"my favorite number is {x}.", "what is my favorite number?"),
                                       (f"remember the number {x}.", "what number did i tell you?")))
        return (Turn(_cap(rng, setup), f"ok, i will remember {x}.", "recall", scored=False),
                Turn(_cap(rng, question), x, "recall"))
    if kind == "color":
        c = rng.choice(("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"))
        return (Turn(_cap(rng, f"my favorite color is {c}."), f"{c} is a nice color.", "recall", scored=False),
                Turn(_cap(rng, "what is my favorite color?"), c, "recall"))
    raise ValueError(f"unknown recall kind '{kind}'")


RECALL_KINDS = ("name", "number", "color")
GREETINGS = (("hello", "hello! ask me something."), ("hi", "hello! ask me something."),
             ("hey", "hello! ask me something."))
THANKS = (("thanks", "you are welcome."), ("thank you", "you are welcome."), ("bye", "bye!"))

# Single-turn skills and their weights in a conversation (recall is woven in across turns by the corpus).
SKILLS: dict[str, tuple[Callable[[random.Random], Turn], float]] = {
    "arithmetic": (arithmetic, 3.0), "units": (units, 2.0), "facts": (fact, 2.0),
    "spelling": (spelling, 1.0), "reversal": (reversal, 1.5),
}
SCORED_SKILLS = ("arithmetic", "recall", "units", "facts", "spelling", "reversal")


def small_talk(rng: random.Random, table: tuple[tuple[str, str], ...]) -> Turn:
    user, reply = rng.choice(table)
    return Turn(_cap(rng, user), reply, "smalltalk", scored=False)
