"""`afedge chat`: the state carries the conversation (no re-prefill), state files, fork/reset/stats, constant memory,
and the non-interactive CLI. A tiny random-init model exported to ONNX keeps these fast; the demo model's answers
are checked in test_chat_demo.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from afedge.bundle import load_bundle
from afedge.chat.bundles import open_conversation, open_runtime
from afedge.chat.engine import Conversation
from afedge.chat.golden import RecordingSession
from afedge.chat.statefile import StateFileError, bundle_fingerprint
from afedge.demo.format import prompt, render
from afedge.model import LM, LMConfig
from afedge.pipeline import export_bundle
from afedge.rewrite import to_recurrent
from afedge.target import load_target
from afedge.tolerances import CHAT_RSS_GROWTH_BYTES, tolerance

AFEDGE = str(Path(sys.executable).with_name("afedge"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    target = load_target("host")
    model = LM(LMConfig(d_model=64, n_layers=1, mixer="retnet", mixer_kwargs={"n_heads": 2}, seed=3))
    out = tmp_path_factory.mktemp("chat") / "tiny"
    b, _ = export_bundle(to_recurrent(model, target.chunk_size, target.prefill_len), target, out, ["onnx"],
                         verify=False, progress=lambda _: None)
    return b


def conversation(bundle, runtime: str = "onnx", max_new: int = 6) -> Conversation:
    return open_conversation(bundle.path, runtime, max_new)[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_each_turn_feeds_only_its_own_tokens(bundle):
    conv = conversation(bundle)
    rec = RecordingSession(conv.session)
    conv.session = rec
    fed = []
    for text in ("my name is Alice.", "what is 12 plus 30?", "what is my name?"):
        before, n_calls = conv.counters.tokens_seen, len(rec.calls)
        conv.say(text)
        tokens = sum(len(c["tokens"]) for c in rec.calls[n_calls:])
        fed.append(tokens)
        new_ids = len(conv.tokenizer.encode(prompt(text)).ids) + (1 if before else 0)  # + the pending newline
        assert tokens == conv.counters.tokens_seen - before
        assert new_ids <= tokens <= new_ids + conv.max_new
    assert fed[2] < fed[0] + fed[1]  # the third turn did not re-feed the first two


def test_the_state_is_the_whole_conversation(bundle):
    """Turn by turn == the whole transcript fed at once from the initial state (the state carries it all)."""
    conv = conversation(bundle)
    turns = [(u, conv.say(u)) for u in ("hello", "what is 12 plus 30?", "spell cat.")]
    whole = conv.tokenizer.encode(render(turns)).ids[:-1]  # the last newline is still pending in `conv`
    sess = conv.session
    _, state = sess.prefill(np.array([whole], dtype=np.int64), sess.init_state())
    tol = tolerance("fp32")
    assert all(rel(a, b) <= tol.state_rel for a, b in zip(conv.state, state))
    fresh = conversation(bundle)
    fresh.say("spell cat.")
    assert max(rel(a, b) for a, b in zip(conv.state, fresh.state)) > tol.state_rel  # history is in the state


def test_save_load_round_trip_and_refusals(bundle, tmp_path):
    conv = conversation(bundle)
    conv.say("my name is Alice.")
    path = conv.save(tmp_path / "s.safetensors")
    reply_after = conversation(bundle).fork()
    reply_after.load(path)
    assert reply_after.say("what is my name?") == conv.fork().say("what is my name?")

    target = conversation(bundle)
    target.say("hi")
    keep = [a.copy() for a in target.state], list(target.pending), target.counters.tokens_seen
    data = path.read_bytes()
    bad = {"flipped": data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:], "truncated": data[:-16],
           "junk": b"not a state file"}
    for name, payload in bad.items():
        (tmp_path / name).write_bytes(payload)
    other = Conversation(conv.session, conv.tokenizer, "0" * 64)
    other.save(tmp_path / "other")
    for name, message in [("flipped", "corrupted"), ("truncated", "not a safetensors"), ("junk", "not a safetensors"),
                          ("other", "saved from another model"), ("missing", "no such file")]:
        with pytest.raises(StateFileError, match=message):
            target.load(tmp_path / name)
        assert all(np.array_equal(a, b) for a, b in zip(target.state, keep[0]))
        assert (target.pending, target.counters.tokens_seen) == (keep[1], keep[2])


def test_fingerprint_names_the_weights_and_the_contract(bundle, tmp_path):
    fp = bundle_fingerprint(bundle.manifest, bundle.info.spec)
    m = dict(bundle.manifest, files=dict(bundle.manifest["files"]))
    key = "reference/model.safetensors"
    m["files"][key] = dict(m["files"][key], sha256="f" * 64)
    assert bundle_fingerprint(m, bundle.info.spec) != fp and len(fp) == 64


def test_fork_and_reset_leave_other_branches_alone(bundle):
    conv = conversation(bundle)
    conv.say("my name is Alice.")
    branch = conv.fork()
    snapshot = [a.copy() for a in conv.state]
    branch.say("my name is Bob.")
    assert all(np.array_equal(a, b) for a, b in zip(conv.state, snapshot))
    assert branch.counters.tokens_seen > conv.counters.tokens_seen
    branch.reset()
    assert branch.counters.tokens_seen == 0 and branch.pending == []
    assert all(np.array_equal(a, b) for a, b in zip(branch.state, conv.session.init_state()))
    assert all(np.array_equal(a, b) for a, b in zip(conv.state, snapshot))


# Run in a fresh interpreter: the pytest process also hosts other tests' threads (the parity suite's export pool
# receives bundles while this runs), whose allocations would be counted as this conversation's growth.
TURNS_SCRIPT = """
import json, sys
from pathlib import Path
from afedge.chat.bundles import open_conversation

def rss():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

conv = open_conversation(Path(sys.argv[1]), "onnx", 3)[0]
sizes, rss_at = set(), []
for turn in range(2000):
    conv.say("hi" if turn % 2 else "ok")
    sizes.add(conv.stats()["state_bytes"])
    if turn in (199, 1999):
        rss_at.append(rss())
print(json.dumps({"state_bytes": sorted(sizes), "rss": rss_at, "tokens_seen": conv.counters.tokens_seen}))
"""


def test_two_thousand_turns_in_constant_memory(bundle):
    import json
    out = subprocess.run([sys.executable, "-c", TURNS_SCRIPT, str(bundle.path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    nbytes = bundle.info.spec.nbytes
    assert res["state_bytes"] == [nbytes]
    assert res["tokens_seen"] > 2000 * 8
    assert 1800 * nbytes > 2 * CHAT_RSS_GROWTH_BYTES  # keeping one state per turn would break the bound
    rss = res["rss"]
    assert rss[1] - rss[0] <= CHAT_RSS_GROWTH_BYTES, f"RSS grew {rss[1] - rss[0]} bytes over 1800 turns"


def test_cli_non_interactive_one_reply_line_per_turn(bundle, tmp_path):
    script = f"hello\n/stats\n/save {tmp_path / 'c.safetensors'}\nwhat is 12 plus 30?\n/fork side\n/reset\n" \
             f"/switch main\n/load {tmp_path / 'c.safetensors'}\n/load {tmp_path / 'nope'}\n/bogus\nspell cat.\n"
    out = subprocess.run([AFEDGE, "chat", str(bundle.path), "--runtime", "onnx", "--max-new", "5"], input=script,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 3
    err = out.stderr
    assert '"state_bytes": %d' % bundle.info.spec.nbytes in err and '"tokens_seen"' in err and "tok_s" in err
    assert "saved" in err and "forked 'side'" in err and "on branch 'main'" in err
    assert "refused:" in err and "(state unchanged)" in err and "unknown or incomplete command '/bogus'" in err
    assert (tmp_path / "c.safetensors").is_file()


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([AFEDGE, "chat", str(tmp_path)], input="hi\n", capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and out.stderr.startswith("afedge: error:") and "not a bundle" in out.stderr


def test_torch_reference_runtime_matches_onnx(bundle):
    a, b = conversation(bundle, "onnx"), conversation(bundle, "torch")
    assert [a.say(t) for t in ("hello", "spell cat.")] == [b.say(t) for t in ("hello", "spell cat.")]
    assert isinstance(open_runtime(load_bundle(bundle.path), "torch").info.vocab_size, int)
