"""The fp32 noise floor: how far the fp32 torch reference itself is from the same program in fp64, on a workload.

Deep random-weight models amplify rounding (the mamba-130m shape: the reference's fp32 logits are 5.7e-4 to 7.4e-4
from its fp64 ones over the parity workloads), so an fp32 runtime is bounded by max(the table's bound,
FP32_NOISE_FACTOR x this floor): a wrong lowering is off by O(1), another accumulation order by a small multiple of
the floor.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

from afedge.parity.compare import Report, compare
from afedge.parity.workloads import Workload
from afedge.runtimes.torch import TorchSession
from afedge.session import Session
from afedge.state import StateSpec
from afedge.tolerances import FP32_NOISE_FACTOR, Tolerance, tolerance


@dataclass(frozen=True)
class NoiseFloor:
    logits_rel: float   # worst max_rel of the fp32 reference's logits vs fp64's over the workload's positions
    state_rel: float    # worst max_rel of a float state slot after the workload
    sqnr_db: float      # SQNR of the fp32 reference's logits against fp64's over the workload

    def widen(self, tol: Tolerance) -> Tolerance:
        """`tol` with its max_rel / state_rel bounds raised to FP32_NOISE_FACTOR x this floor, and its SQNR bound
        lowered to this floor's SQNR less 20 log10(FP32_NOISE_FACTOR) dB, where those are looser."""
        return replace(tol, max_rel=max(tol.max_rel, FP32_NOISE_FACTOR * self.logits_rel),
                       state_rel=max(tol.state_rel, FP32_NOISE_FACTOR * self.state_rel),
                       sqnr_db=min(tol.sqnr_db, self.sqnr_db - 20 * math.log10(FP32_NOISE_FACTOR)))


class Fp64Reference(TorchSession):
    """The reference program with its weights and float state slots in fp64 (logits come out fp64)."""

    runtime = "torch-fp64"

    def __init__(self, ref: TorchSession) -> None:
        super().__init__(replace(ref.program, model=copy.deepcopy(ref.program.model).double()), ref.threads)
        slots = tuple(replace(s, dtype="float64") if s.dtype == "float32" else s for s in self.info.spec.slots)
        self.info = replace(self.info, spec=StateSpec(slots))


def noise_floor(ref: TorchSession, workload: Workload, fp64: Fp64Reference | None = None) -> NoiseFloor:
    """Drive the fp32 reference and its fp64 copy (`fp64`, else made here) through `workload` (same teacher-forced
    tokens) and measure."""
    rep = compare(fp64 or Fp64Reference(ref), ref, workload, tolerance("fp32"), "fp32")
    return NoiseFloor(rep.max_rel, max(rep.state_rel.values(), default=0.0), rep.sqnr_db)


class Judge:
    """compare() against one reference, under each artifact's profile; an "fp32" profile's bounds are widened to
    the workload's noise floor, measured on first use (one fp64 copy of the reference for all workloads)."""

    def __init__(self, ref: TorchSession) -> None:
        self.ref, self._fp64, self._floors = ref, None, {}

    def floor(self, workload: Workload) -> NoiseFloor:
        if workload.id not in self._floors:
            self._fp64 = self._fp64 or Fp64Reference(self.ref)
            self._floors[workload.id] = noise_floor(self.ref, workload, self._fp64)
        return self._floors[workload.id]

    def __call__(self, sess: Session, workload: Workload, tol_name: str) -> Report:
        floor = self.floor(workload) if tol_name == "fp32" else None
        return compare(self.ref, sess, workload, tolerance(tol_name), tol_name, floor)
