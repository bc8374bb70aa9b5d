"""Model checkpoints: a directory with `config.json` (LMConfig) and `model.safetensors`. No pickle, ever.

A safetensors file is checked before anything large is allocated: the 8-byte header length and the JSON header are
read here and bounded, every tensor's dtype / shape / data_offsets must agree, offsets must tile the data region
exactly, and the file must hold exactly the bytes the header promises. Git-LFS pointers and HTML pages saved in
place of the weights are recognised and named. The keys and shapes are then diffed against the config (a model built
on the meta device, so a bad config allocates nothing) before the weights are loaded strictly."""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from afedge.model import LM, LMConfig

CONFIG, WEIGHTS = "config.json", "model.safetensors"
MAX_HEADER_BYTES = 100_000_000   # the safetensors format's own bound on the JSON header
# Bytes per element of every safetensors dtype.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
            "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
_LFS = b"version https://git-lfs.github.com/spec/"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not match its config; the message names the file/key."""


def save_checkpoint(model: LM, directory: Path) -> list[Path]:
    from safetensors.torch import save_model
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    save_model(model, str(directory / WEIGHTS))
    return [directory / CONFIG, directory / WEIGHTS]


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt checkpoint: {why}")


def _not_weights(path: Path, head: bytes, size: int) -> CheckpointError | None:
    """A Git-LFS pointer or an HTML page saved where the weights should be, or None."""
    if head.startswith(_LFS):
        fields = dict(line.split(" ", 1) for line in head.decode("utf-8", "replace").splitlines() if " " in line)
        want = f"expected {fields['size']} bytes, " if fields.get("size", "").isdigit() else ""
        return _corrupt(path, f"a Git-LFS pointer ({want}actual {size} bytes), not the weights: fetch the real file "
                              f"(`git lfs pull` in the repository, or download it again)")
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return _corrupt(path, f"an HTML page ({size} bytes), not a safetensors file: the download saved a web page "
                              f"(a login or error page?); fetch the real file")
    return None


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Validate the structure of a safetensors file without loading its data.

    Returns name -> {"dtype", "shape", "data_offsets"} (no `__metadata__`). Raises CheckpointError ("corrupt
    checkpoint", with expected vs actual bytes) for an empty / truncated / padded file, a bloated or malformed
    header, an unknown dtype, a shape that disagrees with its byte range, and overlapping or out-of-range offsets."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(min(size, 512))
        if bad := _not_weights(path, head, size):
            raise bad
        if size < 8:
            raise _corrupt(path, f"{size} bytes; a safetensors file holds at least 8 (the header length)")
        (n,) = struct.unpack("<Q", head[:8])
        if n > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {n} bytes exceeds the format's limit of {MAX_HEADER_BYTES}")
        if 8 + n > size:
            raise _corrupt(path, f"truncated: the header alone needs {8 + n} bytes, the file has {size}")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path, f"the {n}-byte header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    header.pop("__metadata__", None)
    spans = []
    for name, t in header.items():
        if not (isinstance(t, dict) and {"dtype", "shape", "data_offsets"} <= set(t)):
            raise _corrupt(path, f"tensor '{name}': header entry needs dtype, shape and data_offsets")
        dtype, shape, offs = t["dtype"], t["shape"], t["data_offsets"]
        if dtype not in ITEMSIZE:
            raise _corrupt(path, f"tensor '{name}': unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise _corrupt(path, f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise _corrupt(path, f"tensor '{name}': data_offsets {offs!r} are not [begin, end] with begin <= end")
        want = math.prod(shape) * ITEMSIZE[dtype]
        if offs[1] - offs[0] != want:
            raise _corrupt(path, f"tensor '{name}': {dtype}{shape} needs {want} bytes, its data_offsets {offs} "
                                 f"span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end, prev = 0, ""
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise _corrupt(path, f"tensor '{name}': data_offsets {[begin, stop]} overlap those of '{prev}'")
        if begin > end:
            raise _corrupt(path, f"tensor '{name}': a gap of {begin - end} bytes before its data")
        end, prev = stop, name
    if 8 + n + end != size:
        kind = "truncated" if 8 + n + end > size else "trailing bytes after the data"
        raise _corrupt(path, f"{kind}: expected {8 + n + end} bytes (header {8 + n} + data {end}), actual {size}")
    return header


def _expected_shapes(cfg: LMConfig) -> list[tuple[list[str], tuple[int, ...]]]:
    """[(aliases, shape)] of every state_dict entry (tied weights are one entry with several names), from a model
    built on the meta device (no memory). Mixers whose init needs real data are built normally instead."""
    try:
        with torch.device("meta"):
            model = LM(cfg)
    except (NotImplementedError, RuntimeError):
        model = LM(cfg)
    groups: dict[int, tuple[list[str], tuple[int, ...]]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), ([], tuple(t.shape)))[0].append(name)
    return list(groups.values())


def diff_keys(header: dict[str, dict], cfg: LMConfig) -> str:
    """'' when the file holds exactly the config's tensors with their shapes; else the diff, one clause per kind."""
    missing, wrong, known = [], [], set()
    for names, shape in _expected_shapes(cfg):
        known.update(names)
        present = [n for n in names if n in header]
        if not present:
            missing.append(f"{names[0]} {list(shape)}")
        for n in present:
            if tuple(header[n]["shape"]) != shape:
                wrong.append(f"{n}: file {header[n]['shape']} vs config {list(shape)}")
    unexpected = [f"{n} {header[n]['shape']}" for n in sorted(set(header) - known)]
    parts = [f"{label} [{', '.join(items)}]" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]
    return "; ".join(parts)


def nonfinite_tensors(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (NaN count, Inf count) of every floating parameter or buffer holding a non-finite value."""
    out = {}
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            out[name] = (int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))
    return out


def describe_nonfinite(bad: dict[str, tuple[int, int]], limit: int = 8) -> str:
    items = [f"{n} ({nan} NaN, {inf} Inf)" for n, (nan, inf) in list(bad.items())[:limit]]
    return ", ".join(items) + (f", ... {len(bad) - limit} more" if len(bad) > limit else "")


def load_checkpoint(directory: Path) -> LM:
    """Rebuild an LM from `directory`; every key must be present with its shape (strict)."""
    from safetensors.torch import load_model
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (a checkpoint directory holds {CONFIG} and {WEIGHTS})")
    try:
        cfg = LMConfig.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    header = read_safetensors_header(w_path)
    try:
        diff = diff_keys(header, cfg)
    except (TypeError, ValueError, KeyError) as e:  # the config names an unknown mixer or a bad field value
        raise CheckpointError(f"{cfg_path}: {e}") from None
    if diff:
        raise CheckpointError(f"{w_path}: tensors do not match {cfg_path}: {diff}")
    model = LM(cfg)
    try:
        load_model(model, str(w_path), strict=True)
    except Exception as e:  # safetensors raises its own error types; the header checks above make this rare
        raise CheckpointError(f"{w_path}: {e}") from None
    return model.eval()
