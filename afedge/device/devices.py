"""Device names -> devices: `emu:CPU` (devices.toml), `adb:SERIAL`, `rpc:KEY@HOST:PORT`.

A device runs the frame worker (`worker.py`) somewhere else and says how files reach it. `rpc:` devices are TVM
RPC sessions instead (afedge.device.rpc).
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from afedge.device.image import EmuImage, load_image
from afedge.session import RuntimeUnavailable

WORKER = Path(__file__).with_name("worker.py")
# The /proc/cpuinfo features that steer kernel choice in MLAS / KleidiAI / XNNPACK (NEON, dot product, SVE, SVE2,
# int8 matrix multiply, bf16, SME).
KEY_FEATURES = ("asimd", "asimddp", "sve", "sve2", "i8mm", "bf16", "sme")


@functools.cache
def emulated_cpus() -> dict[str, dict]:
    """devices.toml's [emu.*] tables by CPU name."""
    return tomllib.loads(resources.files("afedge.device").joinpath("devices.toml").read_text())["emu"]


@dataclass(frozen=True)
class EmuDevice:
    """An ARM64 Linux process under QEMU user mode; it sees the host's files at their own paths."""

    cpu: str
    qemu_cpu: str
    features: tuple[str, ...]
    absent: tuple[str, ...]
    kernels: str
    image: EmuImage
    arch = "aarch64"
    emulated = True

    @property
    def name(self) -> str:
        return f"emu:{self.cpu}"

    def popen(self, stderr) -> subprocess.Popen:
        return subprocess.Popen(self.image.command(self.qemu_cpu, [str(WORKER)]), env=self.image.env(),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)

    def stage(self, path: Path) -> str:
        return str(Path(path).absolute())

    def check_features(self, seen: list[str]) -> None:
        """Refuse a guest whose CPU features are not the ones this device stands for."""
        missing = [f for f in self.features if f not in seen]
        extra = [f for f in self.absent if f in seen]
        if missing or extra:
            raise RuntimeUnavailable(f"{self.name}: the emulator's CPU reports features {seen}; {self.qemu_cpu} "
                                     f"should {'have ' + str(missing) if missing else ''}"
                                     f"{' and ' if missing and extra else ''}"
                                     f"{'lack ' + str(extra) if extra else ''} (is it QEMU 10?)")


@dataclass(frozen=True)
class AdbDevice:
    """A phone over adb: files are pushed under /data/local/tmp/afedge and the worker runs under the phone's
    python3 (e.g. Termux with numpy and onnxruntime). Documented, not exercised here (no phone)."""

    serial: str
    arch = "aarch64"
    emulated = False
    root = "/data/local/tmp/afedge"

    @property
    def name(self) -> str:
        return f"adb:{self.serial}"

    def _adb(self) -> list[str]:
        if not (adb := shutil.which("adb")):
            raise RuntimeUnavailable(f"{self.name}: adb is not installed (Android SDK platform-tools)")
        return [adb, "-s", self.serial]

    def stage(self, path: Path) -> str:
        remote = f"{self.root}/{Path(path).name}"
        subprocess.run([*self._adb(), "push", str(path), remote], check=True, capture_output=True)
        return remote

    def popen(self, stderr) -> subprocess.Popen:
        worker = self.stage(WORKER)
        return subprocess.Popen([*self._adb(), "exec-out", "python3", worker], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr)

    def check_features(self, seen: list[str]) -> None:
        """A real phone is whatever it is."""


@dataclass(frozen=True)
class RpcDevice:
    """A TVM RPC device registered with a tracker under `key` (afedge.device.rpc runs TVM artifacts on it)."""

    key: str
    host: str
    port: int
    arch = "aarch64"
    emulated = False   # unknown from here: a tracker may front an emulator; reports name the key

    @property
    def name(self) -> str:
        return f"rpc:{self.key}@{self.host}:{self.port}"


Device = EmuDevice | AdbDevice | RpcDevice


def emu_device(cpu: str, image: EmuImage | None = None) -> EmuDevice:
    cpus = emulated_cpus()
    if cpu not in cpus:
        raise ValueError(f"unknown emulated CPU '{cpu}': devices.toml has {', '.join(f'emu:{c}' for c in cpus)}")
    c = cpus[cpu]
    return EmuDevice(cpu, c["qemu_cpu"], tuple(c["features"]), tuple(c["absent"]), c["kernels"],
                     image or load_image())


def parse_device(text: str) -> Device:
    """'emu:neoverse-n1' | 'adb:SERIAL' | 'rpc:KEY@HOST:PORT' -> a device; ValueError naming the forms."""
    kind, _, rest = text.partition(":")
    if kind == "emu" and rest:
        return emu_device(rest)
    if kind == "adb" and rest:
        return AdbDevice(rest)
    if kind == "rpc" and (m := re.fullmatch(r"([\w.-]+)@([\w.-]+):(\d+)", rest)):
        return RpcDevice(m[1], m[2], int(m[3]))
    raise ValueError(f"unknown device '{text}': use emu:CPU ({', '.join(emulated_cpus())}), adb:SERIAL or "
                     f"rpc:KEY@HOST:PORT")
