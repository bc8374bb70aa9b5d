"""The fp32 bound scales with the reference's own fp32-vs-fp64 noise floor: a runtime that differs from the reference
by a few times that floor passes, one that differs by more than FP32_NOISE_FACTOR times it (or by a wrong weight)
fails, and the report records the bound it was judged against."""
from __future__ import annotations

import copy

import numpy as np
import torch

from afedge.parity import metrics
from afedge.parity.compare import compare
from afedge.parity.noise import Judge, NoiseFloor, noise_floor
from afedge.parity.workloads import prompt_decode
from afedge.runtimes.torch import TorchSession
from afedge.tolerances import FP32_NOISE_FACTOR, tolerance
from tests.parity.conftest import tiny_program

WORKLOAD = prompt_decode(20, 24)


class Noisy(TorchSession):
    """The reference plus relative noise of size `rel` x max|logits| on every output's logits."""

    runtime = "noisy"

    def __init__(self, program, rel: float) -> None:
        super().__init__(program)
        self.rel, self.rng = rel, np.random.default_rng(0)

    def _run(self, method, inputs):
        logits, *state = super()._run(method, inputs)
        noise = self.rng.uniform(-1, 1, logits.shape).astype(np.float32)
        return [logits + self.rel * np.abs(logits).max() * noise, *state]


def test_floor_is_measured_and_small_on_a_shallow_model():
    floor = noise_floor(TorchSession(tiny_program("mamba")), WORKLOAD)
    assert 0.0 < floor.logits_rel < 1e-5 and 0.0 < floor.state_rel < 1e-5 and floor.sqnr_db > 100, floor
    widened = floor.widen(tolerance("fp32"))
    assert widened == tolerance("fp32")  # a shallow model's floor leaves the table's bounds as they are


def test_noise_within_the_widened_bound_passes_and_beyond_it_fails():
    program = tiny_program("retnet")
    ref = TorchSession(program)
    floor = NoiseFloor(logits_rel=1e-4, state_rel=0.0, sqnr_db=75.0)   # about the mamba-130m shape's
    bound = FP32_NOISE_FACTOR * floor.logits_rel
    ok = compare(ref, Noisy(program, 0.5 * bound), WORKLOAD, tolerance("fp32"), "fp32", floor)
    assert ok.passed and ok.max_rel > tolerance("fp32").max_rel, ok.failure
    assert ok.max_rel_bound == bound and ok.noise_floor == floor.logits_rel
    bad = compare(ref, Noisy(program, 2 * bound), WORKLOAD, tolerance("fp32"), "fp32", floor)
    assert not bad.passed and bad.failure.startswith("noisy: logits max_rel "), bad.failure
    unwidened = compare(ref, Noisy(program, 0.5 * bound), WORKLOAD, tolerance("fp32"), "fp32")
    assert not unwidened.passed and unwidened.max_rel_bound == tolerance("fp32").max_rel


def test_judge_widens_only_fp32_and_measures_each_workload_once():
    program = tiny_program("rwkv7")
    judge = Judge(TorchSession(program))
    rep = judge(TorchSession(program), WORKLOAD, "fp32")
    measured = judge.floor(WORKLOAD)
    assert rep.passed and rep.noise_floor == measured.logits_rel > 0.0
    judge(TorchSession(program), WORKLOAD, "fp32")
    assert judge.floor(WORKLOAD) is measured
    q = judge(TorchSession(program), WORKLOAD, "int8")
    assert q.noise_floor is None and q.max_rel_bound == tolerance("int8").max_rel


def test_a_wrong_weight_still_fails_under_the_floor():
    program = tiny_program("mamba")
    broken = copy.deepcopy(program)
    with torch.no_grad():
        broken.model.blocks[0].mixer.out_proj.weight.mul_(1.5)
    rep = Judge(TorchSession(program))(TorchSession(broken), WORKLOAD, "fp32")
    assert not rep.passed and "logits max_rel" in rep.failure, rep.failure


def test_an_argmax_flip_inside_the_bound_is_a_tie_and_outside_it_a_disagreement():
    ref = np.array([[1.0, 0.9995, 0.0], [1.0, 0.5, 0.0]])
    got = np.array([[0.9990, 1.0, 0.0], [0.4, 1.0, 0.0]])   # both rows flip to token 1
    assert metrics.argmax_agrees(got, ref).tolist() == [False, False]
    assert metrics.argmax_agrees(got, ref, tie_abs=1e-3).tolist() == [True, False]
    assert metrics.top1_agreement(got, ref) == 0.0


class RunnerUp(TorchSession):
    """The reference, except that its runner-up token is raised just above its top token: every argmax flips."""

    runtime = "runner-up"

    def _run(self, method, inputs):
        logits, *state = super()._run(method, inputs)
        out = logits.copy()
        order = np.argsort(logits, -1)
        rows = np.arange(len(out))
        out[rows, order[:, -2]] = logits[rows, order[:, -1]] + 1e-6
        return [out, *state]


def test_flips_count_as_ties_only_under_a_floor_that_covers_the_reference_margin():
    program = tiny_program("retnet")
    ref, flips = TorchSession(program), RunnerUp(program)
    plain = compare(ref, flips, WORKLOAD, tolerance("fp32"), "fp32")
    assert plain.top1 == 0.0 and plain.ties == 0 and plain.greedy == 0.0
    low = compare(ref, flips, WORKLOAD, tolerance("fp32"), "fp32", NoiseFloor(1e-6, 0.0, 200.0))
    assert low.top1 == 0.0 and low.ties == 0 and not low.passed
    margin = plain.max_rel   # the largest top-1 / runner-up gap of the reference, relative to max|ref|
    high = compare(ref, flips, WORKLOAD, tolerance("fp32"), "fp32", NoiseFloor(margin, 0.0, 0.0))
    assert high.top1 == 1.0 and high.greedy == 1.0 and high.ties == WORKLOAD.steps + 1 and high.passed, high.failure
