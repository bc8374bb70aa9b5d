"""A small language model that stacks any registered mixer: embed -> [norm, mixer, norm, MLP] x L -> norm -> head.

The optional LMConfig fields after `seed` describe imported layouts (afedge.hf): a norm on the embeddings, mixers
that hold their own norms, RWKV's inference rescaling; their defaults leave the native LM unchanged."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afedge.mixers import MIXERS, Mixer, State
from afedge.state import StateSpec, qualify


@dataclass
class LMConfig:
    vocab_size: int = 256          # bytes by default
    d_model: int = 64
    n_layers: int = 2
    mixer: str = "retnet"          # a name registered in afedge.mixers.MIXERS
    mixer_kwargs: dict = field(default_factory=dict)
    mlp_ratio: float = 4.0         # 0 drops the MLP (families with their own channel mixing)
    norm: str = "rmsnorm"          # "rmsnorm" | "layernorm"
    tie_embeddings: bool = True
    seed: int = 0                  # initialisation seed, recorded so a model can be rebuilt
    # Imported layouts (afedge.hf); the defaults are the native afedge LM.
    norm_eps: float | None = None        # None: 1e-6 (rmsnorm), 1e-5 (layernorm)
    final_norm_eps: float | None = None  # the final norm's eps; None: norm_eps
    embed_norm: bool = False             # a norm on the embeddings before block 0 (RWKV's pre_ln)
    mixer_norm: bool = True              # False: the mixer reads the raw residual stream (it has its own norms)
    rescale_every: int = 0               # > 0: halve the residual stream after every that many blocks (RWKV)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"model config: unknown fields {sorted(unknown)}")
        return cls(**data)


def _norm(kind: str, d: int, eps: float | None = None) -> nn.Module:
    match kind:
        case "rmsnorm":
            return nn.RMSNorm(d, eps=1e-6 if eps is None else eps)
        case "layernorm":
            return nn.LayerNorm(d, eps=1e-5 if eps is None else eps)
    raise ValueError(f"model config: norm must be 'rmsnorm' or 'layernorm', got '{kind}'")


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.norm1 = _norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.mixer_norm else nn.Identity()
        self.mixer: Mixer = MIXERS.get(cfg.mixer)(cfg.d_model, **cfg.mixer_kwargs)
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.mlp = None
        if hidden:
            self.norm2 = _norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(approximate="tanh"),
                                     nn.Linear(hidden, cfg.d_model))

    def _mlp(self, x: Tensor) -> Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, state: State, chunk_size: int | None = None) -> tuple[Tensor, State]:
        """x: (B, T, D)."""
        y, state = self.mixer(self.norm1(x), state, chunk_size)
        return self._mlp(x + y), state

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """x: (B, D)."""
        y, state = self.mixer.step(self.norm1(x), state)
        return self._mlp(x + y), state


class LM(nn.Module):
    """Attention-free LM. `forward` is the parallel (training) form; `afedge.to_recurrent` gives the step form."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.5)
        self.embed_norm = _norm(cfg.norm, cfg.d_model, cfg.norm_eps) if cfg.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg.norm, cfg.d_model, cfg.norm_eps if cfg.final_norm_eps is None else cfg.final_norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def state_spec(self, batch: int = 1) -> StateSpec:
        return StateSpec(tuple(s for i, b in enumerate(self.blocks) for s in qualify(b.mixer.state_slots(batch), i)))

    def init_state(self, batch: int = 1) -> State:
        return self.state_spec(batch).init(next(self.parameters()).device)

    def _split(self, state: State) -> list[State]:
        """Flat program state -> one tuple per layer."""
        out, i = [], 0
        for b in self.blocks:
            n = len(b.mixer.state_slots(1))
            out.append(tuple(state[i:i + n]))
            i += n
        return out

    def _rescale(self, i: int, x: Tensor) -> Tensor:
        """Halve x after block i when `rescale_every` says so (a config constant, not data-dependent)."""
        r = self.cfg.rescale_every
        return x * 0.5 if r > 0 and (i + 1) % r == 0 else x

    def forward(self, tokens: Tensor, state: State | None = None,
                chunk_size: int | None = None) -> tuple[Tensor, State]:
        """tokens: (B, T) int64 -> logits (B, T, V), new flat state."""
        x, new = self.hidden(tokens, state, chunk_size)
        return self.logits(x), new

    def hidden(self, tokens: Tensor, state: State | None = None,
               chunk_size: int | None = None) -> tuple[Tensor, State]:
        """tokens: (B, T) int64 -> the last block's output (B, T, D), new flat state (no final norm, no head)."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        x, new = self.embed_norm(self.embed(tokens)), []
        for i, (block, s) in enumerate(zip(self.blocks, self._split(state))):
            x, s = block(x, s, chunk_size)
            x = self._rescale(i, x)
            new.extend(s)
        return x, tuple(new)

    def logits(self, x: Tensor) -> Tensor:
        """(..., D) block outputs -> (..., V): final norm, then the LM head."""
        return self.head(self.norm(x))

    def step(self, token: Tensor, state: State) -> tuple[Tensor, State]:
        """token: (B,) int64 -> logits (B, V), new flat state."""
        x, new = self.embed_norm(self.embed(token)), []
        for i, (block, s) in enumerate(zip(self.blocks, self._split(state))):
            x, s = block.step(x, s)
            x = self._rescale(i, x)
            new.extend(s)
        return self.logits(x), tuple(new)

    def naive_logits(self, tokens: Tensor) -> Tensor:
        """Logits from every mixer's naive reference (no state). tokens: (B, T) -> (B, T, V)."""
        x = self.embed_norm(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = self._rescale(i, block._mlp(x + block.mixer.naive(block.norm1(x))))
        return self.logits(x)

    def family_per_layer(self) -> list[str]:
        return [b.mixer.family for b in self.blocks]
