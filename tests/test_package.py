"""Packaging: light import, console script, and a non-editable install that carries exporters/runtimes/targets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*cmd: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_import_is_light(tmp_path):
    code = ("import sys, afedge, afedge.exporters, afedge.runtimes; from afedge.exporting import load_plugins; "
            "load_plugins(); heavy = {'onnx', 'onnxruntime', 'executorch', 'tvm', 'transformers', 'rich'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = run(sys.executable, "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_console_script_help_and_version(tmp_path):
    exe = Path(sys.executable).with_name("afedge")
    assert run(str(exe), "--version", cwd=tmp_path).stdout.strip() == "afedge 0.1.0"
    helped = run(str(exe), "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "export" in helped.stdout and "parity" in helped.stdout


def test_wheel_install_imports_from_outside_the_repo(tmp_path):
    """`pip install .` (no editable) must carry the symlinked exporters/, runtimes/ and targets/ TOML."""
    site = tmp_path / "site"
    built = run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                "--target", str(site), str(ROOT), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    env = os.environ | {"PYTHONPATH": str(site)}
    code = ("import afedge, afedge.exporters, afedge.runtimes.torch; from afedge.target import target_names; "
            "print(afedge.__file__); print(target_names())")
    out = run(sys.executable, "-c", code, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].startswith(str(site))
    assert "android-arm64" in out.stdout and "host" in out.stdout


def test_symlinks_follow_the_design_card():
    for name in ("exporters", "runtimes", "targets"):
        link = ROOT / "afedge" / name
        assert link.is_symlink() and os.readlink(link) == f"../{name}"
