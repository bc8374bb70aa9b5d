"""Shared fixtures of the hardening matrix (issue 11): one tiny exported bundle per session, copies to tamper with.

The bundle lives under a directory name with spaces and non-ASCII characters, so every test that uses it also
checks that odd paths work (case 18). Exported once, unverified (the parity gate is not under test here): ONNX,
ExecuTorch XNNPACK and the TVM host library of a 1-layer d=16 RetNet, prefill block 16.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from afedge import LM, LMConfig, to_recurrent
from afedge.bundle import MANIFEST, SELF_DIGEST, load_bundle, manifest_digest, write_manifest
from afedge.checkpoint import save_checkpoint
from afedge.cli import main
from afedge.target import load_target

ODD_DIR = "bündle ☃ with spaces"
EXPORTERS = ("onnx", "executorch", "tvm")


def tiny_config(**kw) -> LMConfig:
    return LMConfig(**({"d_model": 16, "n_layers": 1, "mixer": "retnet", "mixer_kwargs": {"n_heads": 2}} | kw))


def tiny_program(**kw):
    return to_recurrent(LM(tiny_config(**kw)), chunk_size=8, prefill_len=16)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """The session's exported bundle (read-only by convention: tests that modify one use `bundle_copy`)."""
    from afedge.pipeline import export_bundle
    out = tmp_path_factory.mktemp("reliability") / ODD_DIR / "host"
    export_bundle(tiny_program(), load_target("host"), out, list(EXPORTERS), verify=False, progress=lambda m: None)
    return out


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path) -> Path:
    dst = tmp_path / "copy" / "host"
    shutil.copytree(bundle_dir, dst)
    return dst


def resign(bundle: Path) -> None:
    """Recompute the manifest's file table and digest, as a tamperer who knows the format would."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    write_manifest(bundle, manifest)
    load_bundle(bundle)


def edit_manifest(bundle: Path, edit, redigest: bool = False) -> None:
    """Apply `edit(manifest) -> None` to manifest.json in place. The digest is left stale (a hand edit) unless
    `redigest` (a tamperer who knows the format and recomputes it, but not the file table)."""
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    if redigest:
        manifest[SELF_DIGEST] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture
def checkpoint_dir(tmp_path) -> Path:
    """A tiny afedge checkpoint directory (config.json + model.safetensors)."""
    d = tmp_path / "ckpt"
    save_checkpoint(LM(tiny_config()), d)
    return d


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `afedge argv...` in-process; (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit status 1, exactly one `afedge: error:` line, no traceback, every needle in that line; returns it."""
    assert rc == 1, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("afedge: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def tree(path: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under `path` (to prove a directory was not touched)."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _status(key: str) -> int:
    import re
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024


def peak_rss_growth(fn) -> tuple[object, int]:
    """(fn(), bytes by which this process's peak RSS rose above its RSS at the start of the call). Linux: the peak
    (VmHWM) is reset through /proc/self/clear_refs first."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    result = fn()
    return result, _status("VmHWM") - before
