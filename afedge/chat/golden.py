"""Golden files for the Android app's pure-Kotlin core (examples/android/core), written by the Python side.

    python -m afedge.chat.golden BUNDLE OUT_DIR

OUT_DIR gets the bundle's manifest.json and tokenizer.json with the token ids Python produces, a byte-level BPE
tokenizer with merges and its ids, the manifest fields and fingerprint, a recorded conversation (every runtime call:
method, tokens fed, logits returned; and the replies), and state files (one from this model, one from another).
The Kotlin test replays the recorded logits through its own generation loop and must reproduce every reply.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from afedge.bundle import Bundle, load_bundle
from afedge.chat.engine import Conversation
from afedge.chat.statefile import bundle_fingerprint, state_digest
from afedge.session import Session

TEXTS = ("U: what is 12 plus 30?\nA: ", "hello, world", "  two  spaces\tand a tab\n", "naïve café — 東京 🙂", "")
TURNS = ("what is 12 plus 30?", "my name is Alice.", "spell cat.",
         "this line is longer than one prefill block of sixty-four tokens, so it goes through prefill first.",
         "what is my name?")


class RecordingSession(Session):
    """Delegates to `inner` and records every native call: method, tokens, returned logits."""

    def __init__(self, inner: Session) -> None:
        super().__init__(inner.info, inner.threads)
        self.inner, self.runtime, self.calls = inner, f"recording({inner.runtime})", []

    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        out = self.inner._run(method, inputs)
        self.calls.append({"method": method, "tokens": inputs[0].reshape(-1).tolist(),
                           "logits": [float(x) for x in out[0].reshape(-1)]})
        return out


def _token_cases(tok, texts) -> dict:
    return {"cases": [{"text": t, "ids": tok.encode(t).ids, "decoded": tok.decode(tok.encode(t).ids)} for t in texts]}


def _bpe_tokenizer():
    """A byte-level BPE with merges, trained on demo text (what `tokenizers` writes for afedge's pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from afedge.demo.corpus import dialogues
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([d.text for d in dialogues(1, 300)], trainer)
    return tok


def write_goldens(bundle: Bundle, session: Session, out: Path, max_new: int = 24) -> Path:
    from afedge.tokenizer import load_tokenizer
    out.mkdir(parents=True, exist_ok=True)
    m = bundle.manifest
    shutil.copy(bundle.path / "manifest.json", out / "manifest.json")
    shutil.copy(bundle.file(m["tokenizer"]), out / "tokenizer.json")
    tok = load_tokenizer(bundle.file(m["tokenizer"]))
    texts = (*TEXTS, *(f"U: {t}\nA: " for t in TURNS))
    (out / "tokens.json").write_text(json.dumps(_token_cases(tok, texts)))
    bpe = _bpe_tokenizer()
    bpe.save(str(out / "bpe_tokenizer.json"))
    (out / "bpe_tokens.json").write_text(json.dumps(_token_cases(bpe, texts)))

    spec, fp = bundle.info.spec, bundle_fingerprint(m, bundle.info.spec)
    pte = next((a.files["step"] for a in bundle.artifacts if a.runtime == "executorch"), None)
    (out / "expect_manifest.json").write_text(json.dumps({
        "fingerprint": fp, "vocab_size": m["program"]["vocab_size"], "prefill_len": m["program"]["prefill_len"],
        "state_bytes": m["state_bytes"], "pte_file": pte, "tokenizer": m["tokenizer"],
        "input_names": m["program"]["input_names"],
        "slots": [{"name": s.name, "shape": list(s.shape)} for s in spec.slots]}))

    rec = RecordingSession(session)
    conv = Conversation(rec, tok, fp, max_new)
    turns = [{"user": u, "reply": conv.say(u)} for u in TURNS]
    (out / "replay.json").write_text(json.dumps({"max_new": max_new, "turns": turns, "calls": rec.calls,
                                                 "tokens_seen": conv.counters.tokens_seen}))
    conv.save(out / "state.safetensors")
    (out / "expect_state.json").write_text(json.dumps({"sha256": state_digest(conv.state),
                                                       "tokens_seen": conv.counters.tokens_seen,
                                                       "pending": conv.pending}))
    other = Conversation(session, tok, "0" * 64, max_new)
    other.save(out / "state_other_model.safetensors")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m afedge.chat.golden", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--runtime", default="torch", help="the runtime whose logits are recorded (default: torch)")
    a = p.parse_args(argv)
    from afedge.chat.bundles import open_runtime
    bundle = load_bundle(a.bundle)
    print(write_goldens(bundle, open_runtime(bundle, a.runtime), a.out))


if __name__ == "__main__":
    main()
