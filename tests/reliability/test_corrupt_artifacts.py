"""Case 12: a bit-flipped or truncated .onnx / .pte / TVM .so fails its sha256 before any parser runs; a hash-less
file table is refused; and with the hashes bypassed, each runtime's own loader is fuzzed (hypothesis) in a worker
process, where a damaged file must give a typed error, never a crash.

What the fuzzing covers, per runtime (the bundle hash is what protects everything else):
  onnx       flips anywhere, truncation: ONNX Runtime + afedge's pre-checks answer every case with a typed error.
  tvm        truncation and ELF-header damage, caught by `check_elf` before dlopen. A library is code: damage to its
             program headers or instructions can crash the dynamic loader or run anything, so afedge only ever
             loads a .so whose sha256 matches the manifest.
  executorch truncation, header and constant-data flips. ExecuTorch 1.5.1 does not check a kernel call's
             arguments against its operator (an Int where a Tensor goes aborts the process when the method runs):
             afedge's `check_kernel_args` refuses such a program before the runtime sees it (the last test).
             XNNPACK payloads (the delegate's own flatbuffer) are not validated by either; the hash covers them.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import assert_one_line_error, cli, edit_manifest
from tests.reliability.loader_worker import LoaderWorker

ARTIFACTS = {"onnx": "step.onnx", "executorch": "model.pte", "tvm": "model-x86_64.so"}
RUNTIME = {"onnx": "onnxruntime", "executorch": "executorch", "tvm": "tvm"}
FUZZ = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
_fresh = itertools.count()


# -- the hash gate -------------------------------------------------------------------------------------------------

@pytest.fixture
def no_parsers(monkeypatch):
    """Every native parser afedge could reach fails the test if it is called."""
    import onnx
    import onnxruntime
    import tvm
    from executorch.runtime import Runtime

    def called(*a, **k):
        raise AssertionError("a parser ran on a file whose hash did not match")
    for obj, name in ((onnx, "load"), (onnxruntime, "InferenceSession"), (Runtime, "load_program"),
                      (tvm.runtime, "load_module")):
        monkeypatch.setattr(obj, name, called)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("runtime", sorted(ARTIFACTS))
def test_damaged_artifact_fails_its_hash_before_any_parser(bundle_copy, capsys, no_parsers, runtime, damage):
    f = bundle_copy / ARTIFACTS[runtime]
    blob = bytearray(f.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x10
    else:
        del blob[len(blob) // 2:]
    f.write_bytes(bytes(blob))
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", runtime, "--tokens", "1,2")
    assert_one_line_error(rc, err, f"{f}: sha256 mismatch with the manifest")


def test_stripped_hash_is_refused(bundle_copy, capsys):
    def strip(m):
        del m["files"]["model.pte"]["sha256"]
    edit_manifest(bundle_copy, strip, redigest=True)
    rc, _, err = cli(capsys, "run", bundle_copy, "--runtime", "executorch", "--tokens", "1")
    assert_one_line_error(rc, err, "field 'files.model.pte' needs a sha256")


# -- the loaders themselves, hashes bypassed -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(bundle_dir):
    w = LoaderWorker(bundle_dir)
    yield w
    w.close()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def _regions(runtime: str, blob: bytes) -> list[tuple[int, int]]:
    """[lo, hi) byte ranges the fuzzer may flip (see the module docstring)."""
    if runtime == "onnx":
        return [(0, len(blob))]
    if runtime == "tvm":
        return [(0, 64)]
    from executorch.exir._serialize._program import _get_extended_header, deserialize_pte_binary
    delegates = [blob.find(d.data) for d in deserialize_pte_binary(blob).program.backend_delegate_data]
    return [(0, 32), (_get_extended_header(blob).segment_base_offset, min(delegates))]


def damages(size: int, regions: list[tuple[int, int]]):
    """("truncate", n) or ("flip", [(offset, bit), ...])."""
    offset = st.sampled_from(regions).flatmap(lambda r: st.integers(r[0], r[1] - 1))
    return st.one_of(st.integers(0, size - 1).map(lambda n: ("truncate", n)),
                     st.lists(st.tuples(offset, st.integers(0, 7)), min_size=1, max_size=8).map(lambda f: ("flip", f)))


def damaged_copy(bundle_dir: Path, scratch: Path, runtime: str, damage) -> dict[str, Path]:
    """The runtime's files, one of them damaged, in a fresh directory (a new inode: dlopen caches by inode)."""
    d = scratch / f"{runtime}-{next(_fresh)}"
    d.mkdir()
    blob = bytearray((bundle_dir / ARTIFACTS[runtime]).read_bytes())
    kind, arg = damage
    if kind == "truncate":
        del blob[arg:]
    else:
        for offset, bit in arg:
            blob[offset] ^= 1 << bit
    (d / ARTIFACTS[runtime]).write_bytes(bytes(blob))
    if runtime == "onnx":
        (d / "prefill.onnx").write_bytes((bundle_dir / "prefill.onnx").read_bytes())
        return {"step": d / "step.onnx", "prefill": d / "prefill.onnx"}
    return {"step": d / ARTIFACTS[runtime], "prefill": d / ARTIFACTS[runtime]}


def _fuzz(runtime: str, bundle_dir: Path, worker, scratch) -> None:
    blob = (bundle_dir / ARTIFACTS[runtime]).read_bytes()

    @FUZZ
    @given(damages(len(blob), _regions(runtime, blob)))
    def check(damage) -> None:
        answer = worker.load(RUNTIME[runtime], damaged_copy(bundle_dir, scratch, runtime, damage))
        assert answer["status"] == "ok" or answer["typed"], answer

    check()


@pytest.mark.parametrize("runtime", sorted(ARTIFACTS))
def test_damaged_file_gives_a_typed_error_never_a_crash(runtime, bundle_dir, worker, scratch):
    _fuzz(runtime, bundle_dir, worker, scratch)


def test_semantically_corrupt_pte_gives_a_typed_error(bundle_dir, worker, scratch):
    """A KernelCall passing an Int where its operator takes a Tensor: ExecuTorch 1.5.1 alone aborts in execute
    (evalue.h toTensor assert); afedge refuses it at load, naming the method, the call and the operator."""
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary
    from executorch.exir.schema import Int, KernelCall, Tensor
    pte = deserialize_pte_binary((bundle_dir / "model.pte").read_bytes())
    plan = next(p for p in pte.program.execution_plan if p.name == "step")
    an_int = next(i for i, v in enumerate(plan.values) if isinstance(v.val, Int))
    call = next(i.instr_args for i in plan.chains[0].instructions if isinstance(i.instr_args, KernelCall)
                and any(isinstance(plan.values[a].val, Tensor) for a in i.instr_args.args))
    arg = next(j for j, a in enumerate(call.args) if isinstance(plan.values[a].val, Tensor))
    call.args[arg] = an_int
    d = scratch / f"semantic-{next(_fresh)}"
    d.mkdir()
    (d / "model.pte").write_bytes(bytes(serialize_pte_binary(pte)))
    answer = worker.load("executorch", {"step": d / "model.pte", "prefill": d / "model.pte"})
    assert answer["status"] == "error" and answer["typed"], answer
    assert "method 'step' kernel call" in answer["message"] and "its schema takes Tensor" in answer["message"]
