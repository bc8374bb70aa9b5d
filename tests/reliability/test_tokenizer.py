"""Case 14: a checkpoint without its tokenizer (when the model is not byte-level), or a tokenizer with more ids than
the embedding has rows, fails the export before anything is exported or written."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import afedge.exporting
from afedge.checkpoint import save_checkpoint
from afedge.model import LM
from tests.reliability.conftest import assert_one_line_error, cli, tiny_config


@pytest.fixture
def no_export(monkeypatch):
    """No exporter may run: the tokenizer is checked first."""
    def called(*a, **k):
        raise AssertionError("an exporter ran before the tokenizer was checked")
    afedge.exporting.load_plugins()
    for name in afedge.exporting.EXPORTERS.names():
        monkeypatch.setattr(afedge.exporting.EXPORTERS.get(name), "export", called)


def word_tokenizer(n: int) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_missing_tokenizer_for_a_non_byte_vocab_is_an_export_error(tmp_path, capsys, no_export):
    save_checkpoint(LM(tiny_config(vocab_size=300)), tmp_path / "ckpt")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", tmp_path / "ckpt", "--out", out)
    assert_one_line_error(rc, err, "no tokenizer.json came with the model", "300 rows", "byte tokenizer's 256")
    assert not out.exists()


def test_tokenizer_larger_than_the_embedding_is_an_export_error(tmp_path, capsys, no_export):
    save_checkpoint(LM(tiny_config(vocab_size=256)), tmp_path / "ckpt")
    word_tokenizer(300).save(str(tmp_path / "ckpt" / "tokenizer.json"))
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", tmp_path / "ckpt", "--out", out)
    assert_one_line_error(rc, err, "tokenizer.json: 300 token ids", "embedding has only 256 rows")
    assert not out.exists()


def test_corrupt_tokenizer_is_named(tmp_path, capsys, no_export):
    save_checkpoint(LM(tiny_config()), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text(json.dumps({"model": "nope"}))
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", tmp_path / "ckpt", "--out", tmp_path / "o")
    assert_one_line_error(rc, err, "tokenizer.json: not a valid tokenizer.json")


def test_a_byte_model_without_tokenizer_gets_the_byte_tokenizer(bundle_dir):
    from afedge.tokenizer import load_tokenizer
    assert load_tokenizer(bundle_dir / "tokenizer.json").get_vocab_size() == 256
