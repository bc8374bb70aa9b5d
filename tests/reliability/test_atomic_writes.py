"""Cases 15-18: the output directory always holds a whole bundle (the old or the new, never a mix) whatever happens
to the writer: SIGKILL at any point, a full disk, a second writer, a read-only directory; odd paths work."""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import afedge.bundle as bundle
from afedge.bundle import BundleError, load_bundle, staged, write_manifest
from afedge.pipeline import open_session
from tests.reliability.conftest import assert_one_line_error, cli, tree

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {k: {} for k in ("model", "program", "target", "parity")} | {"state": [], "quant": "fp32", "artifacts": []}


def payload(tag: str) -> dict[str, bytes]:
    """The two data files of a bundle saying `tag` (what writer_child writes too)."""
    return {"a.bin": f"{tag}-a".encode() * 1000, "b.bin": f"{tag}-b".encode() * 1000}


def data(out: Path) -> dict[str, bytes]:
    return {k: v for k, v in tree(out).items() if k != "manifest.json"}


def write(out: Path, tag: str) -> dict[str, bytes]:
    """A two-file bundle saying `tag`, written in-process; returns its files."""
    with staged(out) as tmp:
        for name, blob in payload(tag).items():
            (tmp / name).write_bytes(blob)
        write_manifest(tmp, MINIMAL)
    return tree(out)


def child(out: Path, tag: str, pause_at: str, marker: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.reliability.writer_child", str(out), tag, pause_at,
                             str(marker), *flags], cwd=ROOT, stderr=subprocess.PIPE, text=True)


def wait_for(marker: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    """The PID the child wrote into `marker` once it reached its pause point."""
    t0 = time.monotonic()
    while not (marker.exists() and marker.read_text()):
        assert proc.poll() is None, f"writer exited early: {proc.stderr.read()}"
        assert time.monotonic() - t0 < timeout_s, "writer never reached its pause point"
        time.sleep(0.02)
    return int(marker.read_text())


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}.*"))


# -- case 15: SIGKILL mid-write ------------------------------------------------------------------------------------

@pytest.mark.parametrize("point, flags, survivor", [
    ("writing", (), "old"),
    ("before-swap", (), "old"),
    ("after-swap", (), "new"),
    ("between-renames", ("--no-exchange",), "restored"),
])
def test_sigkill_at_any_point_leaves_the_old_or_the_new_bundle(tmp_path, point, flags, survivor):
    out = tmp_path / "b"
    old = write(out, "old")
    proc = child(out, "new", point, tmp_path / "marker", *flags)
    wait_for(tmp_path / "marker", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert leftovers(tmp_path, "b"), "the killed writer should have left its temporaries"
    if survivor == "restored":  # the fallback's window: `out` is aside; the next writer puts it back first
        assert not out.exists()
        with pytest.raises(RuntimeError, match="give up"), staged(out):
            raise RuntimeError("give up")
    if survivor == "new":
        assert data(out) == payload("new")
    else:
        assert tree(out) == old
    load_bundle(out)
    write(out, "next")
    assert leftovers(tmp_path, "b") == []


def test_sigkilled_cli_export_leaves_the_previous_bundle(bundle_copy, checkpoint_dir):
    """A real `afedge export` killed once its temporary directory holds a file."""
    before = tree(bundle_copy)
    proc = subprocess.Popen([sys.executable, "-m", "afedge.cli", "export", "--target", "host", "--runtimes", "onnx",
                             "--model", str(checkpoint_dir), "--out", str(bundle_copy), "--no-verify"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not any(p.is_file() for t in bundle_copy.parent.glob(".host.tmp-*") for p in t.rglob("*")):
        assert proc.poll() is None and time.monotonic() - t0 < 300, "export ended before it was killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tree(bundle_copy) == before
    load_bundle(bundle_copy)
    with pytest.raises(RuntimeError, match="stop"), staged(bundle_copy):
        raise RuntimeError("stop")
    assert leftovers(bundle_copy.parent, "host") == [] and tree(bundle_copy) == before


# -- case 16: disk full --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *opts: str):
    """A tiny tmpfs at `path` (root only); skips the test where mounting is not allowed."""
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *opts]),
                                            "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the monkeypatched ENOSPC tests below run everywhere)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_names_path_and_bytes_and_keeps_the_old_bundle(tmp_path):
    with tmpfs(tmp_path / "small", "256k") as disk:
        out = disk / "b"
        old = write(out, "old")
        with pytest.raises(BundleError) as e, staged(out) as tmp:
            (tmp / "weights.bin").write_bytes(bytes(1 << 20))
        msg = str(e.value)
        assert f"{out}: disk full writing" in msg and "weights.bin" in msg and "needs at least" in msg
        assert tree(out) == old and leftovers(disk, "b") == []


def test_full_disk_during_a_real_export(tmp_path, checkpoint_dir, capsys):
    with tmpfs(tmp_path / "small", "64k") as disk:
        out = disk / "b"
        old = write(out, "old")
        rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                         "--out", out, "--no-verify")
        assert_one_line_error(rc, err, f"{out}: disk full", "needs at least", "the previous bundle is untouched")
        assert tree(out) == old and leftovers(disk, "b") == []


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device", "/x/model.pte"),
    RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
])
def test_enospc_from_any_writer_becomes_one_error(tmp_path, error):
    out = tmp_path / "b"
    old = write(out, "old")
    with pytest.raises(BundleError) as e, staged(out) as tmp:
        (tmp / "part.bin").write_bytes(bytes(1000))
        raise error
    assert "disk full writing" in str(e.value) and "1000 written before the error" in str(e.value)
    assert tree(out) == old and leftovers(tmp_path, "b") == []


def test_too_little_space_is_refused_before_writing(tmp_path):
    need = bundle.shutil.disk_usage(tmp_path).free + 1
    with pytest.raises(BundleError, match=f"needs at least {need} bytes"), staged(tmp_path / "b", need):
        raise AssertionError("the body must not run")
    assert list(tmp_path.iterdir()) == []


# -- case 17: two writers ------------------------------------------------------------------------------------------

def test_second_export_is_refused_with_the_holders_pid(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "b"
    proc = child(out, "first", "writing", tmp_path / "marker")
    pid = wait_for(tmp_path / "marker", proc)
    rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                     "--out", out)
    assert_one_line_error(rc, err, f"{out}: locked by PID {pid}")
    (tmp_path / "marker").unlink()
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert data(out) == payload("first")


def test_racing_writers_one_wins_files_never_mix(tmp_path):
    """Two writers started together; whichever takes the lock pauses mid-write until the other has given up."""
    out = tmp_path / "b"
    procs = {tag: child(out, tag, "writing", tmp_path / f"marker-{tag}") for tag in ("left", "right")}
    t0 = time.monotonic()
    while not any((tmp_path / f"marker-{t}").exists() for t in procs):
        assert time.monotonic() - t0 < 120, [p.poll() for p in procs.values()]
        time.sleep(0.02)
    winner = next(t for t in procs if (tmp_path / f"marker-{t}").exists())
    loser = next(t for t in procs if t != winner)
    assert procs[loser].wait(timeout=120) != 0
    assert f"{out}: locked by PID {procs[winner].pid}" in procs[loser].stderr.read()
    (tmp_path / f"marker-{winner}").unlink()
    assert procs[winner].wait(timeout=120) == 0, procs[winner].stderr.read()
    assert data(out) == payload(winner)
    load_bundle(out)


# -- case 18: read-only directory, odd paths -----------------------------------------------------------------------

@contextlib.contextmanager
def read_only_dir(path: Path):
    """A directory this process cannot write: mode 0555, or (root ignores modes) a read-only tmpfs."""
    if os.geteuid() == 0:
        with tmpfs(path, "64k", "ro") as ro:
            yield ro, "Read-only file system"
        return
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path, "Permission denied"
    finally:
        path.chmod(0o755)


def test_read_only_output_directory_is_one_clear_error(tmp_path, checkpoint_dir, capsys):
    with read_only_dir(tmp_path / "ro") as (ro, why):
        rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                         "--out", ro / "b")
        assert_one_line_error(rc, err, f"{ro / 'b'}: cannot write the bundle: {ro} is not writable", why)
        assert list(ro.iterdir()) == []


@pytest.mark.parametrize("runtime", ["onnx", "executorch", "tvm"])
def test_odd_paths_work_for_every_runtime(bundle_dir, runtime, capsys):
    assert " " in str(bundle_dir) and not str(bundle_dir).isascii()
    rc, out, err = cli(capsys, "run", bundle_dir, "--runtime", runtime, "--tokens", "1,2,3", "--max-new", "3")
    assert rc == 0, err
    b = load_bundle(bundle_dir)
    sess = open_session(b, b.artifact(runtime))
    assert [int(t) for t in out.split()] == greedy(sess, [1, 2, 3], 3)


def greedy(sess, prompt: list[int], n: int) -> list[int]:
    import numpy as np
    logits, state = sess.prefill(np.array([prompt]), sess.init_state())
    out = []
    for _ in range(n):
        out.append(int(logits.argmax(-1)[0]))
        logits, state = sess.step(np.array([out[-1]]), state)
    return out
