"""The exporter contract: `export(program, target, quant, out_dir, policy) -> [Artifact]`, one file per exporter."""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from afedge.quant.policy import QuantPolicy
from afedge.registry import Registry
from afedge.rewrite import RecurrentProgram
from afedge.target import Target


class ExportError(RuntimeError):
    """An export that cannot proceed; the message names the exporter, layer / op and what to try instead."""


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the pip install to run."""


@dataclass(frozen=True)
class Artifact:
    """One exported file inside a bundle."""

    name: str                       # unique in the bundle, e.g. "onnx", "tvm-aarch64", "tvm-host"
    exporter: str                   # the exporter that wrote it
    runtime: str                    # the runtime that runs it (a RUNTIMES name)
    arch: str                       # "any", "x86_64" or "aarch64"
    files: dict[str, str]           # method ("step" | "prefill") -> path relative to the bundle directory
    info: dict = field(default_factory=dict)   # delegate coverage, opset, TVM target, ...

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Artifact:
        return cls(**d)


class Exporter:
    """Base class. Subclasses set the class attributes and implement `export`."""

    name: ClassVar[str]
    runtime: ClassVar[str]                      # runtime that runs its artifacts
    extra: ClassVar[str]                        # `pip install afedge[<extra>]` brings its dependencies
    quant_schemes: ClassVar[tuple[str, ...]] = ("fp32",)
    # scheme -> the scheme whose torch simulation computes as this exporter realises it, where they differ: `auto`
    # validates with it and the export guard (afedge.quant.guard) checks plans with it (afedge.quant.resolve_plan)
    simulated_as: ClassVar[dict[str, str]] = {}

    def realised_as(self, target: Target) -> dict[str, str]:
        """`simulated_as` on `target` (an exporter whose realisation depends on target options overrides this)."""
        return self.simulated_as

    def export(self, program: RecurrentProgram, target: Target, quant: str, out_dir: Path,
               policy: QuantPolicy = QuantPolicy()) -> list[Artifact]:
        """Artifacts written under `out_dir`; `quant` a scheme id, "auto" or a QuantPlan, `policy` what the
        scheme leaves fp32 (the embedding, the head: afedge.quant.policy)."""
        raise NotImplementedError

    def check_quant(self, quant: str, target: Target) -> None:
        if quant not in self.quant_schemes:
            raise ExportError(f"exporter '{self.name}' (target {target.name}) does not realise quant scheme "
                              f"'{quant}'; it supports {', '.join(self.quant_schemes)}")


EXPORTERS: Registry[type[Exporter]] = Registry("exporter")


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingExtraError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(f"'{module}' is not installed ({e}); run: pip install 'afedge[{extra}]'") from None


def load_plugins() -> None:
    """Import every exporter and runtime module so they register (cheap: heavy imports are lazy)."""
    for pkg in ("afedge.exporters", "afedge.runtimes"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.iter_modules(mod.__path__):
            importlib.import_module(f"{pkg}.{info.name}")
