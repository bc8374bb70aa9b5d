"""Tokenizers for bundles, built with the `tokenizers` library (lazily imported)."""
from __future__ import annotations

from pathlib import Path


def _tokenizers():
    from afedge.exporting import require
    return require("tokenizers", "cli")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what ByteLevel pre-tokenisation emits)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer():
    """A byte-level tokenizer whose token id is the byte value (vocab 256, no merges)."""
    tk = _tokenizers()
    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def load_tokenizer(path: Path):
    """Load a `tokenizer.json`; errors name the file."""
    tk = _tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
