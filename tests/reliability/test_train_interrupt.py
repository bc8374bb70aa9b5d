"""Case 25: `afedge train` killed with SIGKILL (here: while it writes a checkpoint) leaves a loadable checkpoint,
resumes from it, ends with the same weights as an uninterrupted run, and leaves no temporaries behind."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from afedge.checkpoint import load_checkpoint
from afedge.train import CHECKPOINT, TRAIN_STATE, load_config, load_training_state, make_optimizer, train

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60
CONFIG = """
[model]
mixer = "retnet"
d_model = 16
n_layers = 1
mixer_kwargs = {{ n_heads = 2 }}

[data]
seq_len = 32

[train]
steps = {steps}
batch_size = 2
warmup = 1
threads = 1
checkpoint_every = {every}
out = "{out}"
"""


def config(tmp_path: Path, name: str, every: int) -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(CONFIG.format(steps=STEPS, every=every, out=tmp_path / name))
    return p


def test_sigkill_during_a_checkpoint_write_resumes_exactly(tmp_path):
    straight = train(load_config(config(tmp_path, "straight", STEPS)), progress=False, log=lambda _: None)
    cfg = config(tmp_path, "run", every=1)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "afedge.cli", "train", "--config", str(cfg), "--no-progress"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while not ((run / CHECKPOINT / TRAIN_STATE).is_file() and list(run.glob(".checkpoint.tmp-*"))):
        assert proc.poll() is None, f"training ended before it was killed: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() - t0 < 300
        time.sleep(0.0005)  # a checkpoint write takes a few ms
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    model = load_checkpoint(run / CHECKPOINT)  # whole and loadable: the old checkpoint or the new one
    info = load_training_state(run / CHECKPOINT, make_optimizer(model, load_config(cfg).train), load_config(cfg))
    assert 1 <= info["step"] < STEPS
    logs: list[str] = []
    resumed = train(load_config(cfg), progress=False, log=logs.append)
    assert any(f"at step {info['step']}/{STEPS}" in m for m in logs), logs
    a, b = load_checkpoint(straight).state_dict(), load_checkpoint(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in run.glob(".checkpoint*")) == []
