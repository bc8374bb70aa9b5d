"""The recurrent rewrite: a model's parallel form -> a `step` graph and a chunked `prefill` graph over one state."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from afedge.mixers import State
from afedge.model import LM
from afedge.state import StateSpec

METHODS = ("step", "prefill")


class StepGraph(nn.Module):
    """forward(token (B,) int64, *state) -> (logits (B, V), *state)."""

    def __init__(self, model: LM) -> None:
        super().__init__()
        self.model = model

    def forward(self, token: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        logits, new = self.model.step(token, state)
        return (logits, *new)


class PrefillGraph(nn.Module):
    """forward(tokens (B, T) int64, *state) -> (last-position logits (B, V), *state), chunked parallel form.

    Only the last position goes through the final norm and the LM head (at the mamba-130m shape the head is 30% of
    a block's FLOPs when every position gets it)."""

    def __init__(self, model: LM, chunk_size: int) -> None:
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, tokens: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        x, new = self.model.hidden(tokens, state, self.chunk_size)
        return (self.model.logits(x[:, -1]), *new)


@dataclass
class RecurrentProgram:
    """A model in constant-memory form. Graphs have static shapes: `step` takes (batch,) tokens and `prefill`
    takes (batch, prefill_len); runtimes feed longer prompts as whole prefill blocks, then steps."""

    model: LM
    chunk_size: int = 16
    prefill_len: int = 64
    batch: int = 1

    def __post_init__(self) -> None:
        if self.prefill_len % self.chunk_size:
            raise ValueError(f"prefill_len {self.prefill_len} must be a multiple of chunk_size {self.chunk_size}")
        self.model.eval()

    @property
    def spec(self) -> StateSpec:
        return self.model.state_spec(self.batch)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def init_state(self) -> State:
        return self.spec.init(next(self.model.parameters()).device)

    @torch.no_grad()
    def step(self, token: Tensor, state: State) -> tuple[Tensor, State]:
        return self.model.step(token, state)

    @torch.no_grad()
    def prefill(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Any T >= 1, chunked parallel form. tokens: (B, T) -> last logits (B, V), state."""
        logits, state = self.model(tokens, state, self.chunk_size)
        return logits[:, -1], state

    def graph(self, method: str) -> nn.Module:
        if method == "step":
            return StepGraph(self.model)
        if method == "prefill":
            return PrefillGraph(self.model, self.chunk_size)
        raise ValueError(f"unknown method '{method}'; methods are {METHODS}")

    def example_inputs(self, method: str) -> tuple[Tensor, ...]:
        shape = (self.batch,) if method == "step" else (self.batch, self.prefill_len)
        tokens = torch.arange(int(torch.tensor(shape).prod())).reshape(shape) % self.vocab_size
        return (tokens, *self.init_state())

    def input_names(self, method: str) -> list[str]:
        return ["tokens" if method == "prefill" else "token", *(f"state.{n}" for n in self.spec.names)]

    def output_names(self) -> list[str]:
        return ["logits", *(f"state_out.{n}" for n in self.spec.names)]

    @torch.no_grad()
    def export(self, method: str, strict: bool = True) -> torch.export.ExportedProgram:
        return torch.export.export(self.graph(method), self.example_inputs(method), strict=strict)

    def report(self) -> dict[str, dict]:
        """Per-layer figures from each mixer (approximation error, dropped mass, ...)."""
        return {f"layers.{i}": b.mixer.report() for i, b in enumerate(self.model.blocks) if b.mixer.report()}


def to_recurrent(model: LM, chunk_size: int = 16, prefill_len: int = 64, batch: int = 1) -> RecurrentProgram:
    """Rewrite `model` into its recurrent constant-memory program."""
    return RecurrentProgram(model, chunk_size, prefill_len, batch)
