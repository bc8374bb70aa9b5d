"""The PyTorch reference runtime: the eager recurrent program, numpy in and out."""
from __future__ import annotations

import numpy as np
import torch

from afedge.rewrite import RecurrentProgram
from afedge.session import ProgramInfo, Session


class TorchSession(Session):
    """Runs the same static-shape methods as the exported graphs, eagerly (the reference for parity)."""

    runtime = "torch"

    def __init__(self, program: RecurrentProgram, threads: int = 1) -> None:
        super().__init__(ProgramInfo.of(program), threads)
        self.program = program
        self._graphs = {m: program.graph(m) for m in ("step", "prefill")}

    @torch.no_grad()
    def _run(self, method: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch.set_num_threads(self.threads)
        out = self._graphs[method](*(torch.from_numpy(np.ascontiguousarray(a)) for a in inputs))
        return [o.numpy() for o in out]
