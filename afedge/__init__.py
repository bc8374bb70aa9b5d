"""afedge: attention-free sequence models, rewritten to constant-memory recurrences and exported to the edge."""
from __future__ import annotations

from afedge.mixers import MIXERS, Mixer
from afedge.model import LM, LMConfig
from afedge.rewrite import RecurrentProgram, to_recurrent
from afedge.state import StateSlot, StateSpec

__version__ = "0.1.0"
__all__ = ["MIXERS", "LM", "LMConfig", "Mixer", "RecurrentProgram", "StateSlot", "StateSpec", "to_recurrent",
           "__version__"]
