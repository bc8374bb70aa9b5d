"""Hugging Face checkpoints in: `mamba`, `mamba2`, `falcon_mamba` and `rwkv` models mapped 1:1 onto afedge mixers.

    from afedge.hf import load_hf
    resolved = load_hf("path/to/mamba-130m-hf")      # or a hub id, "state-spaces/mamba-130m-hf[@revision]"
    resolved.model, resolved.source, resolved.tokenizer

Loading goes through transformers (the class chosen by optimum's TasksManager), safetensors first, `.bin` only
with `torch.load(weights_only=True)`, and no remote code unless `trust_remote_code=True`. Heavy imports are lazy.
"""
from __future__ import annotations

from afedge.hf import mamba, mamba2, rwkv  # noqa: F401  (each registers its importers)
from afedge.hf.errors import HFImportError
from afedge.hf.importers import IMPORTERS, supported_types
from afedge.hf.loader import is_hf_directory, load_hf
from afedge.hf.source import looks_like_hub_id

__all__ = ["IMPORTERS", "HFImportError", "is_hf_directory", "load_hf", "looks_like_hub_id", "supported_types"]
