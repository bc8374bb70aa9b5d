"""Model checkpoints: a directory with `config.json` (LMConfig) and `model.safetensors`. No pickle, ever."""
from __future__ import annotations

import json
from pathlib import Path

from afedge.model import LM, LMConfig

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config; the message names the file/key."""


def save_checkpoint(model: LM, directory: Path) -> list[Path]:
    from safetensors.torch import save_model
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    save_model(model, str(directory / WEIGHTS))
    return [directory / CONFIG, directory / WEIGHTS]


def load_checkpoint(directory: Path) -> LM:
    """Rebuild an LM from `directory`; every key must be present with its shape (strict)."""
    from safetensors.torch import load_model
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (a checkpoint directory holds {CONFIG} and {WEIGHTS})")
    try:
        cfg = LMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    model = LM(cfg)
    try:
        missing, unexpected = load_model(model, str(w_path), strict=False)
    except Exception as e:  # safetensors raises its own error types on corrupt files / shape mismatches
        raise CheckpointError(f"{w_path}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{w_path}: keys differ from the config: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")
    return model.eval()
