"""Where a Hugging Face checkpoint comes from: a local directory, or a hub id fetched with huggingface_hub."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from afedge.hf.errors import HFImportError

# 'owner/name' or 'owner/name@revision', optionally prefixed 'hf:' (then also a bare 'name').
_HUB_ID = re.compile(r"(?:hf:(?P<bare>[\w.-]+)|(?:hf:)?(?P<id>[\w.-]+/[\w.-]+))(?:@(?P<rev>[\w./-]+))?")
# What a snapshot needs: the config, the tokenizer and the weights (safetensors when the repo has them).
_META = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
_SAFETENSORS = ["*.safetensors", "model.safetensors.index.json"]
_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


@dataclass(frozen=True)
class Source:
    path: Path                 # a local directory holding config.json, weights, tokenizer.json
    hub_id: str | None = None  # the repository it was fetched from
    revision: str | None = None  # the commit it was fetched at


def looks_like_hub_id(spec: str) -> bool:
    """True for 'owner/name[@rev]' or 'hf:...' that is not an existing path."""
    return not Path(spec).exists() and _HUB_ID.fullmatch(spec) is not None


def locate(spec: str | Path, revision: str | None = None) -> Source:
    """A local directory as is; a hub id downloaded (or found in the local cache when offline)."""
    path = Path(spec)
    if path.is_dir():
        return Source(path.resolve(), None, revision)
    m = _HUB_ID.fullmatch(str(spec))
    if m is None:
        raise HFImportError(f"--model '{spec}': not a local Hugging Face directory (config.json, weights, "
                            f"tokenizer.json) nor a hub id 'owner/name[@revision]'")
    return _download(m["id"] or m["bare"], m["rev"] or revision)


def _download(repo_id: str, revision: str | None) -> Source:
    from afedge.exporting import require
    hub = require("huggingface_hub", "hf")
    try:  # the small files first: offline or unreachable fails here at once (no retries), the cache still serves
        path = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=_META))
        weights = _SAFETENSORS + _BIN
        if not hub.constants.HF_HUB_OFFLINE:  # online: fetch one weight format only, safetensors first
            files = hub.HfApi().list_repo_files(repo_id, revision=path.name)
            weights = _SAFETENSORS if any(f.endswith(".safetensors") for f in files) else _BIN
        path = Path(hub.snapshot_download(repo_id, revision=path.name, allow_patterns=weights))
    except Exception as e:  # offline, unreachable, unknown or gated repository: one actionable message
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HFImportError(
            f"--model {repo_id}: not a local directory, and the Hugging Face Hub cannot provide it here ({reason}). "
            f"Use a local directory instead: download the repository where there is network "
            f"(`hf download {repo_id} --local-dir DIR`), copy DIR here and pass --model DIR") from None
    return Source(path, repo_id, path.name)  # snapshot directories are named by their commit


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(root: Path, files: list[Path]) -> dict[str, dict]:
    """{name relative to root: {sha256, bytes}} for the files an import read."""
    return {str(p.relative_to(root)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}
