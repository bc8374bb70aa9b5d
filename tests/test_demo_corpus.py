"""The demo dialogue generator: deterministic, held-out from another seed, and every reply correct."""
from __future__ import annotations

import re

import pytest

from afedge.demo import skills
from afedge.demo.corpus import HELD_OUT_SEED, TRAIN_SEED, dialogues, held_out, stream_text, write_corpus
from afedge.demo.format import BOT, USER, prompt, render, reply_spans
from afedge.demo.tables import facts, names, words

UNIT_FACTOR = {small: factor for _, _, small, factor in skills.UNITS}


def test_same_seed_same_text_and_held_out_differs():
    assert [d.text for d in dialogues(TRAIN_SEED, 50)] == [d.text for d in dialogues(TRAIN_SEED, 50)]
    assert stream_text(TRAIN_SEED, 3, 300) == stream_text(TRAIN_SEED, 3, 300)
    assert stream_text(TRAIN_SEED, 3, 300) != stream_text(TRAIN_SEED, 4, 300)
    assert HELD_OUT_SEED != TRAIN_SEED
    assert {d.text for d in held_out(200)}.isdisjoint({d.text for d in dialogues(TRAIN_SEED, 200)})


def test_a_training_mix_changes_the_stream_not_the_held_out_set():
    def share(texts: list[str]) -> float:
        return sum(len(re.findall(r"plus|minus|times|add |subtract |multiply ", t)) for t in texts) / len(texts)
    plain = [stream_text(TRAIN_SEED, i, 2000) for i in range(40)]
    mixed = [stream_text(TRAIN_SEED, i, 2000, {"arithmetic": 9.0}) for i in range(40)]
    assert share(mixed) > 1.5 * share(plain)
    assert stream_text(TRAIN_SEED, 0, 2000, {}) == plain[0]
    assert [d.text for d in held_out(20)] == [d.text for d in dialogues(HELD_OUT_SEED, 20)]


def test_the_chat_readme_prompt_is_in_distribution():
    questions = {t.user for d in dialogues(TRAIN_SEED, 2000) for t in d.turns}
    assert any(re.fullmatch(r"what is \d+ plus \d+\?", q) for q in questions)
    assert "what is {a} plus {b}?" in skills.ARITHMETIC["plus"]


def _pattern(template: str) -> str:
    return re.escape(template).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")


def _check_working(op: str, a: int, b: int, reply: str) -> None:
    """Plus / minus replies show each column (units, then tens with its carry or borrow) and end with the result."""
    sign = re.escape("+" if op == "plus" else "-")
    m = re.fullmatch(rf"(\d+){sign}(\d)=(\d+), (\d){sign}(\d)({sign}1)?=(\d+), so (\d+)", reply)
    assert m, reply
    u1, u2, s1, t1, t2, s2, result = (int(g) for g in m.group(1, 2, 3, 4, 5, 7, 8))
    flow = bool(m[6])  # the carry into (plus) or the borrow from (minus) the tens column
    assert (u1 % 10, u2, t1, t2) == (a % 10, b % 10, a // 10, b // 10), reply
    if op == "plus":
        assert (u1, s1, flow, s2) == (a % 10, u1 + u2, u1 + u2 >= 10, t1 + t2 + flow), reply
    else:
        assert (flow, u1, s1, s2) == (a % 10 < u2, a % 10 + 10 * flow, u1 - u2, t1 - t2 - flow), reply
    assert result == (a + b if op == "plus" else a - b), reply


def _check(turn: skills.Turn, said: dict[str, str]) -> None:
    """Recompute the one right reply of `turn` from its question alone."""
    q, r = turn.user.lower(), turn.reply
    if turn.skill == "arithmetic":
        ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
        (op, a, b), = [(op, int(m["a"]), int(m["b"])) for op, templates in skills.ARITHMETIC.items()
                       for tpl in templates if (m := re.fullmatch(_pattern(tpl), q))]
        if op == "times":
            assert r == str(a * b), turn
        else:
            _check_working(op, a, b, r)
        assert ops[op](a, b) >= 0, turn
    elif turn.skill == "units":
        n = int(re.search(r"\d+", q).group())
        small = next(s for s in UNIT_FACTOR if f" {s}" in q and (q.startswith("how many " + s) or q.endswith(f"to {s}.")))
        value = str(n * UNIT_FACTOR[small])
        assert r in (value, f"{value} {small}"), turn
    elif turn.skill == "facts":
        assert any(turn.user.lower() == skills.FACT_QUESTIONS[rel].format(s=s) and r == ans for rel, s, ans in facts())
    elif turn.skill == "spelling":
        assert r.replace("-", "") in words() and r.replace("-", "") in q and r.count("-") == len(r) // 2, turn
    elif turn.skill == "reversal":
        assert r[::-1] in words() and r[::-1] in q, turn
    elif turn.skill == "recall":
        if turn.scored:
            assert said["name" if "name" in q else "number" if "number" in q else "color"] == r, turn
        else:
            key = "name" if "meet you" in r else "number" if "remember" in r else "color"
            said[key] = re.search(r"(\w+)\.$", turn.user).group(1)


def test_every_reply_is_the_right_answer():
    seen = set()
    for d in dialogues(TRAIN_SEED, 3000):
        said: dict[str, str] = {}
        for t in d.turns:
            _check(t, said)
            seen.add(t.skill)
    assert set(skills.SCORED_SKILLS) <= seen


def test_recall_questions_follow_their_statement():
    for d in held_out(500):
        for i, t in enumerate(d.turns):
            if t.skill == "recall" and t.scored:
                assert any(t.reply in s.user for s in d.turns[:i] if s.skill == "recall" and not s.scored)


def test_format_and_reply_spans():
    text = render([("what is 12 plus 30?", "42"), ("spell cat.", "c-a-t")])
    assert text == f"{USER}what is 12 plus 30?\n{BOT}42\n{USER}spell cat.\n{BOT}c-a-t\n"
    assert text.startswith(prompt("what is 12 plus 30?"))
    assert [text[a:b] for a, b in reply_spans(text)] == ["42\n", "c-a-t\n"]


def test_tables_are_shipped_and_well_formed():
    assert len(facts()) >= 50 and len(names()) >= 30 and len(words()) >= 100
    assert {rel for rel, _, _ in facts()} == set(skills.FACT_QUESTIONS)
    assert all(w.isalpha() and w.islower() for w in words())


def test_write_corpus_is_atomic_and_readable(tmp_path):
    out = write_corpus(tmp_path / "c.txt", TRAIN_SEED, 20)
    convs = out.read_text().split("\n\n")
    assert len(convs) == 20 and convs[0] == dialogues(TRAIN_SEED, 1)[0].text.rstrip("\n")
    assert not list(tmp_path.glob(".*tmp*"))


def test_unknown_recall_kind_is_named():
    import random
    with pytest.raises(ValueError, match="unknown recall kind 'age'"):
        skills.recall(random.Random(0), "age")
