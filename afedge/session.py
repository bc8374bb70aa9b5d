"""The runtime contract: a `Session` with `init_state`, `prefill` and `step`, numpy in and out.

Subclasses implement `_run(method, inputs)` over the static-shape graphs; this base class splits any prompt into
whole prefill blocks plus single steps and validates every input against the state contract before a native call.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from afedge.registry import Registry
from afedge.state import StateSpec

NpState = list[np.ndarray]


class RuntimeUnavailable(RuntimeError):
    """This machine cannot run the artifact (wrong architecture, missing backend, a runtime older than the
    artifact's format); the message says why."""


class ArtifactError(RuntimeError):
    """An artifact file that is corrupt or unsafe to load (bad header, external data outside the bundle); the
    message names the file and what is wrong. Raised before the file reaches a native parser where possible."""


@dataclass(frozen=True)
class ProgramInfo:
    """What a runtime needs to know about the program behind an artifact (from the manifest or the program)."""

    spec: StateSpec
    vocab_size: int
    prefill_len: int
    batch: int = 1

    @classmethod
    def of(cls, program) -> ProgramInfo:
        return cls(program.spec, program.vocab_size, program.prefill_len, program.batch)


class Session:
    runtime: ClassVar[str]

    def __init__(self, info: ProgramInfo, threads: int = 1) -> None:
        self.info, self.threads = info, threads

    # -- what subclasses implement -------------------------------------------------------------------------
    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run `method` ("step" | "prefill") on [tokens, *state] -> [logits, *state]."""
        raise NotImplementedError

    # -- the public protocol ---------------------------------------------------------------------------------
    def init_state(self) -> NpState:
        return self.info.spec.init_numpy()

    def step(self, token: np.ndarray, state: NpState) -> tuple[np.ndarray, NpState]:
        """token: (B,) int64 -> logits (B, V) float32, state."""
        token = self._tokens(token, (self.info.batch,))
        state = [np.asarray(s) for s in state]
        self.info.spec.check(state, f"{self.runtime} step")
        out = self._run("step", [token, *state])
        return out[0], list(out[1:])

    def prefill(self, tokens: np.ndarray, state: NpState) -> tuple[np.ndarray, NpState]:
        """tokens: (B, T) int64, any T >= 1 -> last logits (B, V), state. Whole blocks of `prefill_len` go
        through the chunked prefill graph, the remainder through `step`."""
        tokens = self._tokens(tokens, (self.info.batch, -1))
        state = [np.asarray(s) for s in state]
        self.info.spec.check(state, f"{self.runtime} prefill")
        n, logits = self.info.prefill_len, None
        full = tokens.shape[1] - tokens.shape[1] % n
        for a in range(0, full, n):
            out = self._run("prefill", [np.ascontiguousarray(tokens[:, a:a + n]), *state])
            logits, state = out[0], list(out[1:])
        for t in range(full, tokens.shape[1]):
            logits, state = self.step(tokens[:, t], state)
        return logits, state

    def _tokens(self, tokens: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{self.runtime}: tokens must be integers, got {tokens.dtype}")
        if tokens.ndim != len(shape) or tokens.shape[0] != shape[0] or (tokens.ndim == 2 and tokens.shape[1] < 1):
            want = "(batch,)" if len(shape) == 1 else "(batch, T>=1)"
            raise ValueError(f"{self.runtime}: tokens must have shape {want} with batch={shape[0]}, "
                             f"got {tokens.shape}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.info.vocab_size):
            raise ValueError(f"{self.runtime}: token id {int(tokens.max() if tokens.max() >= self.info.vocab_size else tokens.min())} "
                             f"is outside the vocabulary [0, {self.info.vocab_size})")
        return tokens.astype(np.int64, copy=False)

    def close(self) -> None:
        """Release native resources (optional)."""


class ArtifactSession(Session):
    """A session over exported files. The constructor checks the artifact can run here, then calls `_load`.

    files: method -> absolute path (one file may serve both methods); options: the runtime's section of the
    target profile (e.g. ONNX Runtime providers); cpu_features: the CPU flags its native code was compiled for."""

    def __init__(self, files: dict[str, Path], info: ProgramInfo, threads: int = 1, arch: str = "any",
                 options: dict | None = None, cpu_features: tuple[str, ...] = ()) -> None:
        super().__init__(info, threads)
        self.files, self.options = {m: Path(p) for m, p in files.items()}, options or {}
        from afedge.target import host_arch, host_cpu_features
        name = next(iter(self.files.values())).name
        if arch not in ("any", host_arch()):
            raise RuntimeUnavailable(f"{self.runtime}: {name} is built for {arch}; this machine is "
                                     f"{host_arch()} (run it on the device, or use the bundle's host twin)")
        have = host_cpu_features()
        if have is not None and (missing := sorted(set(cpu_features) - have)):  # its code would die of SIGILL
            raise RuntimeUnavailable(f"{self.runtime}: {name} is compiled for CPU features {', '.join(missing)}, "
                                     f"which this CPU lacks (/proc/cpuinfo); export it again for a target "
                                     f"without them")
        self._load()

    def _load(self) -> None:
        raise NotImplementedError


RUNTIMES: Registry[type[ArtifactSession]] = Registry("runtime")
