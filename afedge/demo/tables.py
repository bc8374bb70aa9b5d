"""The demo's shipped tables: facts (relation, subject, answer), first names and words (package data)."""
from __future__ import annotations

from functools import cache
from importlib import resources


def _lines(name: str) -> list[str]:
    text = resources.files("afedge.demo").joinpath(name).read_text(encoding="utf-8")
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


@cache
def facts() -> tuple[tuple[str, str, str], ...]:
    rows = []
    for i, ln in enumerate(_lines("facts.tsv")):
        parts = ln.split("\t")
        if len(parts) != 3:
            raise ValueError(f"afedge/demo/facts.tsv: row {i + 1} must be relation<TAB>subject<TAB>answer: {ln!r}")
        rows.append((parts[0], parts[1], parts[2]))
    return tuple(rows)


@cache
def names() -> tuple[str, ...]:
    return tuple(_lines("names.txt"))


@cache
def words() -> tuple[str, ...]:
    return tuple(_lines("words.txt"))
