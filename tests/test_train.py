"""`afedge train`: config validation, reply-only loss mask, atomic checkpoints, exact resume, text corpora."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from afedge.checkpoint import load_checkpoint
from afedge.demo.corpus import write_corpus
from afedge.demo.format import reply_spans
from afedge.tolerances import TOLERANCES
from afedge.train import CHECKPOINT, TRAIN_STATE, DataConfig, Rows, TrainConfigError, load_config, train

TINY = """
[model]
mixer = "retnet"
d_model = 16
n_layers = 1
mixer_kwargs = {{ n_heads = 2 }}

[data]
seq_len = 48
{data}

[train]
steps = {steps}
batch_size = 2
warmup = 1
threads = 1
checkpoint_every = 2
out = "{out}"
"""


def config(tmp_path: Path, name: str = "run", steps: int = 4, data: str = "") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(TINY.format(steps=steps, out=tmp_path / name, data=data))
    return p


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(ckpt).state_dict()


def test_loss_mask_covers_exactly_the_replies():
    rows = Rows(DataConfig(seq_len=200))
    ids, mask = rows.batch(0, 2)
    text = rows.text(0)
    want = torch.zeros(201, dtype=torch.bool)
    for a, b in reply_spans(text):
        want[a:min(b, 201)] = True  # byte tokenizer, ASCII text: token i is character i
    assert bytes(ids[0].tolist()).decode() == text[:201]
    assert torch.equal(mask[0], want[1:])
    assert 0 < mask.float().mean() < 0.6


def test_resume_equals_an_uninterrupted_run(tmp_path):
    straight = train(load_config(config(tmp_path, "straight", steps=4)), progress=False, log=lambda _: None)
    half = load_config(config(tmp_path, "resumed", steps=4))
    half.train.steps = 2
    train(half, progress=False, log=lambda _: None)
    assert (tmp_path / "resumed" / CHECKPOINT / TRAIN_STATE).is_file()
    logs = []
    resumed = train(load_config(config(tmp_path, "resumed", steps=4)), progress=False, log=logs.append)
    assert any("resuming" in m and "step 2/4" in m for m in logs)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "tokenizer.json").is_file() and (resumed / "config.json").is_file()


def test_resume_refuses_another_config(tmp_path):
    train(load_config(config(tmp_path, "r", steps=2)), progress=False, log=lambda _: None)
    other = load_config(config(tmp_path, "r", steps=4, data="seed = 5"))
    with pytest.raises(TrainConfigError, match="written by a different config"):
        train(other, progress=False, log=lambda _: None)


def test_a_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = load_config(config(tmp_path, "r", steps=2))
    ckpt = train(cfg, progress=False, log=lambda _: None)
    before = weights(ckpt)
    import safetensors.torch

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    cfg = load_config(config(tmp_path, "r", steps=4))
    with pytest.raises(OSError, match="disk full"):
        train(cfg, progress=False, log=lambda _: None)
    after = weights(ckpt)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list((tmp_path / "r").glob(".checkpoint.*"))


def test_resume_may_change_how_the_run_executes_not_what_it_computes(tmp_path):
    base = load_config(config(tmp_path, "r"))
    other = load_config(config(tmp_path, "r"))
    other.train.compile, other.train.threads, other.train.steps = True, 2, 9
    assert other.fingerprint() == base.fingerprint()
    other.train.chunk_size = 7
    assert other.fingerprint() != base.fingerprint()


@pytest.mark.slow
def test_compiled_training_computes_the_eager_loss(tmp_path):
    """`[train] compile = true` (torch.compile, the demo config's setting) trains the same model as eager."""
    logs = {}
    for compiled in (False, True):
        cfg = load_config(config(tmp_path, f"c{compiled}", steps=2))
        cfg.train.compile = compiled
        train(cfg, progress=False, log=lambda _: None)
        logs[compiled] = [json.loads(line)["loss"] for line in (tmp_path / f"c{compiled}" / "log.jsonl").open()]
    assert len(logs[True]) == 2
    assert logs[True][0] == pytest.approx(logs[False][0], rel=TOLERANCES["fp32"].max_rel)


def test_text_corpus_source(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt", 3, 30)
    cfg = load_config(config(tmp_path, "t", steps=2, data=f'source = "text"\npath = "{corpus.name}"'))
    assert cfg.data.path == str(corpus)
    rows = Rows(cfg.data)
    assert rows.text(0) == rows.text(0) and rows.text(0) != rows.text(1)
    assert train(cfg, progress=False, log=lambda _: None).is_dir()


@pytest.mark.parametrize("body, message", [
    ("[model]\nmixer = 'retnet'\nwidth = 3\n", r"\[model\] has unknown fields \['width'\]"),
    ("[model]\nmixer = 'nope'\n", "mixer 'nope' is not registered"),
    ("[model]\nmixer = 'retnet'\n[data]\nsource = 'text'\n", "path is required"),
    ("[model]\nmixer = 'retnet'\n[data]\nloss = 'some'\n", "loss must be"),
    ("[model]\nmixer = 'retnet'\n[data]\nskill_weights = { poetry = 1.0 }\n", r"skill_weights: keys must be"),
    ("[model]\nmixer = 'retnet'\n[data]\nskill_weights = { arithmetic = 0 }\n", r"weights > 0"),
    ("[data]\nseq_len = 8\n", r"missing the \[model\] table"),
    ("[model\n", "bad.toml"),
])
def test_bad_configs_are_named(tmp_path, body, message):
    p = tmp_path / "bad.toml"
    p.write_text(body)
    with pytest.raises(TrainConfigError, match=message):
        load_config(p)


def test_cli_trains_and_fails_in_one_line(tmp_path):
    exe = Path(sys.executable).with_name("afedge")
    ok = subprocess.run([exe, "train", "--config", str(config(tmp_path, "cli", steps=2)), "--no-progress"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "cli" / CHECKPOINT / "model.safetensors").is_file()
    assert len((tmp_path / "cli" / "log.jsonl").read_text().splitlines()) == 2
    (tmp_path / "bad.toml").write_text("[model]\nmixer = 'nope'\n")
    bad = subprocess.run([exe, "train", "--config", str(tmp_path / "bad.toml")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("afedge: error:") and len(bad.stderr.splitlines()) == 1
