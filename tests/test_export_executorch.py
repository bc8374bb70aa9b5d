"""ExecuTorch exporter + runtime: every registered mixer through XNNPACK vs the torch reference, the delegation
report, and the Core ML artifact (built here, runnable only on Apple devices).

Each mixer is exported once, in a pool of 2 worker processes started on first use, and reused by the tests that
need its .pte. Lowering dominates: about 15-25 s of CPU per mixer, ~15 s for the Core ML case, so the file's wall
time grows with the zoo (17 mixers: ~8.5 min of CPU, ~5 min wall on an idle 2-core machine).
`-k <mixer>` exports only the selected mixers.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("executorch.exir", reason="executorch is not installed (pip install 'afedge[executorch]')")

from afedge.exporting import EXPORTERS, Artifact, ExportError, load_plugins  # noqa: E402
from afedge.mixers import MIXERS  # noqa: E402
from afedge.model import LM, LMConfig  # noqa: E402
from afedge.parity.metrics import max_rel  # noqa: E402
from afedge.rewrite import to_recurrent  # noqa: E402
from afedge.session import ProgramInfo, RuntimeUnavailable  # noqa: E402
from afedge.target import load_target  # noqa: E402
from afedge.tolerances import tolerance  # noqa: E402
from tests.parity.flows import REPRESENTATIVE  # noqa: E402

load_plugins()
from afedge.exporters.executorch import (  # noqa: E402
    PTE_FILE, ExecuTorchExporter, _xnnpack_partitioner, delegation_lines, delegation_report, lower)
from afedge.runtimes.executorch import ExecuTorchSession  # noqa: E402
from afedge.runtimes.torch import TorchSession  # noqa: E402

PROMPT_LEN, DECODE_STEPS = 40, 32
# Mixers whose ExecuTorch export is a known, root-caused failure in the mixer's own code: name -> reason.
# xfail(strict=True), so a fix is noticed. Empty: every registered mixer lowers and matches.
XFAIL: dict[str, str] = {}


def _program(mixer: str):
    return to_recurrent(LM(LMConfig(d_model=32, n_layers=2, mixer=mixer)), chunk_size=8, prefill_len=16)


def _export_host(mixer: str, out) -> tuple[Artifact, dict]:
    """Runs in a worker process: export `mixer` for the host target into `out`; returns the artifact and the
    weights it was built from (so the reference in the test process is the very same model)."""
    load_plugins()
    program = _program(mixer)
    [art] = EXPORTERS.get("executorch")().export(program, load_target("host"), "fp32", out)
    return art, program.model.state_dict()


_FUTURES: dict[str, tuple] = {}


def _host_export(mixer: str, request, tmp_path_factory) -> tuple:
    """(program, artifact, out_dir) for `mixer` exported for the host target, once per test session.

    Lowering is single-threaded Python (~20 s of CPU per mixer), so on first use every mixer the session selected
    from this file is submitted to a pool of 2 worker processes; each test waits for its own export."""
    if mixer not in _FUTURES:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        selected = [i.callspec.params["mixer"] for i in request.session.items
                    if i.module is request.module and "mixer" in getattr(getattr(i, "callspec", None), "params", {})]
        pool = ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn"))
        request.session.config.add_cleanup(lambda: pool.shutdown(cancel_futures=True))
        for m in dict.fromkeys([mixer, *selected]):
            if m not in _FUTURES:
                out = tmp_path_factory.mktemp(f"et-{m}")
                _FUTURES[m] = (pool.submit(_export_host, m, out), out)
    future, out = _FUTURES[mixer]
    art, weights = future.result()
    program = _program(mixer)
    program.model.load_state_dict(weights)
    return program, art, out


def _open(art: Artifact, out, program, threads: int = 2) -> ExecuTorchSession:
    return ExecuTorchSession({m: out / f for m, f in art.files.items()}, ProgramInfo.of(program), threads, art.arch)


def _mixer_params():
    """Every mixer; outside the representative ones they run under `slow` (tests/parity covers the whole zoo's
    numbers and XNNPACK delegation in the default suite; this file checks the exporter's own contract)."""
    return [pytest.param(n, marks=[*([pytest.mark.xfail(strict=True, reason=XFAIL[n])] if n in XFAIL else []),
                                   *([] if n in REPRESENTATIVE else [pytest.mark.slow])])
            for n in MIXERS.names()]


@pytest.mark.parametrize("mixer", _mixer_params())
def test_parity_prefill_then_greedy_decode(mixer, request, tmp_path_factory):
    program, art, out = _host_export(mixer, request, tmp_path_factory)
    tol = tolerance("fp32")
    et, ref = _open(art, out, program), TorchSession(program, threads=2)
    prompt = np.random.default_rng(0).integers(0, program.vocab_size, (1, PROMPT_LEN), dtype=np.int64)

    l_et, s_et = et.prefill(prompt, et.init_state())
    l_ref, s_ref = ref.prefill(prompt, ref.init_state())
    worst, tokens_et, tokens_ref = 0.0, [], []
    for i in range(DECODE_STEPS + 1):
        err = max_rel(l_et, l_ref)
        worst = max(worst, err)
        assert err <= tol.max_rel, f"{mixer}: logits max_rel {err:.2e} > {tol.max_rel} at decode step {i}"
        for slot, a, b in zip(program.spec.slots, s_et, s_ref):
            e = max_rel(a, b)
            assert e <= tol.state_rel, f"{mixer}: state {slot.name} max_rel {e:.2e} > {tol.state_rel} at step {i}"
        if i == DECODE_STEPS:
            break
        tokens_et.append(int(l_et.argmax(-1)[0]))
        tokens_ref.append(int(l_ref.argmax(-1)[0]))
        # each side decodes its own greedy token: a divergence shows up as a token mismatch below
        l_et, s_et = et.step(np.array([tokens_et[-1]]), s_et)
        l_ref, s_ref = ref.step(np.array([tokens_ref[-1]]), s_ref)
    assert tokens_et == tokens_ref, f"{mixer}: greedy tokens differ: {tokens_et} vs {tokens_ref}"
    d = art.info["delegation"]
    print(f"\n[executorch] {mixer}: max_rel {worst:.2e}; " + "; ".join(
        f"{m} {r['delegated_subgraphs']} subgraphs/{r['delegated_nodes']} delegated, {r['portable_nodes']} portable"
        for m, r in d.items()) + f"; {art.info['bytes'] / 1024:.0f} KiB")
    et.close()


def test_a_returned_state_is_not_overwritten_by_the_next_call(request, tmp_path_factory):
    """The session takes the method's outputs uncloned (views of its planned buffers) and must copy them: a state
    (and logits) it returned stay as they were when the next step or prefill runs."""
    program, art, out = _host_export("retnet", request, tmp_path_factory)
    et = _open(art, out, program)
    logits, state = et.step(np.array([3]), et.init_state())
    kept = [logits.copy(), *(a.copy() for a in state)]
    et.step(np.array([7]), state)
    et.prefill(np.full((1, program.prefill_len), 5, dtype=np.int64), state)
    for name, a, b in zip(["logits", *program.spec.names], [logits, *state], kept):
        np.testing.assert_array_equal(a, b, err_msg=f"{name} changed under a later call")
    assert not np.array_equal(et.step(np.array([7]), state)[0], logits)   # the calls did compute something else
    et.close()


@pytest.mark.parametrize("mixer", _mixer_params())
def test_pte_holds_both_methods_and_report(mixer, request, tmp_path_factory):
    from executorch.runtime import Runtime

    program, art, out = _host_export(mixer, request, tmp_path_factory)
    assert art.name == "executorch" and art.runtime == "executorch" and art.arch == "any"
    assert art.files == {"step": PTE_FILE, "prefill": PTE_FILE}
    assert Runtime.get().load_program(out / PTE_FILE).method_names == {"step", "prefill"}
    assert set(art.info["delegation"]) == {"step", "prefill"}
    for method, r in art.info["delegation"].items():
        assert r["backends"].get("XnnpackBackend", {}).get("subgraphs", 0) >= 1, f"{method}: nothing delegated"
        assert r["portable_nodes"] == len(r["portable"]) == sum(r["portable_ops"].values())
        assert all(p["node"] and p["op"] for p in r["portable"])
    json.dumps(Artifact.to_json(art))  # the report goes into the manifest as is


class _Uncovered(nn.Module):
    """linear (XNNPACK) -> cumsum (not in XNNPACK's op set: portable) -> linear (XNNPACK)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def test_report_names_portable_fallback_of_uncovered_op():
    with torch.no_grad():
        ep = torch.export.export(_Uncovered().eval(), (torch.randn(1, 4, 8),))
    edge = lower({"forward": ep}, [_xnnpack_partitioner()])
    r = delegation_report(edge)["forward"]
    assert r["backends"]["XnnpackBackend"]["subgraphs"] == 2  # split around the cumsum
    [p] = [p for p in r["portable"] if p["op"] == "aten.cumsum.default"]
    assert p["node"] and p["source"].endswith(f"{__name__.split('.')[-1]}.py:{_line_of_cumsum()}")
    lines = delegation_lines({"delegation": {"forward": r}})
    assert any("aten.cumsum.default" in ln and p["node"] in ln for ln in lines), lines


def _line_of_cumsum() -> int:
    import inspect
    src, start = inspect.getsourcelines(_Uncovered.forward)
    return start + next(i for i, ln in enumerate(src) if "cumsum" in ln)


def test_gelu_tanh_stays_tanh_under_xnnpack(tmp_path):
    """ExecuTorch 1.5.1 lowers aten.gelu(approximate='tanh') to XNNPACK's exact GELU (8e-5 rel error); the
    exporter decomposes it first. Guard the workaround against the bug coming back."""
    from executorch.runtime import Runtime

    from afedge.exporters.executorch import xnnpack_safe
    m, x = nn.GELU(approximate="tanh"), torch.linspace(-6, 6, 257).reshape(1, -1)
    with torch.no_grad():
        ep = xnnpack_safe({"forward": torch.export.export(m, (x,))})["forward"]
    pte = lower({"forward": ep}, [_xnnpack_partitioner()]).to_executorch().buffer
    y = Runtime.get().load_program(pte).load_method("forward").execute([x])[0]
    assert max_rel(y, torch.nn.functional.gelu(x.double(), approximate="tanh")) < 1e-6


class _MaxLastDim(nn.Module):
    """amax over the last dim of a 4-D tensor: XNNPACK's max.dim config accepts it, its serializer does not."""

    def forward(self, x):
        return torch.exp(x - torch.max(x, -1, keepdim=True).values)


def test_max_over_last_dim_falls_back_instead_of_failing():
    from executorch.runtime import Runtime

    x = torch.randn(1, 2, 3, 5)
    with torch.no_grad():
        ep = torch.export.export(_MaxLastDim(), (x,))
    edge = lower({"forward": ep}, [_xnnpack_partitioner()])
    ops = delegation_report(edge)["forward"]["portable_ops"]
    assert any(op.startswith(("aten.max", "aten.amax")) for op in ops), ops
    y = Runtime.get().load_program(edge.to_executorch().buffer).load_method("forward").execute([x])[0]
    assert max_rel(y, _MaxLastDim()(x)) < 1e-6


def test_quant_schemes_are_checked(tmp_path):
    program, exp = _program(MIXERS.names()[0]), ExecuTorchExporter()
    with pytest.raises(ExportError, match="executorch.*fp16.*Core ML"):
        exp.export(program, load_target("host"), "fp16", tmp_path)
    with pytest.raises(ExportError, match="executorch.*quant scheme 'int4-g32'; it supports fp32, fp16, int8"):
        exp.export(program, load_target("host"), "int4-g32", tmp_path)   # ET's int4 is 8da4w
    with pytest.raises(ExportError, match="executorch.*'int8' is realised only through XNNPACK"):
        exp.export(program, load_target("apple-ane"), "int8", tmp_path)   # Core ML takes fp16, not int8
    assert not any(tmp_path.iterdir())  # nothing written (int8 / 8da4w on XNNPACK: the parity quant flows)


def test_coreml_pte_builds_and_refuses_to_run_here(tmp_path):
    try:
        import coremltools  # noqa: F401
    except ImportError as e:
        pytest.skip(f"coremltools does not import ({e}); pip install coremltools")
    mixer = MIXERS.names()[0]
    program = _program(mixer)
    [art] = EXPORTERS.get("executorch")().export(program, load_target("apple-ane"), "fp16", tmp_path)
    assert art.name == "executorch-coreml" and (tmp_path / PTE_FILE).stat().st_size > 0
    assert art.info["precision"] == "float16" and art.info["coreml"]["minimum_deployment_target"] == "iOS17"
    assert art.info["backends"] == ["CoreMLBackend"]
    with pytest.raises(RuntimeUnavailable, match="CoreMLBackend is not registered.*Apple device"):
        _open(art, tmp_path, program)
