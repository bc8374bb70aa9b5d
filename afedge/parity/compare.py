"""`compare(reference, session, workload) -> Report`: one runtime against the PyTorch reference."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from afedge.parity import metrics
from afedge.parity.workloads import Workload
from afedge.session import Session
from afedge.tolerances import Tolerance

if TYPE_CHECKING:
    from afedge.parity.noise import NoiseFloor


@dataclass
class Report:
    runtime: str
    workload: str
    tolerance: str
    passed: bool
    max_abs: float
    max_rel: float
    sqnr_db: float               # over the whole workload's logits (prefill + steps), as torchao / ExecuTorch do
    sqnr_worst_db: float         # the worst single position (reported, not gated: it falls as workloads grow)
    cosine: float                # worst over prefill + steps
    top1: float                  # fraction of positions whose argmax agrees
    greedy: float                # fraction of decode steps whose greedy token agrees
    state_rel: dict[str, float]  # final relative error per state slot
    state_rel_per_layer: dict[int, float]
    per_step_rel: list[float]    # logits max_rel per position (prefill first, then each step)
    failure: str = ""            # names the metric and the step where it diverged
    max_rel_bound: float = 0.0   # the logits bound judged against: the profile's, or widened to the noise floor
    noise_floor: float | None = None  # the reference's own fp32-vs-fp64 logits error on this workload, if measured
    ties: int = 0                # argmax flips counted as agreeing: the reference's two logits within the bound
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _first_breach(rels: list[float], bound: float) -> int | None:
    return next((i for i, r in enumerate(rels) if not r <= bound), None)


def compare(ref: Session, sess: Session, workload: Workload, tol: Tolerance, tol_name: str = "",
            floor: NoiseFloor | None = None) -> Report:
    """Drive both sessions through `workload` and measure `sess` against `ref` (the reference never changes).

    floor: the reference's fp32 noise floor on this workload; `tol`'s fp32-scale bounds are widened to it, and an
    argmax flip between two tokens whose reference logits are within the (widened) logits bound is a tie."""
    tol = floor.widen(tol) if floor is not None else tol
    prompt = workload.prompt(ref.info.vocab_size, ref.info.batch)
    r_logits, r_state = ref.prefill(prompt, ref.init_state())
    s_logits, s_state = sess.prefill(prompt, sess.init_state())
    pairs = [(s_logits, r_logits)]
    for _ in range(workload.steps):
        tok = r_logits.argmax(-1).astype(np.int64)
        r_logits, r_state = ref.step(tok, r_state)
        s_logits, s_state = sess.step(tok, s_state)
        pairs.append((s_logits, r_logits))
    s_all, r_all = np.concatenate([s for s, _ in pairs]), np.concatenate([r for _, r in pairs])
    # with a measured noise floor, an argmax flip between two tokens the reference puts within the logits bound of
    # each other is a tie at fp32's noise level, not a disagreement
    tie_abs = tol.max_rel * float(np.max(np.abs(r_all))) if floor is not None else 0.0
    agree = metrics.argmax_agrees(s_all, r_all, tie_abs)                      # per (position, batch row)
    greedy_same = agree.reshape(len(pairs), -1).all(1)[:-1].tolist()
    notes = _resume_check(sess, ref, workload, prompt) if workload.snapshot_at is not None else []
    rels = [metrics.max_rel(s, r) for s, r in pairs]
    state_rel = {slot.name: metrics.max_rel(s, r) for slot, s, r in zip(sess.info.spec.slots, s_state, r_state)}
    per_layer: dict[int, float] = {}
    for slot in sess.info.spec.slots:
        per_layer[slot.layer] = max(per_layer.get(slot.layer, 0.0), state_rel[slot.name])
    rep = Report(
        runtime=sess.runtime, workload=workload.id, tolerance=tol_name, passed=True,
        max_abs=metrics.max_abs(s_all, r_all), max_rel=max(rels),
        sqnr_db=metrics.sqnr_db(s_all, r_all), sqnr_worst_db=min(metrics.sqnr_db(s, r) for s, r in pairs),
        cosine=min(metrics.cosine(s, r) for s, r in pairs),
        top1=float(np.mean(agree)),
        greedy=float(np.mean(greedy_same)) if greedy_same else 1.0,
        state_rel=state_rel, state_rel_per_layer=per_layer, per_step_rel=rels, notes=notes,
        max_rel_bound=tol.max_rel, noise_floor=floor.logits_rel if floor is not None else None,
        ties=int(np.sum(agree & (s_all.argmax(-1) != r_all.argmax(-1)))),
    )
    rep.failure = _verdict(rep, tol, rels, greedy_same) or "; ".join(notes)
    rep.passed = not rep.failure
    return rep


def _resume_check(sess: Session, ref: Session, w: Workload, prompt: np.ndarray) -> list[str]:
    """Run the workload twice on `sess`: once straight through, once saving a copy of the state at
    `snapshot_at` and resuming from it; the tails must be bit-identical."""
    def run(resume: bool) -> list[np.ndarray]:
        logits, state = sess.prefill(prompt, sess.init_state())
        r_logits, r_state = ref.prefill(prompt, ref.init_state())
        out = []
        for i in range(w.steps):
            if resume and i == w.snapshot_at:
                state = [np.array(a, copy=True) for a in state]
            tok = r_logits.argmax(-1).astype(np.int64)
            r_logits, r_state = ref.step(tok, r_state)
            logits, state = sess.step(tok, state)
            out.append(logits)
        return out
    same = all(np.array_equal(a, b) for a, b in zip(run(False), run(True)))
    return [] if same else [f"snapshot/resume at step {w.snapshot_at} is not bit-identical"]


def _verdict(rep: Report, tol: Tolerance, rels: list[float], greedy_same: list[bool]) -> str:
    """Empty when within tolerance, else a sentence naming the runtime, the metric and the step."""
    where = lambda i: "prefill" if i == 0 else f"decode step {i}"  # noqa: E731
    if (i := _first_breach(rels, tol.max_rel)) is not None:
        return f"{rep.runtime}: logits max_rel {rels[i]:.3g} > {tol.max_rel:g} first at {where(i)}"
    if rep.sqnr_db < tol.sqnr_db:
        return f"{rep.runtime}: logits SQNR {rep.sqnr_db:.1f} dB < {tol.sqnr_db:g} dB"
    if rep.top1 < tol.top1:
        return f"{rep.runtime}: top-1 agreement {rep.top1:.3f} < {tol.top1:g}"
    if rep.greedy < tol.greedy:
        first = greedy_same.index(False)
        return f"{rep.runtime}: greedy agreement {rep.greedy:.3f} < {tol.greedy:g}, first differs at decode step {first}"
    bad = {k: v for k, v in rep.state_rel.items() if not v <= tol.state_rel}
    if bad:
        k = next(iter(bad))
        return f"{rep.runtime}: state '{k}' max_rel {bad[k]:.3g} > {tol.state_rel:g} after decode step {len(rels) - 1}"
    return ""
