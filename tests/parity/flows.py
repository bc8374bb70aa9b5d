"""The parity matrix: Flow(mixer, exporter, target, quant), with readable ids such as `retnet-onnx-host-fp32`."""
from __future__ import annotations

from dataclasses import dataclass

from afedge.exporting import EXPORTERS, load_plugins
from afedge.mixers import MIXERS
from afedge.target import load_target, target_names

load_plugins()

# Targets whose whole matrix runs in the default suite; the others run their matrix under `slow`, except the
# representative mixers below, which run everywhere by default.
FAST_TARGETS = ("host",)
REPRESENTATIVE = ("retnet", "mamba")

# Known gaps: (exporter, target) -> why no artifact of that flow can be proven on this machine.
GAPS = {
    ("executorch", "apple-ane"): "Core ML delegate: CoreMLBackend is not registered in ExecuTorch's Linux runtime",
}


@dataclass(frozen=True)
class Flow:
    mixer: str
    exporter: str
    target: str
    quant: str

    @property
    def id(self) -> str:
        return f"{self.mixer}-{self.exporter}-{self.target}-{self.quant}"

    @property
    def slow(self) -> bool:
        return self.target not in FAST_TARGETS and self.mixer not in REPRESENTATIVE

    @property
    def gap(self) -> str:
        return GAPS.get((self.exporter, self.target), "")


def all_flows() -> list[Flow]:
    flows = []
    for t in target_names():
        target = load_target(t)
        for exporter in target.exporters:
            flows += [Flow(m, exporter, t, target.quant) for m in MIXERS.names()]
    return flows


FLOWS = all_flows()


def registered_combinations() -> set[tuple[str, str, str]]:
    """(mixer, exporter, target) for every registered mixer x every exporter a target names."""
    return {(m, e, t) for t in target_names() for e in load_target(t).exporters for m in MIXERS.names()
            if e in EXPORTERS}
