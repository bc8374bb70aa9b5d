"""Conversation state files: safetensors (no pickle) whose header names the model fingerprint.

Tensors are the state slots under their contract names; `__metadata__` holds the format tag, the fingerprint,
tokens seen, the pending token ids (the newline that ends the last reply, fed with the next turn) and the sha256 of
the state bytes in slot order, so a truncated or bit-flipped file is refused. The Android app writes the same files.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afedge.state import StateSpec

FORMAT, VERSION = "afedge-chat-state", "1"


class StateFileError(ValueError):
    """A state file from another model, of another format, or corrupted; the message names the file."""


@dataclass(frozen=True)
class SavedState:
    state: list[np.ndarray]
    pending: list[int]
    tokens_seen: int


def model_fingerprint(weights_sha256: str, spec: StateSpec) -> str:
    """sha256 over the reference weights' sha256 and the state contract (names, dtypes, shapes), hex.

    The Android app computes the same string from manifest.json: one line per slot, `name:dtype:d0xd1x...`."""
    lines = [weights_sha256, *(f"{s.name}:{s.dtype}:{'x'.join(map(str, s.shape))}" for s in spec.slots)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def bundle_fingerprint(manifest: dict, spec: StateSpec) -> str:
    weights = f"{manifest['model']['reference']}/model.safetensors"
    return model_fingerprint(manifest["files"][weights]["sha256"], spec)


def state_digest(state: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for t in state:
        h.update(np.ascontiguousarray(t).tobytes())
    return h.hexdigest()


def save_state(path: Path, saved: SavedState, spec: StateSpec, fingerprint: str) -> Path:
    """Write atomically (temporary file + rename)."""
    from safetensors.numpy import save_file
    spec.check(saved.state, "save")
    path = Path(path)
    meta = {"format": FORMAT, "version": VERSION, "model_fingerprint": fingerprint,
            "tokens_seen": str(saved.tokens_seen), "pending": ",".join(map(str, saved.pending)),
            "sha256": state_digest(saved.state)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({s.name: np.ascontiguousarray(t) for s, t in zip(spec.slots, saved.state)}, str(tmp), meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state(path: Path, spec: StateSpec, fingerprint: str) -> SavedState:
    """Read and check a state file against this model; StateFileError names the file and what is wrong."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types on malformed files
        raise StateFileError(f"{path}: not a safetensors state file ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StateFileError(f"{path}: not an {FORMAT} v{VERSION} file (format {meta.get('format')!r}, "
                             f"version {meta.get('version')!r})")
    if meta.get("model_fingerprint") != fingerprint:
        raise StateFileError(f"{path}: saved from another model (fingerprint {meta.get('model_fingerprint')}, "
                             f"this model {fingerprint})")
    if missing := [n for n in spec.names if n not in tensors]:
        raise StateFileError(f"{path}: state slots {missing} are missing")
    state = [tensors[n] for n in spec.names]
    try:
        spec.check(state, str(path))
        pending = [int(t) for t in meta["pending"].split(",") if t]
        tokens_seen = int(meta["tokens_seen"])
    except (ValueError, KeyError) as e:
        raise StateFileError(f"{path}: {e}") from None
    if state_digest(state) != meta.get("sha256"):
        raise StateFileError(f"{path}: corrupted (the state bytes do not match the sha256 in its header)")
    return SavedState(state, pending, tokens_seen)
