"""Cases 21 and 22: `afedge chat` survives hostile input and hostile state files. Binary garbage, control
characters and a 1 MB line are each answered without a crash and leave a valid state; a state file from another
model, or a corrupted one, is refused by /load with the reason, and the current state is left exactly as it was."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afedge.chat.bundles import open_conversation
from afedge.chat.engine import Conversation
from afedge.chat.repl import Repl
from afedge.chat.statefile import StateFileError

ROOT = Path(__file__).resolve().parents[2]
MB = 1 << 20


def conversation(bundle_dir, max_new: int = 4) -> Conversation:
    return open_conversation(bundle_dir, "onnx", max_new)[0]


def valid(conv: Conversation) -> None:
    conv.session.info.spec.check(conv.state, "after the turn")
    assert all(np.isfinite(s).all() for s in conv.state)


# -- case 21: garbage in -------------------------------------------------------------------------------------------

HOSTILE_LINES = {
    "control characters": "\x00\x01\x02\x1b[31m\x07\x08\x7f\u200b\u202e",
    "not UTF-8 (surrogate-escaped)": b"\xff\xfe\x80\x81 \xc3(".decode("utf-8", "surrogateescape"),
    "lone surrogates": "\ud800 \udfff",
    "every byte": bytes(range(1, 256)).decode("latin-1"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_line_is_answered_and_the_state_stays_valid(bundle_dir, case):
    conv = conversation(bundle_dir)
    reply = conv.say(HOSTILE_LINES[case])
    assert isinstance(reply, str)
    valid(conv)
    assert isinstance(conv.say("hello"), str)
    valid(conv)


def test_garbage_then_a_turn_matches_a_clean_history(bundle_dir):
    """The state after a garbage turn is the state of the same text cleaned: nothing else leaked in."""
    from afedge.chat.engine import valid_text
    dirty, clean = conversation(bundle_dir), conversation(bundle_dir)
    for line in HOSTILE_LINES.values():
        assert dirty.say(line) == clean.say(valid_text(line))
    assert dirty.say("hello") == clean.say("hello")
    for a, b in zip(dirty.state, clean.state):
        np.testing.assert_array_equal(a, b)


def chat_cli(bundle_dir, lines: list[bytes]) -> tuple[list[str], dict]:
    """`afedge chat --script` in a real process: (reply lines, the final /stats)."""
    done = subprocess.run([sys.executable, "-m", "afedge.cli", "chat", str(bundle_dir), "--runtime", "onnx",
                           "--script", "--max-new", "4"], input=b"\n".join([*lines, b"/stats"]) + b"\n",
                          capture_output=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in done.stderr
    return done.stdout.decode("utf-8", "replace").split("\n")[:-1], json.loads(done.stderr.splitlines()[-1])


def test_cli_survives_binary_stdin(bundle_dir):
    replies, stats = chat_cli(bundle_dir, [b"hello", b"\xff\xfe\x80 not utf-8 \xc3(", b"\x00\x01\x1b[2J\x07\x7f",
                                           b"hello"])
    assert len(replies) == 4
    assert stats["state_bytes"] == conversation(bundle_dir).stats()["state_bytes"]


@pytest.mark.slow
def test_cli_survives_a_megabyte_line(bundle_dir):
    """1 MiB of one line: 65,536 prefill blocks of the fixture's 16 tokens, then a normal turn."""
    replies, stats = chat_cli(bundle_dir, [b"x" * MB, b"hello"])
    assert len(replies) == 2 and stats["tokens_seen"] > MB


# -- case 22: hostile state files ----------------------------------------------------------------------------------

def _saved(bundle_dir, tmp_path) -> Path:
    conv = conversation(bundle_dir)
    conv.say("remember this")
    return conv.save(tmp_path / "good.state")


def _other_model(bundle_dir, tmp_path, good) -> Path:
    conv = conversation(bundle_dir)
    conv.fingerprint = "0" * 64  # the same contract but other weights
    conv.say("hi")
    return conv.save(tmp_path / "other.state")


def _flipped(bundle_dir, tmp_path, good) -> Path:
    blob = bytearray(good.read_bytes())
    blob[-3] ^= 0x40  # inside the last state tensor
    (tmp_path / "flipped.state").write_bytes(bytes(blob))
    return tmp_path / "flipped.state"


def _truncated(bundle_dir, tmp_path, good) -> Path:
    (tmp_path / "short.state").write_bytes(good.read_bytes()[:-100])
    return tmp_path / "short.state"


def _pickle(bundle_dir, tmp_path, good) -> Path:
    import torch
    torch.save({"layers.0.kv": torch.zeros(1)}, tmp_path / "pickle.state")
    return tmp_path / "pickle.state"


def _missing(bundle_dir, tmp_path, good) -> Path:
    return tmp_path / "nowhere.state"


BAD_FILES = {
    "another model": (_other_model, "saved from another model"),
    "bit flip": (_flipped, "corrupted (the state bytes do not match the sha256 in its header)"),
    "truncated": (_truncated, "not a safetensors state file"),
    "pickle": (_pickle, "not a safetensors state file"),
    "missing": (_missing, "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_state_file_is_refused_and_the_state_untouched(bundle_dir, tmp_path, case):
    make, reason = BAD_FILES[case]
    bad = make(bundle_dir, tmp_path, _saved(bundle_dir, tmp_path))
    conv = conversation(bundle_dir)
    conv.say("the current conversation")
    before = ([s.copy() for s in conv.state], list(conv.pending), conv.counters.tokens_seen)
    out, info = io.StringIO(), io.StringIO()
    Repl(conv, out, info, interactive=False).run([f"/load {bad}"])
    assert f"refused: {bad}: {reason}" in info.getvalue() and "(state unchanged)" in info.getvalue()
    assert all(np.array_equal(a, b) for a, b in zip(conv.state, before[0]))
    assert (conv.pending, conv.counters.tokens_seen) == before[1:]
    with pytest.raises(StateFileError):
        conv.load(bad)


def test_good_state_file_restores_the_conversation(bundle_dir, tmp_path):
    conv = conversation(bundle_dir)
    conv.say("remember this")
    path = conv.save(tmp_path / "s.state")
    expect = conv.say("and now?")
    fresh = conversation(bundle_dir)
    Repl(fresh, io.StringIO(), io.StringIO(), interactive=False).run([f"/load {path}"])
    assert fresh.say("and now?") == expect
