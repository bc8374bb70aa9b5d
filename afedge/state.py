"""The state contract: every recurrent slot named, shaped, typed and initialised once."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "int64": torch.int64}


@dataclass(frozen=True)
class StateSlot:
    """One recurrent state tensor.

    `name` is qualified (`layers.3.kv`) once the slot belongs to a model; `layer` is -1 before that.
    `exact` is False where the recurrence approximates the parallel form (windowed or distilled).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    init: float = 0.0
    layer: int = -1
    exact: bool = True
    note: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()

    def initial(self, device: torch.device | str | None = None) -> Tensor:
        return torch.full(self.shape, self.init, dtype=self.torch_dtype, device=device)


@dataclass(frozen=True)
class StateSpec:
    """The ordered slots of a whole program; exported graphs take and return them in this order."""

    slots: tuple[StateSlot, ...]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)

    @property
    def exact(self) -> bool:
        return all(s.exact for s in self.slots)

    def init(self, device: torch.device | str | None = None) -> tuple[Tensor, ...]:
        return tuple(s.initial(device) for s in self.slots)

    def init_numpy(self) -> list[np.ndarray]:
        return [s.initial().numpy() for s in self.slots]

    def nbytes_of(self, state: tuple[Tensor, ...] | list[np.ndarray]) -> int:
        """Bytes actually held by `state` (to check it against `nbytes`)."""
        return sum(int(t.nbytes) for t in state)

    def check(self, state: tuple[Tensor, ...] | list[np.ndarray], where: str = "state") -> None:
        """Raise ValueError naming the first slot whose shape or dtype breaks the contract."""
        if len(state) != len(self.slots):
            raise ValueError(f"{where}: expected {len(self.slots)} state tensors, got {len(state)}")
        for slot, t in zip(self.slots, state):
            dtype = str(t.dtype).removeprefix("torch.")
            if tuple(t.shape) != slot.shape or dtype != slot.dtype:
                raise ValueError(f"{where}: slot '{slot.name}' must be {slot.dtype}{list(slot.shape)}, "
                                 f"got {dtype}{list(t.shape)}")

    def per_layer_nbytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for s in self.slots:
            out[s.layer] = out.get(s.layer, 0) + s.nbytes
        return out

    def to_json(self) -> list[dict]:
        return [asdict(s) | {"shape": list(s.shape)} for s in self.slots]

    @classmethod
    def from_json(cls, data: list[dict]) -> StateSpec:
        return cls(tuple(StateSlot(**(d | {"shape": tuple(d["shape"])})) for d in data))


def qualify(slots: list[StateSlot], layer: int) -> list[StateSlot]:
    """Give a mixer's local slots their model-wide names (`layers.{layer}.{name}`)."""
    return [replace(s, name=f"layers.{layer}.{s.name}", layer=layer) for s in slots]
