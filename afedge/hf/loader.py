"""Import a Hugging Face checkpoint: locate it, refuse remote code and unsupported types, load it with transformers
(the class optimum's TasksManager names for its task), map its weights onto an afedge LM, and check the LM against
transformers' own forward on a short probe."""
from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from afedge.hf.errors import HFImportError
from afedge.hf.importers import IMPORTERS, Importer, supported_types
from afedge.hf.source import Source, file_records, locate
from afedge.model import LM
from afedge.parity.metrics import max_rel
from afedge.tolerances import IMPORT_NOISE_FACTOR, tolerance
from afedge.zoo import ResolvedModel

CONFIG, TOKENIZER = "config.json", "tokenizer.json"
TASK = "text-generation"  # afedge exports language models: the checkpoint must have its LM head
PROBE_TOKENS = 8          # length of the import check against transformers' forward
# Weight layouts in order of preference: (index or single file, is safetensors).
WEIGHTS = (("model.safetensors.index.json", True), ("model.safetensors", True),
           ("pytorch_model.bin.index.json", False), ("pytorch_model.bin", False))

SOURCE_KIND = "huggingface"   # manifest.model.source.kind of an imported checkpoint


def is_hf_directory(path: Path) -> bool:
    """A directory whose config.json names a Hugging Face `model_type` (afedge checkpoints have none)."""
    try:
        return "model_type" in json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_hf(spec: str | Path, trust_remote_code: bool = False, revision: str | None = None,
            check: bool = True) -> ResolvedModel:
    """A local Hugging Face directory or hub id -> the afedge LM, its manifest `source` record and tokenizer.json."""
    src = locate(spec, revision)
    raw = _read_config(src.path)
    importer = _importer(raw, src.path)
    _guard_remote_code(raw, src.path, trust_remote_code)
    weights, safetensors = _weight_files(src.path)
    tokenizer = src.path / TOKENIZER
    if not tokenizer.is_file():
        raise HFImportError(f"{src.path}: no {TOKENIZER}; afedge bundles carry the model's `tokenizers` file "
                            f"(a fast tokenizer writes it: AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))")
    hf_model, arch, task = _transformers_model(src.path, raw, trust_remote_code, safetensors)
    model = _build(importer, hf_model, src.path)
    source = _record(src, raw, arch, task, [src.path / CONFIG, *weights, tokenizer])
    if check:
        source["import_check"] = _check(model, hf_model, src.path)
    return ResolvedModel(model, source, tokenizer)


def _read_config(path: Path) -> dict:
    f = path / CONFIG
    try:
        raw = json.loads(f.read_text())
    except FileNotFoundError:
        raise HFImportError(f"{path}: no {CONFIG} (a Hugging Face model directory holds {CONFIG}, "
                            f"model.safetensors or pytorch_model.bin, and {TOKENIZER})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise HFImportError(f"{f}: unreadable ({e})") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise HFImportError(f"{f}: no 'model_type' field (not a Hugging Face config)")
    return raw


def _importer(raw: dict, path: Path) -> Importer:
    mt = raw["model_type"]
    if mt not in IMPORTERS:
        raise HFImportError(f"{path / CONFIG}: model_type '{mt}' is not supported; afedge imports these "
                            f"Hugging Face model types: {', '.join(supported_types())}")
    return IMPORTERS.get(mt)


def _guard_remote_code(raw: dict, path: Path, trust: bool) -> None:
    if raw.get("auto_map") and not trust:
        raise HFImportError(f"{path / CONFIG}: 'auto_map' points at custom modelling code "
                            f"({', '.join(sorted(set(map(str, raw['auto_map'].values()))))}); afedge runs no code "
                            f"from a checkpoint unless you pass --trust-remote-code")


def _weight_files(path: Path) -> tuple[list[Path], bool]:
    """The weight files an import reads (safetensors preferred) and whether they are safetensors."""
    for name, safetensors in WEIGHTS:
        f = path / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f], safetensors
        try:
            shards = sorted(set(json.loads(f.read_text())["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise HFImportError(f"{f}: not a valid weight index ({e})") from None
        if missing := [s for s in shards if not (path / s).is_file()]:
            raise HFImportError(f"{f}: shards missing from {path}: {', '.join(missing)}")
        return [f, *(path / s for s in shards)], safetensors
    raise HFImportError(f"{path}: no weights (model.safetensors, pytorch_model.bin or their .index.json shards)")


def _transformers_model(path: Path, raw: dict, trust: bool, safetensors: bool) -> tuple[Any, str | None, str]:
    """The checkpoint as a transformers model, in fp32 and eval mode; also its architecture and task."""
    from afedge.exporting import require
    transformers = require("transformers", "hf")
    tasks = require("optimum.exporters.tasks", "hf").TasksManager
    arch = (raw.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    task = tasks.infer_task_from_model(cls) if cls is not None else TASK
    if task != TASK:
        raise HFImportError(f"{path / CONFIG}: architecture {arch} is a '{task}' model; afedge needs a causal LM "
                            f"with its head ({raw['model_type']} ...ForCausalLM, task '{TASK}')")
    auto = tasks.get_model_class_for_task(task, framework="pt", model_type=raw["model_type"])
    try:
        with _quiet():
            model = auto.from_pretrained(str(path), dtype=torch.float32, use_safetensors=safetensors,
                                         weights_only=True, trust_remote_code=trust, local_files_only=True)
    except pickle.UnpicklingError:
        raise HFImportError(f"{path}: the .bin weights hold more than tensors, and torch.load(weights_only=True) "
                            f"refused them (afedge never unpickles code); where you trust the file, convert it to "
                            f"safetensors") from None
    except Exception as e:  # transformers raises many types; the first line names the problem
        why = (str(e).strip().splitlines() or [""])[0]
        raise HFImportError(f"{path}: transformers could not load the checkpoint: {type(e).__name__}: {why}") from None
    return model.eval(), arch, task


@contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or kernel-fallback notices from transformers (afedge never runs its kernels)."""
    from transformers.utils import logging as log
    bars, level = log.is_progress_bar_enabled(), log.get_verbosity()
    log.disable_progress_bar()
    log.set_verbosity_error()
    try:
        yield
    finally:
        log.set_verbosity(level)
        if bars:
            log.enable_progress_bar()


def _build(importer: Importer, hf_model: Any, path: Path) -> LM:
    cfg = importer.lm_config(hf_model.config)
    model = LM(cfg)
    state = importer.convert({k: v.detach() for k, v in hf_model.state_dict().items()}, hf_model.config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise HFImportError(f"{path}: {importer.model_type} weights do not fit the afedge model: {e}") from None
    if missing or unexpected:
        raise HFImportError(f"{path}: {importer.model_type} weights do not fill the afedge model: missing "
                            f"{sorted(missing)}, unexpected {sorted(unexpected)}")
    return model.eval()


@torch.no_grad()
def _check(model: LM, hf_model: Any, path: Path) -> dict:
    """afedge's parallel logits vs transformers' fp32 forward on a fixed probe; a mismatch is an import bug.

    Past the fp32 bound, the bound becomes IMPORT_NOISE_FACTOR x transformers' own fp32-vs-fp64 error (deep models
    amplify rounding; a wrong mapping is off by O(1)). This converts `hf_model` to fp64 in place."""
    tokens = torch.randint(0, model.cfg.vocab_size, (1, PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    with _quiet():
        want = hf_model(tokens, use_cache=False).logits
    got, _ = model(tokens)
    err, bound = max_rel(got, want), tolerance("fp32").max_rel
    record = {"tokens": PROBE_TOKENS, "max_rel": err, "tolerance": "fp32"}
    if err > bound:
        with _quiet():
            floor = max_rel(want, hf_model.double()(tokens, use_cache=False).logits)
        bound = max(bound, IMPORT_NOISE_FACTOR * floor)
        record |= {"transformers_fp32_vs_fp64": floor, "bound": bound}
    if not err <= bound:
        raise HFImportError(f"{path}: the imported afedge model differs from transformers' forward (max rel "
                            f"{err:.2e} > {bound:.1e} on a {PROBE_TOKENS}-token probe): an importer bug, please report")
    return record


def _record(src: Source, raw: dict, arch: str | None, task: str, files: list[Path]) -> dict:
    from importlib.metadata import version
    return {"kind": SOURCE_KIND, "id": src.hub_id, "revision": src.revision, "path": str(src.path),
            "model_type": raw["model_type"], "architecture": arch, "task": task,
            "transformers": version("transformers"), "files": file_records(src.path, files)}
