"""Bundles: a directory with the artifacts, the tokenizer, the reference weights and `manifest.json`.

Written into a temporary sibling directory and swapped into place atomically; a lock file keeps two writers apart.
The manifest carries the sha256 of every file and a digest of itself; `load_bundle` verifies schema, structure and
hashes before anything is parsed. A bundle may also travel as a .zip (`zip_bundle`); `unzip_bundle` refuses any
archive with unsafe entries before it writes a byte, and `open_bundle` reads either form.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
import weakref
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from afedge.exporting import Artifact
from afedge.session import ProgramInfo
from afedge.state import StateSpec

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("schema_version", "model", "program", "state", "target", "quant", "artifacts", "files", "parity")
SELF_DIGEST = "manifest_sha256"   # sha256 of the canonical manifest without this field: catches edits, not forgers
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST}
    body = json.loads(json.dumps(body))  # what a reader sees: int keys (per-layer tables) become strings
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    manifest[SELF_DIGEST] = manifest_digest(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def safe_relpath(rel: object) -> bool:
    """A non-empty relative POSIX path with no `..`, no absolute or drive prefix, no backslash or NUL."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or re.match(r"^[A-Za-z]:", rel):
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and all(part not in ("", ".", "..") for part in rel.split("/"))


def _check_structure(mpath: Path, m: dict) -> None:
    """Every field the loaders read has the right type; every path stays inside the bundle and is listed."""
    def bad(field: str, why: str) -> BundleError:
        return BundleError(f"{mpath}: field '{field}' {why} (the manifest was edited or corrupted)")

    if m.get(SELF_DIGEST) != manifest_digest(m):
        raise bad(SELF_DIGEST, "does not match the manifest's content" if SELF_DIGEST in m else "is missing")
    files = m["files"]
    if not isinstance(files, dict):
        raise bad("files", "must be an object")
    for rel, meta in files.items():
        if not safe_relpath(rel):
            raise bad(f"files.{rel}", "is not a safe relative path inside the bundle")
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and _SHA256.fullmatch(meta["sha256"])
                and type(meta.get("bytes")) is int):
            raise bad(f"files.{rel}", "needs a sha256 (64 hex digits) and a byte count")
    for key in ("model", "program", "target", "parity"):
        if not isinstance(m[key], dict):
            raise bad(key, "must be an object")
    if not isinstance(m["artifacts"], list):
        raise bad("artifacts", "must be a list")
    for i, a in enumerate(m["artifacts"]):
        try:
            art = Artifact.from_json(a)
        except TypeError as e:
            raise bad(f"artifacts[{i}]", f"is not an artifact ({e})") from None
        if not isinstance(art.files, dict):
            raise bad(f"artifacts[{i}].files", "must be an object")
        if unlisted := [f for f in art.files.values() if f not in files]:
            raise bad(f"artifacts[{i}].files", f"names files not in the file table: {unlisted}")
    if "tokenizer" in m and m["tokenizer"] not in files:
        raise bad("tokenizer", f"names '{m['tokenizer']}', which is not in the file table")
    try:
        StateSpec.from_json(m["state"])
    except (TypeError, KeyError, AttributeError) as e:
        raise bad("state", f"is not a state contract ({e})") from None
    for key in ("vocab_size", "prefill_len", "chunk_size", "batch"):
        if key in m["program"] and not (type(m["program"][key]) is int and m["program"][key] > 0):
            raise bad(f"program.{key}", f"must be a positive integer, got {m['program'][key]!r}")


def load_bundle(path: Path) -> Bundle:
    """Open a bundle directory, refusing unknown schemas, edited manifests, links and special files, unlisted
    files and hash mismatches; nothing inside the bundle is parsed before every hash has been checked."""
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
    _check_structure(mpath, manifest)
    listed = manifest["files"]
    on_disk = set()
    for p in path.rglob("*"):
        if p.is_symlink() or not (p.is_file() or p.is_dir()):
            raise BundleError(f"{p}: a {'link' if p.is_symlink() else 'special file'} inside the bundle "
                              f"(bundles hold regular files only)")
        if p.is_file() and p != mpath:
            on_disk.add(p.relative_to(path).as_posix())
    if extra := sorted(on_disk - set(listed)):
        raise BundleError(f"{path}: files not listed in the manifest: {extra}")
    for rel, meta in listed.items():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != meta["bytes"] or sha256(f) != meta["sha256"]:
            raise BundleError(f"{f}: sha256 mismatch with the manifest (the file was modified or corrupted)")
    return Bundle(path, manifest)


def open_bundle(path: Path) -> Bundle:
    """`load_bundle` for a directory; a .zip is checked (`unzip_bundle`), unpacked into a private temporary
    directory (removed when the Bundle is garbage-collected or the process exits) and then loaded."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        _archive_members(path)  # refuse before creating anything
        root = Path(tempfile.mkdtemp(prefix="afedge-bundle-"))
        try:
            bundle = unzip_bundle(path, root / path.stem)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        weakref.finalize(bundle, shutil.rmtree, root, True)
        return bundle
    if path.is_file():
        raise BundleError(f"{path}: not a bundle (a bundle is a directory with {MANIFEST}, or its .zip)")
    return load_bundle(path)


# -- writing: lock, stage, swap --------------------------------------------------------------------------------------

def _holder(fd: int) -> str:
    for _ in range(20):  # the holder writes its PID right after taking the lock
        if pid := os.pread(fd, 32, 0).decode(errors="replace").strip():
            return pid
        time.sleep(0.01)
    return "?"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `.<name>.lock` beside `out` (an flock, released by the kernel if the holder dies); a second writer
    gets BundleError "locked by PID n"."""
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise BundleError(f"{out}: locked by PID {pid} (another export is writing it)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by the last holder meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _clean_stale(out: Path) -> None:
    """With the lock held, every temporary beside `out` is a dead writer's: remove it. A `.old-*` left between
    the two renames of the fallback swap is restored when `out` itself is missing."""
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            old.rename(out)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _disk_full(e: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT error behind `e` (also safetensors' and TVM's wrapped forms), or None."""
    seen = []
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if re.search(r"No space left on device|StorageFull|os error 28|Disk quota exceeded", str(e)):
            return OSError(errno.ENOSPC, "No space left on device")
        e = e.__cause__ or e.__context__
    return None


def _last_written(root: Path) -> str:
    """The file under `root` modified last (the one a full disk interrupted), or `root` itself."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    return str(max(files, key=lambda p: p.stat().st_mtime_ns)) if files else f"into {root}"


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def staged(out: Path, need_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one atomic swap, on failure it
    is removed and `out` is untouched.

    A lock (`.<name>.lock`, holding the PID) refuses a second concurrent writer; stale temporaries of dead
    writers are cleaned first. `need_bytes` (a lower bound of the bundle's size) is checked against the free
    space before anything is written; a full disk during the write is a BundleError naming the file and bytes."""
    out = Path(out).absolute()
    with contextlib.ExitStack() as stack:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(out))
        except OSError as e:
            raise BundleError(f"{out}: cannot write the bundle: {out.parent} is not writable "
                              f"({e.strerror or e})") from None
        yield from _write(out, need_bytes)


def _write(out: Path, need_bytes: int) -> Iterator[Path]:
    """The body of `staged` once the lock is held: clean, check space, yield the temporary, swap it in."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        try:
            _clean_stale(out)
            tmp.mkdir()
        except OSError as e:
            raise BundleError(f"{out}: cannot write the bundle: {e.strerror or e} ({e.filename or out.parent})"
                              ) from e
        free = shutil.disk_usage(out.parent).free
        if need_bytes > free:
            raise BundleError(f"{out}: not enough disk space: the bundle needs at least {need_bytes} bytes, "
                              f"{free} are free on {out.parent}")
        try:
            yield tmp
        except Exception as e:
            if (full := _disk_full(e)) is None:
                raise
            written = _tree_bytes(tmp)
            raise BundleError(f"{out}: disk full writing {full.filename or _last_written(tmp)}: the bundle needs "
                              f"at least {max(need_bytes, written)} bytes ({written} written before the error), "
                              f"{shutil.disk_usage(out.parent).free} are free on {out.parent}; the previous "
                              f"bundle is untouched") from e
        try:
            if not out.exists():
                tmp.rename(out)
            elif not _exchange(tmp, out):  # fallback: two renames; `_clean_stale` repairs a crash between them
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise BundleError(f"{out}: cannot move the new bundle into place: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap it holds the previous bundle


# -- archives --------------------------------------------------------------------------------------------------------

MAX_ARCHIVE_MEMBERS = 10_000


def _archive_members(zip_path: Path) -> list[zipfile.ZipInfo]:
    """Every member of a bundle archive, or BundleError naming the first unsafe one: `..` or absolute names,
    links, devices, FIFOs, sockets, duplicates, encryption; also an archive bigger than the free disk space."""
    try:
        with zipfile.ZipFile(zip_path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleError(f"{zip_path}: not a readable zip archive ({e})") from None
    if len(infos) > MAX_ARCHIVE_MEMBERS:
        raise BundleError(f"{zip_path}: {len(infos)} members, more than a bundle holds ({MAX_ARCHIVE_MEMBERS})")
    seen: set[str] = set()
    for info in infos:
        name = info.filename.rstrip("/") if info.is_dir() else info.filename
        why = ""
        mode = info.external_attr >> 16
        if not safe_relpath(name):
            why = "an absolute or parent-relative path"
        elif mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            why = "a link" if stat.S_ISLNK(mode) else "a device, FIFO or socket"
        elif info.flag_bits & 0x1:
            why = "encrypted"
        elif name in seen:
            why = "a duplicate name"
        if why:
            raise BundleError(f"{zip_path}: member '{info.filename}' is {why}; the whole archive is refused "
                              f"and nothing was written")
        seen.add(name)
    total = sum(i.file_size for i in infos)
    free = shutil.disk_usage(Path(zip_path).absolute().parent).free
    if total > free:
        raise BundleError(f"{zip_path}: unpacks to {total} bytes, only {free} are free")
    return infos


def unzip_bundle(zip_path: Path, dest: Path) -> Bundle:
    """Unpack a bundle archive into `dest` (staged, so `dest` holds the old content or the new, verified bundle);
    an unsafe member refuses the whole archive before anything is written."""
    infos = _archive_members(zip_path)
    with zipfile.ZipFile(zip_path) as z, staged(dest) as tmp:
        for info in infos:
            target = tmp / info.filename
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(target, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        load_bundle(tmp)  # the unpacked tree must verify before it replaces `dest`
    return load_bundle(dest)


def zip_bundle(bundle_dir: Path, zip_path: Path) -> Path:
    """Write `bundle_dir` as a .zip (written to a temporary file, then renamed)."""
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
