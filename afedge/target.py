"""Target profiles: TOML files in `targets/`, one per hardware class, validated on load."""
from __future__ import annotations

import platform
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from afedge.bench.budgets import budget_errors
from afedge.tolerances import TOLERANCES

ARCHES = ("x86_64", "aarch64")
SHAPE_POLICIES = ("static",)


class TargetError(ValueError):
    """A target profile that is missing, unknown, or has a bad field."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str                       # the device's CPU architecture
    exporters: tuple[str, ...]      # in order of preference
    quant: str                      # default quant scheme id
    tolerance: str                  # default tolerance profile (afedge.tolerances)
    threads: int
    prefill_len: int                # static prefill block, tokens
    chunk_size: int                 # chunk of the chunked parallel form inside the prefill graph
    shape_policy: str = "static"
    onnx: dict = field(default_factory=dict)        # opset, providers, external_data_threshold, accuracy_level
    executorch: dict = field(default_factory=dict)  # partitioners, compute_precision
    tvm: dict = field(default_factory=dict)         # target (TVM target dict), cc, host_twin
    budgets: dict = field(default_factory=dict)     # latency / memory budgets checked by `afedge bench --check`
    path: str = ""

    @property
    def runs_here(self) -> bool:
        """True when this machine has the target's architecture (its native artifacts can run here)."""
        return self.arch == host_arch()


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """This CPU's feature flags (x86 `flags`, ARM `Features` in /proc/cpuinfo); None where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _targets_dir() -> Path:
    return Path(str(resources.files("afedge.targets")))


def target_names() -> list[str]:
    return sorted(p.stem for p in _targets_dir().glob("*.toml"))


def load_target_file(path: Path) -> Target:
    """Parse and validate one profile; errors name the file and the field."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise TargetError(f"{path}: {e}") from None
    known = set(Target.__dataclass_fields__) - {"path"}
    if unknown := set(data) - known:
        raise TargetError(f"{path}: unknown fields {sorted(unknown)}")
    required = {n for n, f in Target.__dataclass_fields__.items()
                if f.default is f.default_factory is __import__("dataclasses").MISSING}
    if missing := required - set(data):
        raise TargetError(f"{path}: missing fields {sorted(missing)}")
    t = Target(**(data | {"exporters": tuple(data["exporters"]), "path": str(path)}))
    checks = [
        (t.name == path.stem, f"name '{t.name}' must match the file name '{path.stem}'"),
        (t.arch in ARCHES, f"arch must be one of {ARCHES}, got '{t.arch}'"),
        (t.tolerance in TOLERANCES, f"tolerance '{t.tolerance}' is not in afedge.tolerances.TOLERANCES"),
        (t.shape_policy in SHAPE_POLICIES, f"shape_policy must be one of {SHAPE_POLICIES}"),
        (t.threads >= 1, "threads must be >= 1"),
        (t.prefill_len >= 1 and t.chunk_size >= 1 and t.prefill_len % t.chunk_size == 0,
         "prefill_len must be a positive multiple of chunk_size"),
        (bool(t.exporters), "exporters must name at least one exporter"),
        *((False, msg) for msg in budget_errors(t.budgets)),
    ]
    for ok, msg in checks:
        if not ok:
            raise TargetError(f"{path}: {msg}")
    return t


def load_target(name: str) -> Target:
    """A shipped profile by name, or a profile file of one's own (`./my-phone.toml`, validated the same way)."""
    if name.endswith(".toml"):
        return load_target_file(Path(name))
    path = _targets_dir() / f"{name}.toml"
    if not path.is_file():
        raise TargetError(f"unknown target '{name}'; known: {', '.join(target_names())}")
    return load_target_file(path)
