"""Bundles: a directory with the artifacts, the tokenizer, the reference weights and `manifest.json`.

Written into a temporary sibling directory and renamed into place; a lock file keeps two writers apart.
The manifest carries the sha256 of every file; `load_bundle` verifies schema and hashes before anything is parsed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from afedge.exporting import Artifact
from afedge.session import ProgramInfo
from afedge.state import StateSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("schema_version", "model", "program", "state", "target", "quant", "artifacts", "files", "parity")


class BundleError(ValueError):
    """A bundle that is missing, tampered with, or of an unknown schema; the message names the file or field."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict[str, dict]:
    """sha256 and size of every file under root except the manifest, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


@dataclass
class Bundle:
    path: Path
    manifest: dict

    @property
    def artifacts(self) -> list[Artifact]:
        return [Artifact.from_json(a) for a in self.manifest["artifacts"]]

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name or a.runtime == name:
                return a
        raise BundleError(f"{self.path}: no artifact '{name}'; it holds "
                          f"{', '.join(a.name for a in self.artifacts)}")

    @property
    def info(self) -> ProgramInfo:
        p = self.manifest["program"]
        return ProgramInfo(StateSpec.from_json(self.manifest["state"]), p["vocab_size"], p["prefill_len"], p["batch"])

    @property
    def target(self) -> str:
        return self.manifest["target"]["name"]

    def file(self, rel: str) -> Path:
        return self.path / rel


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = manifest | {"schema_version": SCHEMA_VERSION, "files": file_table(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def load_bundle(path: Path) -> Bundle:
    """Open a bundle directory, refusing unknown schemas, missing fields, unlisted files and hash mismatches."""
    path = Path(path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{path}: not a bundle ({MANIFEST} is missing)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: the manifest must be a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mpath}: schema_version {manifest.get('schema_version')!r} is not supported "
                          f"(this afedge reads {SCHEMA_VERSION})")
    if missing := [k for k in REQUIRED if k not in manifest]:
        raise BundleError(f"{mpath}: missing fields {missing}")
    listed = manifest["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    if extra := sorted(on_disk - set(listed)):
        raise BundleError(f"{path}: files not listed in the manifest: {extra}")
    for rel, meta in listed.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
            raise BundleError(f"{f}: sha256 mismatch with the manifest (the file was modified or corrupted)")
    return Bundle(path, manifest)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out`, on failure it is removed.

    A lock file (`.<name>.lock` holding the PID) refuses a second concurrent writer; stale temporaries and
    locks from dead processes are cleaned first."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        if not _pid_alive(int(stale.name.rsplit("-", 1)[1])):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pid = int(lock.read_text() or 0)
        if _pid_alive(pid):
            raise BundleError(f"{out}: locked by PID {pid} (another export is writing it)") from None
        lock.unlink()
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lock.unlink(missing_ok=True)


def zip_bundle(bundle_dir: Path, zip_path: Path) -> Path:
    """Write `bundle_dir` as a .zip (written to a temporary file, then renamed)."""
    import zipfile
    tmp = zip_path.with_name(f".{zip_path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for p in sorted(bundle_dir.rglob("*")):
                if p.is_file():
                    z.write(p, p.relative_to(bundle_dir).as_posix())
        tmp.rename(zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path
