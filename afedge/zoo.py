"""The embedded default model and zoo presets (seeded, so a config alone rebuilds the weights)."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from afedge.checkpoint import load_checkpoint
from afedge.mixers import MIXERS
from afedge.model import LM, LMConfig

# The embedded default: the demo chat model shipped in the package (config.json, model.safetensors, tokenizer.json),
# trained by `afedge train --config afedge/demo/train.toml` (README: "The demo chat model").
DEFAULT = Path(str(resources.files("afedge.demo") / "model"))


def zoo_model(family: str, d_model: int = 64, n_layers: int = 2, seed: int = 0) -> LM:
    """A small random-init byte-level model of any registered family."""
    MIXERS.get(family)  # a clear error for unknown names
    return LM(LMConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, mixer=family, seed=seed))


@dataclass
class ResolvedModel:
    """A model ready to rewrite, with its `source` record for the manifest and the tokenizer.json to carry
    (None: the byte-level tokenizer)."""

    model: LM
    source: dict
    tokenizer: Path | None = None


def resolve_model(spec: str | None, trust_remote_code: bool = False) -> ResolvedModel:
    """`None` -> the embedded default; `zoo:<family>` -> a seeded zoo model; a directory -> an afedge checkpoint,
    or a Hugging Face model (its config.json has a `model_type`); `owner/name[@rev]` or `hf:...` -> a hub id."""
    if spec is None or spec == "default":
        model = load_checkpoint(DEFAULT)
        return ResolvedModel(model, {"kind": "default", "path": "afedge/demo/model", "config": model.cfg.to_dict()},
                             DEFAULT / "tokenizer.json")
    if spec.startswith("zoo:"):
        return ResolvedModel(zoo_model(spec.removeprefix("zoo:")), {"kind": "zoo", "family": spec.removeprefix("zoo:")})
    path = Path(spec)
    from afedge import hf  # light: transformers is imported only when a Hugging Face model is loaded
    if (path.is_dir() and hf.is_hf_directory(path)) or hf.looks_like_hub_id(spec):
        return hf.load_hf(spec, trust_remote_code=trust_remote_code)
    if path.is_dir():
        tok = path / "tokenizer.json"
        return ResolvedModel(load_checkpoint(path), {"kind": "checkpoint", "path": str(path.resolve())},
                             tok if tok.is_file() else None)
    raise ValueError(f"--model '{spec}': not 'default', 'zoo:<family>', a checkpoint or Hugging Face directory, "
                     f"or a hub id 'owner/name' (families: {', '.join(MIXERS.names())})")
