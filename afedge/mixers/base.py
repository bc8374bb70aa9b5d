"""The mixer contract: one family per file, the same four verbs in every file."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from afedge.registry import Registry
from afedge.state import StateSlot

State = tuple[Tensor, ...]


class Mixer(nn.Module):
    """A token mixer with a parallel form and a constant-memory recurrent form.

    Subclasses set `family`, implement `state_slots`, `forward`, `step` and `naive`, and register with
    `@MIXERS.register(name)`. All forms take the incoming state and return the outgoing one; nothing is mutated.
    """

    family: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # False where `step` approximates `forward` (windowed, distilled)
    # Parameter/buffer name prefixes the quantizer keeps fp32: decays, dt, A, norms (state-aware quantization).
    fp32_params: ClassVar[tuple[str, ...]] = ()

    def state_slots(self, batch: int) -> list[StateSlot]:
        """The local state slots (unqualified names), shapes including `batch`."""
        raise NotImplementedError

    def init_state(self, batch: int, device: torch.device | str | None = None) -> State:
        return tuple(s.initial(device) for s in self.state_slots(batch))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        """Parallel form. x: (B, T, D) -> y: (B, T, D); chunk_size None means one chunk of T."""
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Recurrent form, one token. x: (B, D) -> y: (B, D)."""
        raise NotImplementedError

    def naive(self, x: Tensor) -> Tensor:
        """Slow, obviously-correct reference from the initial state. x: (B, T, D) -> (B, T, D)."""
        raise NotImplementedError

    def report(self) -> dict[str, float | str]:
        """Figures the rewrite records in the manifest (approximation error, dropped mass, ...)."""
        return {}


MIXERS: Registry[type[Mixer]] = Registry("mixer")


def chunks(t: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """Static (start, end) spans covering range(t); the last one may be shorter."""
    c = t if chunk_size is None else chunk_size
    if c <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [(s, min(s + c, t)) for s in range(0, t, c)]
