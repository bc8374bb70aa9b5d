"""The ONNX exporter and the ONNX Runtime session: every registered mixer, parity against the torch reference.

Each mixer is exported once (module-scoped fixture); the tests then check the contract, the files and the numbers.
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from afedge.exporting import EXPORTERS, Artifact, ExportError, load_plugins
from afedge.mixers import MIXERS
from afedge.model import LM, LMConfig
from afedge.parity.metrics import max_rel
from afedge.rewrite import to_recurrent
from afedge.runtimes.torch import TorchSession
from afedge.session import ProgramInfo
from afedge.state import StateSpec
from afedge.target import load_target
from afedge.tolerances import tolerance
from tests.parity.flows import REPRESENTATIVE

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from afedge.exporters.onnx import OnnxExporter  # noqa: E402
from afedge.runtimes.onnxruntime import OrtSession  # noqa: E402

load_plugins()

PROMPT_LEN, DECODE = 40, 32        # 2 full prefill blocks of 16 + 8 steps, then 32 greedy steps
TOL = tolerance("fp32")

# Mixers whose ONNX export is known to fail because of a construct in the mixer itself: name -> precise reason.
XFAIL: dict[str, str] = {}


def _mixer_params() -> list:
    """Every mixer; outside the representative ones they run under `slow` (tests/parity covers the whole zoo's
    numbers on every exporter in the default suite; these files check each exporter's own contract)."""
    return [pytest.param(n, marks=[*([pytest.mark.xfail(strict=True, reason=XFAIL[n])] if n in XFAIL else []),
                                   *([] if n in REPRESENTATIVE else [pytest.mark.slow])])
            for n in MIXERS.names()]


BUILD_THREADS = torch.get_num_threads()  # some inits (hyena's distilled modes) depend on it: build all with this


def _program(mixer: str, d_model: int = 32, n_layers: int = 2):
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)   # TorchSession sets the global count; rebuild under the same one
    try:
        return _build(mixer, d_model, n_layers)
    finally:
        torch.set_num_threads(threads)


def _build(mixer: str, d_model: int, n_layers: int):
    return to_recurrent(LM(LMConfig(d_model=d_model, n_layers=n_layers, mixer=mixer)), chunk_size=8, prefill_len=16)


def _session(program, out: Path, artifact, target) -> OrtSession:
    # One thread: the models are tiny, and the export workers share the 2 cores (oversubscribed OpenMP/ORT
    # thread pools are what makes a loaded 2-core machine slow, not the arithmetic).
    files = {m: out / f for m, f in artifact.files.items()}
    return OrtSession(files, ProgramInfo.of(program), threads=1, options=target.onnx)


def _fingerprint(program) -> float:
    """A cheap weight checksum: the exporting process and this one must have built the same model."""
    return float(sum(t.double().abs().sum() for t in program.model.state_dict().values()))


def _export_in_worker(name: str, out: str, threads: int) -> tuple[str, float]:
    """Build and export one mixer's program in a spawned process. Models are seeded, but some initialisations
    (hyena's distilled modes) depend on the intra-op thread count, so the worker builds with this process's."""
    global BUILD_THREADS
    BUILD_THREADS = threads
    program = _program(name)
    [art] = OnnxExporter().export(program, load_target("host"), "fp32", Path(out))
    return json.dumps(art.to_json()), _fingerprint(program)


@pytest.fixture(scope="module")
def host():
    return load_target("host")


@pytest.fixture(scope="module")
def prefetched(request, tmp_path_factory) -> dict:
    """The exports of every mixer selected in this run, two at a time on a 2-core machine (tracing is
    single-threaded Python, so this halves the wall time): mixer -> (out_dir, Future)."""
    names = sorted({item.callspec.params["exported"] for item in request.session.items
                    if getattr(item, "callspec", None) and "exported" in item.callspec.params})
    root = tmp_path_factory.mktemp("onnx")
    workers = min(os.cpu_count() or 1, 2, len(names))
    if workers < 2:
        yield {}
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {n: (root / n, pool.submit(_export_in_worker, n, str(root / n), BUILD_THREADS)) for n in names}
    yield futures
    pool.shutdown(cancel_futures=True)


@pytest.fixture(scope="module", params=_mixer_params())
def exported(request, tmp_path_factory, host, prefetched):
    """(mixer, program, out_dir, artifact), one export per mixer for the whole module."""
    name = request.param
    program = _program(name)
    if name in prefetched:
        out, future = prefetched[name]
        art_json, fingerprint = future.result()   # re-raises the worker's ExportError for this mixer
        if fingerprint == _fingerprint(program):   # else: not the same weights, export here instead
            return name, program, out, Artifact.from_json(json.loads(art_json))
    out = tmp_path_factory.mktemp(f"onnx-{name}")
    artifacts = EXPORTERS.get("onnx")().export(program, host, "fp32", out)
    assert len(artifacts) == 1
    return name, program, out, artifacts[0]


def test_parity_prompt_then_greedy_decode(exported, host):
    name, program, out, art = exported
    sess, ref = _session(program, out, art, host), TorchSession(program, threads=1)
    prompt = ((np.arange(PROMPT_LEN) * 37 + 11) % program.vocab_size)[None].astype(np.int64)
    lo, so = sess.prefill(prompt, sess.init_state())
    lr, sr = ref.prefill(prompt, ref.init_state())
    errs, toks_o, toks_r = [], [], []
    for i in range(DECODE + 1):
        assert lo.dtype == np.float32 and lo.shape == lr.shape
        errs.append(max_rel(lo, lr))
        assert errs[-1] <= TOL.max_rel, f"{name}: logits max_rel {errs[-1]:.2e} at decode step {i}"
        for slot, a, b in zip(program.spec.slots, so, sr):
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {slot.name}"
            err = max_rel(a, b)
            assert err <= TOL.state_rel, f"{name}: state {slot.name} max_rel {err:.2e} at decode step {i}"
        if i == DECODE:
            break
        to, tr = lo.argmax(-1), lr.argmax(-1)
        toks_o.append(int(to[0])), toks_r.append(int(tr[0]))
        lo, so = sess.step(to, so)
        lr, sr = ref.step(tr, sr)
    assert toks_o == toks_r
    print(f"{name}: onnx vs torch logits max_rel {max(errs):.2e}")
    sess.close()


def test_names_follow_the_state_contract(exported):
    _, program, out, art = exported
    assert art.name == "onnx" and art.runtime == "onnxruntime" and art.arch == "any"
    assert art.files == {"step": "step.onnx", "prefill": "prefill.onnx"}
    for method, file in art.files.items():
        model = onnx.load(str(out / file), load_external_data=False)
        assert [i.name for i in model.graph.input] == program.input_names(method)
        assert [o.name for o in model.graph.output] == program.output_names()
        assert all(n.startswith("state.") for n in program.input_names(method)[1:])
    assert art.info["opset"] == 18 and art.info["ir_version"] >= 8
    assert set(art.info["ops"]) == {"step", "prefill"} and all(art.info["ops"].values())
    assert all(art.info["bytes"][m] == (out / f).stat().st_size for m, f in art.files.items())


def test_checker_passes_and_weights_are_inlined(exported, tmp_path):
    _, program, out, art = exported
    assert not art.info["external_data"]
    assert sorted(p.name for p in out.iterdir()) == ["prefill.onnx", "step.onnx"]
    for file in art.files.values():
        onnx.checker.check_model(str(out / file))
        model = onnx.load(str(out / file), load_external_data=False)
        external = [t.name for t in model.graph.initializer
                    if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data]
        assert not external, f"{file}: initializers stored externally: {external}"
        alone = tmp_path / file            # a copied-alone .onnx loads and runs
        shutil.copy(out / file, alone)
        s = ort.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
        method = file.removesuffix(".onnx")
        feeds = dict(zip(program.input_names(method), (t.numpy() for t in program.example_inputs(method))))
        assert len(s.run(None, feeds)) == 1 + len(program.spec.slots)


def test_wrong_state_shape_is_refused_before_any_native_call(exported, host, monkeypatch):
    _, program, out, art = exported
    sess = _session(program, out, art, host)
    monkeypatch.setattr(sess, "_run", lambda *a: pytest.fail("native call reached with a bad state"))
    state = sess.init_state()
    state[0] = np.zeros((*state[0].shape[:-1], state[0].shape[-1] + 1), np.float32)
    with pytest.raises(ValueError, match=rf"slot '{program.spec.names[0]}' must be"):
        sess.step(np.zeros(1, np.int64), state)
    with pytest.raises(ValueError, match=rf"slot '{program.spec.names[0]}' must be"):
        sess.prefill(np.zeros((1, 20), np.int64), state)


# -- mixer-independent checks (one small retnet export each) --------------------------------------------------

def _small():
    return _program("retnet", d_model=16, n_layers=1)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, host):
    program = _small()
    out = tmp_path_factory.mktemp("onnx-small")
    [art] = EXPORTERS.get("onnx")().export(program, host, "fp32", out)
    return program, out, art


def test_load_checks_the_files_against_the_state_contract(small_export, host):
    program, out, art = small_export
    files = {m: out / f for m, f in art.files.items()}
    spec = program.spec
    bad = StateSpec((dataclasses.replace(spec.slots[0], shape=(1, 3, 4, 4)), *spec.slots[1:]))
    info = dataclasses.replace(ProgramInfo.of(program), spec=bad)
    with pytest.raises(ValueError, match=rf"step\.onnx \(step\) input 'state\.{spec.names[0]}' is "
                                         r"tensor\(float\)\[.*\]; the state contract says float32\[1, 3, 4, 4\]"):
        OrtSession(files, info, options=host.onnx)
    info = dataclasses.replace(ProgramInfo.of(program), prefill_len=32)
    with pytest.raises(ValueError, match=r"prefill\.onnx \(prefill\) input 'tokens'"):
        OrtSession(files, info, options=host.onnx)


def test_providers_missing_from_this_build_are_recorded(small_export):
    program, out, art = small_export
    files = {m: out / f for m, f in art.files.items()}
    sess = OrtSession(files, ProgramInfo.of(program), options={"providers": ["QNNExecutionProvider"]})
    missing = [] if "QNNExecutionProvider" in ort.get_available_providers() else ["QNNExecutionProvider"]
    assert sess.unavailable_providers == missing
    assert sess.providers[-1] == "CPUExecutionProvider"


def test_quant_schemes_it_does_not_claim_are_refused(host, tmp_path):
    """ONNX realises fp32 and ORT's schemes (afedge.quant.onnx_ort); ExecuTorch's 8da4w / Core ML's fp16 are not
    among them. The quantized artifacts themselves are proven by the parity quant flows."""
    for quant in ("8da4w", "fp16"):
        with pytest.raises(ExportError, match=rf"exporter 'onnx' .* quant scheme '{quant}'; it supports fp32, "
                                              r"int8, int8-dyn, int4-g32"):
            OnnxExporter().export(_small(), host, quant, tmp_path)
    assert not list(tmp_path.iterdir())


def test_accuracy_level_is_a_target_option(host, tmp_path):
    """`[onnx] accuracy_level` reaches every MatMulNBits node and the manifest, and level 4 (int8 compute) makes the
    export guard simulate int8 as int8-dyn; without it no node carries the attribute; a value the op lacks is
    refused, naming the field."""
    ex, onnx_opts = OnnxExporter(), {k: v for k, v in host.onnx.items() if k != "accuracy_level"}
    for level in (0, 4):
        target = dataclasses.replace(host, onnx=onnx_opts | ({"accuracy_level": level} if level else {}))
        assert ex.realised_as(target).get("int8") == ("int8-dyn" if level else None)
        [art] = ex.export(_small(), target, "int8", tmp_path / str(level))
        nodes = [n for n in onnx.load(str(tmp_path / str(level) / "step.onnx")).graph.node
                 if n.op_type == "MatMulNBits"]
        levels = {a.i for n in nodes for a in n.attribute if a.name == "accuracy_level"}
        assert nodes and levels == ({4} if level else set())
        assert art.info["quant"]["methods"]["step"]["accuracy_level"] == level
        assert ("computing in int8" in art.info["quant"]["realised_as"]) if level else \
            "realised_as" not in art.info["quant"]
    for bad in (5, "4", True):
        with pytest.raises(ExportError, match=r"target host: \[onnx\] accuracy_level must be an integer 0-4"):
            ex.export(_small(), dataclasses.replace(host, onnx=onnx_opts | {"accuracy_level": bad}), "int8",
                      tmp_path / "bad")


def test_large_models_use_external_data(host, tmp_path):
    """Above the threshold (lowered here through the target profile) the weights go to <file>.data."""
    program = _small()
    target = dataclasses.replace(host, onnx=host.onnx | {"external_data_threshold": 0})
    [art] = OnnxExporter().export(program, target, "fp32", tmp_path)
    assert art.info["external_data"] == {"step": "step.onnx.data", "prefill": "prefill.onnx.data"}
    for file in art.files.values():
        assert (tmp_path / f"{file}.data").is_file()
        onnx.checker.check_model(str(tmp_path / file))
    sess = _session(program, tmp_path, art, host)
    ref = TorchSession(program)
    tokens = np.arange(20, dtype=np.int64)[None]
    lo, _ = sess.prefill(tokens, sess.init_state())
    lr, _ = ref.prefill(tokens, ref.init_state())
    assert max_rel(lo, lr) <= TOL.max_rel


def test_export_failure_names_the_method_and_the_op(host, tmp_path):
    program = _small()
    mixer = program.model.blocks[0].mixer
    step = mixer.step

    def step_with_cumprod(x, state):  # aten.cumprod decomposes to prims.prod, which torch.onnx cannot translate
        y, state = step(x, state)
        return torch.cumprod(y, -1), state

    mixer.step = step_with_cumprod
    with pytest.raises(ExportError, match=r"exporter 'onnx' \(target host\) cannot export method 'step' of retnet: "
                                          r"op prims\.prod\.default .*aten\.cumprod"):
        OnnxExporter().export(program, host, "fp32", tmp_path)
