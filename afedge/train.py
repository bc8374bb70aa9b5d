"""`afedge train --config FILE`: train any zoo model on a text corpus (or the demo's dialogue generator).

The config is TOML with three tables (see afedge/demo/train.toml):

    [model]  LMConfig fields (mixer, d_model, n_layers, mixer_kwargs, vocab_size, ...)
    [data]   source = "demo" | "text", path (for "text": conversations separated by blank lines), seed,
             seq_len, loss = "replies" (the demo format's reply spans) | "all", tokenizer = "bytes" | a tokenizer.json
    [train]  steps, batch_size, lr, min_lr, warmup, weight_decay, grad_clip, chunk_size, compile, threads,
             checkpoint_every, out

Row `i` of the data is a pure function of (seed, i), so a run resumed from its last checkpoint sees the same data as
an uninterrupted one. Checkpoints are `<out>/checkpoint/` (config.json, model.safetensors, tokenizer.json and
train_state.safetensors with the AdamW moments), written into a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from afedge.demo.skills import SKILLS
from afedge.model import LM, LMConfig

CHECKPOINT, TRAIN_STATE, TOKENIZER = "checkpoint", "train_state.safetensors", "tokenizer.json"


class TrainConfigError(ValueError):
    """A training config with a missing, unknown or bad field; the message names the file and field."""


@dataclass
class DataConfig:
    source: str = "demo"            # "demo": the seeded dialogue generator; "text": conversations in `path`
    path: str = ""                  # for source = "text": UTF-8, conversations separated by a blank line
    seed: int = 0                   # row i is drawn from (seed, i)
    seq_len: int = 256              # tokens per row (the row starts from the initial state)
    loss: str = "replies"           # "replies": only reply tokens (demo format) | "all": every token
    tokenizer: str = "bytes"        # "bytes" (afedge.tokenizer.byte_tokenizer) or a tokenizer.json path
    skill_weights: dict[str, float] = field(default_factory=dict)  # demo: training mix overrides (held-out keeps
                                                                   # the generator's own weights)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3                # peak, after `warmup` linear steps; cosine down to `min_lr`
    min_lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    chunk_size: int = 64            # chunk of the chunked parallel form during training
    compile: bool = False           # torch.compile the loss (static shapes; the first step pays the compile).
                                    # Measure first: mamba2 d128 x4 1.36x faster, gated_deltanet 13x slower
    threads: int = 2
    checkpoint_every: int = 200
    out: str = "runs/train"


RUN_ONLY = ("steps", "out", "checkpoint_every", "threads", "compile")  # [train] fields a resumed run may change


@dataclass
class RunConfig:
    model: LMConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "data": asdict(self.data), "train": asdict(self.train)}

    def fingerprint(self) -> str:
        """What a resumed run must share with the run that wrote the checkpoint (not steps or out)."""
        d = self.to_dict()
        d["train"] = {k: v for k, v in d["train"].items() if k not in RUN_ONLY}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _section(cls, data: dict, name: str, path: Path):
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise TrainConfigError(f"{path}: [{name}] has unknown fields {sorted(unknown)}")
    try:
        return cls(**data)
    except TypeError as e:
        raise TrainConfigError(f"{path}: [{name}]: {e}") from None


def load_config(path: Path) -> RunConfig:
    """Parse and validate a training config; errors name the file and the field."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TrainConfigError(f"{path}: {e}") from None
    if unknown := set(raw) - {"model", "data", "train"}:
        raise TrainConfigError(f"{path}: unknown tables {sorted(unknown)} (expected [model], [data], [train])")
    if "model" not in raw:
        raise TrainConfigError(f"{path}: missing the [model] table")
    cfg = RunConfig(_section(LMConfig, raw["model"], "model", path),
                    _section(DataConfig, raw.get("data", {}), "data", path),
                    _section(TrainConfig, raw.get("train", {}), "train", path))
    checks = [
        (cfg.data.source in ("demo", "text"), "[data] source must be 'demo' or 'text'"),
        (cfg.data.source != "text" or bool(cfg.data.path), "[data] path is required for source = 'text'"),
        (cfg.data.loss in ("replies", "all"), "[data] loss must be 'replies' or 'all'"),
        (cfg.data.seq_len >= 2, "[data] seq_len must be >= 2"),
        (set(cfg.data.skill_weights) <= set(SKILLS) and all(w > 0 for w in cfg.data.skill_weights.values()),
         f"[data] skill_weights: keys must be among {sorted(SKILLS)}, weights > 0"),
        (cfg.train.steps >= 1 and cfg.train.batch_size >= 1, "[train] steps and batch_size must be >= 1"),
        (cfg.train.checkpoint_every >= 1, "[train] checkpoint_every must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise TrainConfigError(f"{path}: {msg}")
    from afedge.mixers import MIXERS
    if cfg.model.mixer not in MIXERS:
        raise TrainConfigError(f"{path}: [model] mixer '{cfg.model.mixer}' is not registered "
                               f"(known: {', '.join(MIXERS.names())})")
    if cfg.data.source == "text":
        cfg.data.path = str((Path(path).parent / cfg.data.path).resolve())
    if cfg.data.tokenizer != "bytes":
        cfg.data.tokenizer = str((Path(path).parent / cfg.data.tokenizer).resolve())
    return cfg


class Rows:
    """Training rows: (batch, seq_len + 1) token ids and a (batch, seq_len) loss mask over the targets."""

    def __init__(self, cfg: DataConfig) -> None:
        from afedge.tokenizer import byte_tokenizer, load_tokenizer
        self.cfg = cfg
        self.tok = byte_tokenizer() if cfg.tokenizer == "bytes" else load_tokenizer(Path(cfg.tokenizer))
        self.docs: list[str] = []
        if cfg.source == "text":
            p = Path(cfg.path)
            if not p.is_file():
                raise TrainConfigError(f"[data] path {p}: no such file")
            self.docs = [d.strip("\n") + "\n" for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]
            if not self.docs:
                raise TrainConfigError(f"[data] path {p}: no conversations in the file")

    def text(self, index: int) -> str:
        # Enough characters for seq_len + 1 tokens: a token covers at least one character.
        need = self.cfg.seq_len + 1
        if self.cfg.source == "demo":
            from afedge.demo.corpus import stream_text
            return stream_text(self.cfg.seed, index, need, self.cfg.skill_weights)
        rng, parts, n = random.Random(f"{self.cfg.seed}:{index}"), [], 0
        while n < need:
            parts.append(rng.choice(self.docs))
            n += len(parts[-1])
        return "".join(parts)

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from afedge.demo.format import reply_spans
        texts = [self.text(step * size + i) for i in range(size)]
        n = self.cfg.seq_len + 1
        ids = torch.zeros(size, n, dtype=torch.int64)
        mask = torch.zeros(size, n, dtype=torch.bool)
        for r, (text, enc) in enumerate(zip(texts, self.tok.encode_batch(texts))):
            if len(enc.ids) < n:
                raise TrainConfigError(f"row {step * size + r}: {len(enc.ids)} tokens, fewer than seq_len + 1")
            ids[r] = torch.tensor(enc.ids[:n])
            if self.cfg.loss == "all":
                mask[r] = True
                continue
            starts = torch.tensor([o[0] for o in enc.offsets[:n]])
            for a, b in reply_spans(text):
                mask[r] |= (starts >= a) & (starts < b)
        return ids, mask[:, 1:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def make_optimizer(model: LM, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms, biases, decays and other vectors."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def loss_fn(model: LM, ids: torch.Tensor, mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean cross-entropy over the masked targets. ids: (B, T + 1), mask: (B, T)."""
    logits, _ = model(ids[:, :-1], None, chunk_size)  # (B, T, V)
    ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    m = mask.flatten().float()
    return (ce * m).sum() / m.sum().clamp(min=1.0)


# -- checkpoints -----------------------------------------------------------------------------------------------------

def save_training_checkpoint(out: Path, model: LM, opt: torch.optim.AdamW, step: int, cfg: RunConfig, tok,
                             meta: dict) -> Path:
    """Write `<out>/checkpoint/` atomically: model (load_checkpoint-compatible), tokenizer, optimizer moments."""
    from safetensors.torch import save_file

    from afedge.bundle import staged
    from afedge.checkpoint import save_checkpoint
    with staged(out / CHECKPOINT) as tmp:
        save_checkpoint(model, tmp)
        tok.save(str(tmp / TOKENIZER))
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in sd["state"].items() for k, v in s.items()}
        info = {"step": step, "fingerprint": cfg.fingerprint(), "param_groups": sd["param_groups"]} | meta
        save_file(tensors, str(tmp / TRAIN_STATE), metadata={"afedge_train": json.dumps(info)})
    return out / CHECKPOINT


def load_training_state(ckpt: Path, opt: torch.optim.AdamW, cfg: RunConfig) -> dict:
    """Restore the optimizer from `ckpt`; refuse a checkpoint written by a different config."""
    from safetensors import safe_open
    path = ckpt / TRAIN_STATE
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["afedge_train"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own types on corrupt files
        raise TrainConfigError(f"{path}: not a readable training state ({e}); delete {ckpt} to start over") from None
    if info["fingerprint"] != cfg.fingerprint():
        raise TrainConfigError(f"{path}: written by a different config (fingerprint {info['fingerprint']}, this "
                               f"config {cfg.fingerprint()}); use another [train] out or --fresh")
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = t
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return info


# -- the loop --------------------------------------------------------------------------------------------------------

def _restore(cfg: RunConfig, ckpt: Path, fresh: bool, log) -> tuple[LM, torch.optim.AdamW, dict]:
    """A new model and optimizer, or the ones in `ckpt` (with its step, wall and CPU seconds) to resume."""
    from afedge.checkpoint import load_checkpoint
    if fresh or not (ckpt / TRAIN_STATE).is_file():
        model = LM(cfg.model)
        return model, make_optimizer(model, cfg.train), {"step": 0}
    model = load_checkpoint(ckpt)
    if model.cfg != cfg.model:
        raise TrainConfigError(f"{ckpt}: the checkpoint's model config differs from [model]; use --fresh")
    opt = make_optimizer(model, cfg.train)
    info = load_training_state(ckpt, opt, cfg)
    log(f"resuming {ckpt} at step {info['step']}/{cfg.train.steps}")
    return model, opt, info


def train(cfg: RunConfig, fresh: bool = False, progress: bool = True, log=print) -> Path:
    """Train (or resume) and return the final checkpoint directory."""
    from tqdm import tqdm
    torch.set_num_threads(cfg.train.threads)
    if cfg.train.threads > 1 and "OMP_WAIT_POLICY" not in os.environ:
        log("tip: on a loaded machine set OMP_WAIT_POLICY=PASSIVE (spinning OpenMP threads made steps 10x slower "
            "under load); on a quiet one leave it unset (the demo: 0.44 s a step, 0.73-1.0 s with PASSIVE)")
    out = Path(cfg.train.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = Rows(cfg.data)
    if (n := rows.tok.get_vocab_size(with_added_tokens=True)) > cfg.model.vocab_size:
        raise TrainConfigError(f"[model] vocab_size {cfg.model.vocab_size} is smaller than the tokenizer's {n} ids")
    ckpt = out / CHECKPOINT
    model, opt, info = _restore(cfg, ckpt, fresh, log)
    start, elapsed, cpu_used = info["step"], info.get("elapsed_s", 0.0), info.get("cpu_s", 0.0)
    model.train()
    log(f"training {cfg.model.mixer} x{cfg.model.n_layers} d{cfg.model.d_model}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{cfg.train.steps} steps of {cfg.train.batch_size}x{cfg.data.seq_len} tokens")
    logf = (out / "log.jsonl").open("a", buffering=1)  # line-buffered: `tail -f` shows every step
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps, disable=not progress,
               unit="step", dynamic_ncols=True)
    step_loss = torch.compile(loss_fn, dynamic=False) if cfg.train.compile else loss_fn
    t0, c0, loss_ema, now, cpu = time.perf_counter(), time.process_time(), 0.0, elapsed, cpu_used
    for step in bar:
        ids, mask = rows.batch(step, cfg.train.batch_size)
        lr = lr_at(step, cfg.train)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step_loss(model, ids, mask, cfg.train.chunk_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        loss_ema = loss.item() if step == start else 0.95 * loss_ema + 0.05 * loss.item()
        now, cpu = elapsed + time.perf_counter() - t0, cpu_used + time.process_time() - c0
        tok_s = (step + 1 - start) * ids[:, :-1].numel() / max(1e-9, time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss_ema:.3f}", tok_s=f"{tok_s:.0f}")
        logf.write(json.dumps({"step": step + 1, "loss": round(loss.item(), 5), "grad_norm": round(gnorm.item(), 4),
                               "lr": lr, "elapsed_s": round(now, 2), "cpu_s": round(cpu, 2)}) + "\n")
        if (step + 1) % cfg.train.checkpoint_every == 0 or step + 1 == cfg.train.steps:
            model.eval()
            save_training_checkpoint(out, model, opt, step + 1, cfg, rows.tok,
                                     {"elapsed_s": now, "cpu_s": cpu, "loss_ema": loss_ema})
            model.train()
    bar.close()
    logf.close()
    model.eval()
    if start < cfg.train.steps:
        log(f"done: {cfg.train.steps} steps, loss {loss_ema:.4f}, {now:.0f} s wall ({cpu:.0f} CPU-s) of training "
            f"in all -> {ckpt}")
    return ckpt


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(Path(args.config))
    if args.steps:
        cfg.train.steps = args.steps
    if args.out:
        cfg.train.out = args.out
    train(cfg, fresh=args.fresh, progress=not args.no_progress)
    return 0


def add_parser(sub) -> None:
    s = sub.add_parser("train", help="train a zoo model on a text corpus or the demo dialogues (resumable)")
    s.add_argument("--config", required=True, help="a TOML training config (e.g. afedge/demo/train.toml)")
    s.add_argument("--out", help="run directory (overrides [train] out)")
    s.add_argument("--steps", type=int, help="total steps (overrides [train] steps and so the LR schedule)")
    s.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    s.set_defaults(fn=cmd_train)
