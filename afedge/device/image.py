"""`afedge device setup emu-arm64`: the emulated ARM64 Linux device, built into a cache folder.

Three parts, each built in a `.partial` folder and renamed when complete (so a refused download or a ^C leaves
nothing half-made, and a second run skips what is done):
  qemu-aarch64  QEMU 10 user mode from Debian trixie's `qemu-user` (a static binary). Bookworm's QEMU 7.2 shows the
                guest the host's x86 /proc/cpuinfo, which crashes onnxruntime's CPU detection. Checked end to end:
                trixie's InRelease (gpgv, Debian's archive keyring) -> Packages.xz sha256 -> the .deb's sha256.
  rootfs/       an arm64 Debian bookworm (Python 3.11) made with `debootstrap --foreign` plus `dpkg-deb -x` of its
                packages: no second stage, nothing runs as the guest's root, no binfmt handler is registered.
  site/         aarch64 wheels of the host's own versions of numpy, onnxruntime, apache-tvm (runtime library) and
                what they import, unpacked (the guest has no pip).
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

Progress = Callable[[str], None]

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
QEMU_SUITE, ROOTFS_SUITE, GUEST_PYTHON = "trixie", "bookworm", "3.11"
# What the device-side worker (and TVM's RPC server, run in-process: no pickling popen worker) imports; each at the
# version installed on the host.
GUEST_DISTS = ("numpy", "onnxruntime", "apache-tvm", "apache-tvm-ffi", "ml_dtypes", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_24_aarch64",
                   "manylinux2014_aarch64", "manylinux_2_17_aarch64")


class SetupError(RuntimeError):
    """The emulated device cannot be built here; the message says which step and what to do."""


def mirror() -> str:
    return os.environ.get("AFEDGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def cache_root() -> Path:
    return Path(os.environ.get("AFEDGE_CACHE") or Path.home() / ".cache" / "afedge")


@dataclass(frozen=True)
class EmuImage:
    """The built emulated device: QEMU, the guest root filesystem and its Python packages."""

    root: Path

    @property
    def qemu(self) -> Path:
        return self.root / "qemu-aarch64"

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{GUEST_PYTHON}"

    @property
    def record(self) -> Path:
        return self.root / "image.json"

    def command(self, cpu: str, argv: list[str]) -> list[str]:
        """`qemu-aarch64 -cpu CPU -L ROOTFS python3 ARGV...` (run explicitly; no binfmt handler involved)."""
        return [str(self.qemu), "-cpu", cpu, "-L", str(self.rootfs), str(self.python), *argv]

    def env(self) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        return keep | {"PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
                       "TVM_USE_RUNTIME_LIB": "1"}

    def info(self) -> dict:
        return json.loads(self.record.read_text())


def load_image(root: Path | None = None) -> EmuImage:
    image = EmuImage(root or cache_root() / "emu-arm64")
    if not image.record.is_file():
        raise SetupError(f"the emulated ARM64 device is not built in {image.root}: run "
                         f"`afedge device setup emu-arm64` first")
    return image


def _fetch(url: str, dest: Path, progress: Progress) -> Path:
    progress(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except (urllib.error.URLError, OSError) as e:
        raise SetupError(f"downloading {url} failed ({getattr(e, 'reason', e)}): building emu-arm64 needs "
                         f"{mirror()} (or AFEDGE_DEBIAN_MIRROR) and PyPI; on a machine without them, copy a cache "
                         f"folder built elsewhere (AFEDGE_CACHE)") from None
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: Path, want: str, what: str) -> None:
    if (got := _sha256(path)) != want:
        raise SetupError(f"{what}: sha256 {got} does not match the signed index ({want}); refusing it")


def _tool(name: str, package: str) -> str:
    if not (path := shutil.which(name)):
        raise SetupError(f"'{name}' is not installed: `apt-get install {package}` (or `make system-deps`)")
    return path


def _stanza(packages: str, name: str) -> dict[str, str]:
    for block in packages.split("\n\n"):
        if block.startswith(f"Package: {name}\n"):
            return dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and line[0] != " ")
    raise SetupError(f"Debian {QEMU_SUITE} has no package '{name}'")


def build_qemu(image: EmuImage, progress: Progress) -> None:
    if image.qemu.is_file():
        return
    gpgv, dpkg_deb = _tool("gpgv", "gpgv"), _tool("dpkg-deb", "dpkg")
    with tempfile.TemporaryDirectory(dir=image.root) as tmp:
        t = Path(tmp)
        release = _fetch(f"{mirror()}/dists/{QEMU_SUITE}/InRelease", t / "InRelease", progress)
        check = subprocess.run([gpgv, "--keyring", str(KEYRING), str(release)], capture_output=True, text=True)
        if check.returncode:
            raise SetupError(f"Debian {QEMU_SUITE} InRelease does not verify against {KEYRING}: "
                             f"{check.stderr.strip().splitlines()[-1:]}")
        index = "main/binary-amd64/Packages.xz"
        m = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(index)}$", release.read_text(), re.M)
        if not m:
            raise SetupError(f"Debian {QEMU_SUITE} InRelease lists no sha256 for {index}")
        packages = _fetch(f"{mirror()}/dists/{QEMU_SUITE}/{index}", t / "Packages.xz", progress)
        _check_sha(packages, m[1], index)
        entry = _stanza(lzma.decompress(packages.read_bytes()).decode(), "qemu-user")
        deb = _fetch(f"{mirror()}/{entry['Filename']}", t / "qemu-user.deb", progress)
        _check_sha(deb, entry["SHA256"], entry["Filename"])
        subprocess.run([dpkg_deb, "-x", str(deb), str(t / "x")], check=True)
        partial = image.root / "qemu-aarch64.partial"
        shutil.copy2(t / "x" / "usr" / "bin" / "qemu-aarch64", partial)
        (image.root / "qemu.json").write_text(json.dumps({"version": entry["Version"], "suite": QEMU_SUITE,
                                                          "sha256": _sha256(partial)}))
        partial.rename(image.qemu)


def build_rootfs(image: EmuImage, progress: Progress) -> None:
    if image.python.is_file():
        return
    debootstrap, dpkg_deb = _tool("debootstrap", "debootstrap"), _tool("dpkg-deb", "dpkg")
    partial = image.root / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    progress(f"debootstrap --foreign arm64 {ROOTFS_SUITE} (python3) from {mirror()}")
    run = subprocess.run([debootstrap, "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3",
                          ROOTFS_SUITE, str(partial), mirror()], capture_output=True, text=True)
    if run.returncode:
        tail = (run.stderr or run.stdout).strip().splitlines()[-1:]
        shutil.rmtree(partial, ignore_errors=True)
        raise SetupError(f"debootstrap of arm64 {ROOTFS_SUITE} from {mirror()} failed: {tail}")
    debs = sorted((partial / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    progress(f"unpacking {len(debs)} arm64 packages")
    for deb in debs:
        subprocess.run([dpkg_deb, "-x", str(deb), str(partial)], check=True)
        deb.unlink()
    if not (partial / "usr" / "bin" / f"python{GUEST_PYTHON}").is_file():
        raise SetupError(f"the arm64 {ROOTFS_SUITE} root filesystem has no python{GUEST_PYTHON}")
    shutil.rmtree(image.rootfs, ignore_errors=True)
    partial.rename(image.rootfs)


def guest_requirements() -> list[str]:
    """`dist==version` for each package the worker needs, at the host's own version."""
    out = []
    for dist in GUEST_DISTS:
        try:
            out.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            raise SetupError(f"{dist} is not installed on the host; the device gets the host's versions "
                             f"(pip install 'afedge[onnx,tvm]')") from None
    return out


def build_site(image: EmuImage, progress: Progress) -> None:
    """(Re)built whenever the host's versions change: the device runs what the host exported with."""
    reqs = guest_requirements()
    stamp = image.site / "REQUIREMENTS"
    if stamp.is_file() and stamp.read_text().split() == reqs:
        return
    wheels, partial = image.root / "wheels", image.root / "site.partial"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    shutil.rmtree(partial, ignore_errors=True)
    progress(f"downloading aarch64 wheels: {', '.join(reqs)}")
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           "--python-version", GUEST_PYTHON, "--implementation", "cp",
           *(f"--abi={a}" for a in (f"cp{GUEST_PYTHON.replace('.', '')}", "abi3", "none")),
           *(f"--platform={p}" for p in WHEEL_PLATFORMS), *reqs]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        err = [ln for ln in run.stderr.splitlines() if ln.startswith("ERROR")] or run.stderr.splitlines()[-1:]
        raise SetupError(f"pip could not download the aarch64 wheels ({'; '.join(err)[:300]})")
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(partial)
    (partial / "REQUIREMENTS").write_text("\n".join(reqs) + "\n")
    shutil.rmtree(image.site, ignore_errors=True)
    image.record.unlink(missing_ok=True)
    partial.rename(image.site)


def smoke(image: EmuImage, cpu: str = "max") -> dict:
    """Import numpy, onnxruntime and TVM's runtime in the guest; their versions."""
    code = ("import json, numpy, onnxruntime, tvm; print(json.dumps({'numpy': numpy.__version__, "
            "'onnxruntime': onnxruntime.__version__, 'tvm': tvm.__version__}))")
    run = subprocess.run(image.command(cpu, ["-c", code]), env=image.env(), capture_output=True, text=True,
                         timeout=300)
    if run.returncode:
        raise SetupError(f"the emulated device cannot import its runtimes: {run.stderr.strip()[-400:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def setup_emu_arm64(root: Path | None = None, progress: Progress = print) -> EmuImage:
    """Build (or finish building) the emulated ARM64 device; idempotent."""
    from afedge.target import host_arch
    if host_arch() != "x86_64":
        raise SetupError(f"emu-arm64 is built for x86_64 hosts (this one is {host_arch()}: run the bundle natively)")
    image = EmuImage(root or cache_root() / "emu-arm64")
    image.root.mkdir(parents=True, exist_ok=True)
    for step in (build_qemu, build_rootfs, build_site):
        step(image, progress)
    if not image.record.is_file():
        progress("checking the guest imports its runtimes")
        record = {"qemu": json.loads((image.root / "qemu.json").read_text()), "rootfs": ROOTFS_SUITE,
                  "guest": smoke(image), "wheels": sorted(p.name for p in (image.root / "wheels").glob("*.whl"))}
        tmp = image.record.with_suffix(".partial")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.rename(image.record)
    return image
