"""The mixer zoo. Every module in this package registers its families on import."""
from __future__ import annotations

import importlib
import pkgutil

from afedge.mixers.base import MIXERS, Mixer, State

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in {"base", "ops"}:
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["MIXERS", "Mixer", "State"]
