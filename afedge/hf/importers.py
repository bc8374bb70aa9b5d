"""Per-model-type importers: a transformers config -> LMConfig, and HF state-dict keys -> afedge keys (1:1)."""
from __future__ import annotations

import re
from typing import Any, ClassVar

from torch import Tensor

from afedge.hf.errors import HFImportError
from afedge.model import LMConfig
from afedge.registry import Registry


class Importer:
    """One Hugging Face `model_type`. Subclasses set `model_type` and `rules` (ordered `(regex, replacement)` pairs
    over whole HF keys) and implement `lm_config`; `convert` renames every tensor and changes none."""

    model_type: ClassVar[str]
    rules: ClassVar[tuple[tuple[str, str], ...]]

    def lm_config(self, cfg: Any) -> LMConfig:
        """cfg: the checkpoint's transformers `PretrainedConfig` (defaults filled in)."""
        raise NotImplementedError

    def rename(self, key: str) -> str:
        for pattern, repl in self.rules:
            new, n = re.subn(f"^{pattern}$", repl, key)
            if n:
                return new
        raise HFImportError(f"{self.model_type}: the Hugging Face weight '{key}' has no afedge counterpart "
                            f"(an architecture variant afedge does not import)")

    def convert(self, state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
        """HF state dict -> afedge LM state dict."""
        return {self.rename(k): v for k, v in state.items()}


IMPORTERS: Registry[Importer] = Registry("Hugging Face model type")


def register(cls: type[Importer]) -> type[Importer]:
    IMPORTERS.register(cls.model_type)(cls())
    return cls


def supported_types() -> list[str]:
    return IMPORTERS.names()


def require(cfg: Any, ok: bool, field: str, why: str) -> None:
    """Refuse a config value afedge cannot reproduce; the message names the model type and the field."""
    if not ok:
        raise HFImportError(f"{cfg.model_type} config.json: {field}={getattr(cfg, field, None)!r} is not supported "
                            f"({why})")


def whole(cfg: Any, field: str) -> int:
    """An integer-valued config field (`expand` may be written as 2.0)."""
    v = getattr(cfg, field)
    require(cfg, float(v).is_integer(), field, "afedge needs a whole number")
    return int(v)
