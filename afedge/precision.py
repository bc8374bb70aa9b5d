"""fp16 range check: an fp16 target computes weights and activations in half precision, where |x| > 65504 is inf.

`fp16_overflows(program)` runs the fp32 program once over a calibration prompt (the chunked prefill, then decode
steps) with forward hooks on every module, and reports each weight, module output and state slot whose magnitude
leaves the fp16 range; `check_fp16_range` turns that into an ExportError naming the layers, before anything is
exported. (The Core ML delegate has one compute precision per program, so afedge cannot keep single ops fp32 there:
the export refuses and names `--quant fp32` as the fallback.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from afedge.exporting import ExportError
from afedge.rewrite import RecurrentProgram

FP16_MAX = float(torch.finfo(torch.float16).max)   # 65504
CALIBRATION_STEPS = 16


def _max_abs(x) -> float:
    """Largest magnitude among the floating tensors in x (nested tuples/lists), non-finite counted as inf."""
    if isinstance(x, Tensor):
        return float(x.detach().abs().max()) if x.is_floating_point() and x.numel() else 0.0
    if isinstance(x, (tuple, list)):
        return max((_max_abs(v) for v in x), default=0.0)
    return 0.0


def calibration_prompt(program: RecurrentProgram) -> Tensor:
    """(batch, 2 * prefill_len) int64: a deterministic sweep over the vocabulary."""
    n = 2 * program.prefill_len
    ids = (torch.arange(n * program.batch) * 7919) % program.vocab_size
    return ids.reshape(program.batch, n)


def _recorder(seen: dict[str, float], name: str):
    """A forward hook keeping the running max |output| of module `name` in `seen`."""
    def hook(_module, _inputs, output) -> None:
        seen[name] = max(seen.get(name, 0.0), _max_abs(output))
    return hook


@torch.no_grad()
def fp16_overflows(program: RecurrentProgram, tokens: Tensor | None = None) -> dict[str, float]:
    """'kind name' -> largest |value| for every weight, module output or state slot beyond the fp16 range."""
    model = program.model
    out = {f"weight {n}": m for n, t in model.state_dict().items() if (m := _max_abs(t)) > FP16_MAX}
    seen: dict[str, float] = {}
    hooks = [mod.register_forward_hook(_recorder(seen, name)) for name, mod in model.named_modules() if name]
    try:
        tokens = calibration_prompt(program) if tokens is None else tokens
        logits, state = program.prefill(tokens, program.init_state())
        peak_state = [_max_abs(s) for s in state]
        for _ in range(CALIBRATION_STEPS):
            logits, state = program.step(logits.argmax(-1), state)
            peak_state = [max(p, _max_abs(s)) for p, s in zip(peak_state, state)]
    finally:
        for h in hooks:
            h.remove()
    out |= {f"activation {n}": m for n, m in seen.items() if m > FP16_MAX}
    out |= {f"state {s}": m for s, m in zip(program.spec.names, peak_state) if m > FP16_MAX}
    return out


def check_fp16_range(program: RecurrentProgram, where: str) -> None:
    """ExportError naming every layer whose weights, outputs or state leave the fp16 range (`where` names the
    target and scheme)."""
    if bad := fp16_overflows(program):
        items = ", ".join(f"{k} (max |x| {v:.3g})" for k, v in list(bad.items())[:8])
        more = f", ... {len(bad) - 8} more" if len(bad) > 8 else ""
        raise ExportError(f"{where}: values beyond the fp16 range (|x| > {FP16_MAX:.0f}) in {items}{more}; "
                          f"fp16 would turn them into inf: export with --quant fp32 (state and compute stay fp32)")
