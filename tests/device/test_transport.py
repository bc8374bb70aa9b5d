"""The device machinery without an emulator: the frame worker run by this machine's Python (same runtimes, same
files), device names, the features check, and a setup whose downloads are refused."""
from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from afedge.cli import main
from afedge.device.devices import WORKER, EmuDevice, RpcDevice, parse_device
from afedge.device.image import EmuImage, SetupError, setup_emu_arm64
from afedge.device.session import EXECUTORCH_GAP, DeviceSession, open_device_session
from afedge.device.worker import read_frame, write_frame
from afedge.model import LM, LMConfig
from afedge.parity.compare import compare
from afedge.parity.workloads import prompt_decode
from afedge.rewrite import to_recurrent
from afedge.session import ArtifactError, RuntimeUnavailable
from afedge.target import host_arch, load_target
from afedge.tolerances import tolerance

pytest.importorskip("onnxruntime")
pytest.importorskip("tvm")


@dataclass(frozen=True)
class LocalDevice:
    """The worker under this machine's own Python: everything a device does but the emulation."""

    arch = host_arch()
    emulated = False
    name = "local"

    def popen(self, stderr) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=stderr)

    def stage(self, path: Path) -> str:
        return str(path)

    def check_features(self, seen: list[str]) -> None:
        assert seen, "the worker reports this CPU's features"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from afedge.bundle import load_bundle
    from afedge.pipeline import export_bundle
    program = to_recurrent(LM(LMConfig(vocab_size=256, d_model=32, n_layers=1, mixer="retnet",
                                       mixer_kwargs={"n_heads": 2}, mlp_ratio=1)), chunk_size=8, prefill_len=16)
    out = tmp_path_factory.mktemp("device") / "tiny"
    export_bundle(program, load_target("host"), out, exporters=["onnx", "tvm"], verify=False,
                  progress=lambda m: None)
    return load_bundle(out)


@pytest.mark.parametrize("runtime", ["onnx", "tvm"])
def test_worker_session_is_bit_identical_to_the_local_runtime_and_passes_parity(bundle, runtime):
    from afedge.pipeline import open_session, reference_program
    from afedge.runtimes.torch import TorchSession
    art = bundle.artifact(next(a.name for a in bundle.artifacts if a.name.startswith(runtime)))
    local = open_session(bundle, art, 1)
    remote = open_device_session(bundle, art, LocalDevice(), 1)
    tokens = np.random.default_rng(0).integers(0, 256, (1, 37))   # two prefill blocks + 5 steps
    (a, sa), (b, sb) = local.prefill(tokens, local.init_state()), remote.prefill(tokens, remote.init_state())
    assert np.array_equal(a, b) and all(np.array_equal(x, y) for x, y in zip(sa, sb))
    ref = TorchSession(reference_program(bundle), 1)
    rep = compare(ref, remote, prompt_decode(20, 24), tolerance("fp32"), "fp32")
    assert rep.passed, rep.failure
    assert rep.runtime == f"{art.runtime}@local"
    assert remote.peak_rss_bytes() > 0
    remote.close()


def test_worker_failures_are_typed_one_line_errors(bundle, tmp_path):
    art = bundle.artifact(next(a.name for a in bundle.artifacts if a.runtime == "onnxruntime"))
    with pytest.raises(RuntimeUnavailable, match="no device runner"):
        DeviceSession(LocalDevice(), "coreml", {"step": Path(bundle.file(art.files["step"]))}, bundle.info)
    with pytest.raises(RuntimeUnavailable, match="is not on the device"):
        DeviceSession(LocalDevice(), "onnxruntime", {"step": tmp_path / "gone.onnx"}, bundle.info)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="local: .*junk.onnx"):
        DeviceSession(LocalDevice(), "onnxruntime", {"step": junk}, bundle.info)


def test_a_worker_that_dies_is_reported_not_hung(bundle):
    art = bundle.artifact(next(a.name for a in bundle.artifacts if a.runtime == "onnxruntime"))
    sess = open_device_session(bundle, art, LocalDevice(), 1)
    sess.worker.proc.kill()
    sess.worker.proc.wait()
    with pytest.raises(RuntimeUnavailable, match="worker stopped during 'run'"):
        sess.step(np.array([1]), sess.init_state())
    sess.close()


def test_frames_carry_arrays_exactly_and_refuse_pickles():
    arrays = [np.arange(6, dtype=np.int64).reshape(2, 3), np.float32([[1.5, -0.0]]), np.zeros((1, 0, 4))]
    buf = io.BytesIO()
    write_frame(buf, {"op": "run", "method": "step"}, arrays)
    buf.seek(0)
    header, got = read_frame(buf)
    assert header == {"op": "run", "method": "step"}
    assert all(a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b) for a, b in zip(arrays, got))
    buf = io.BytesIO()
    write_frame(buf, {"op": "run"}, [np.array([{"x": 1}], dtype=object)])
    buf.seek(0)
    with pytest.raises(ValueError, match="pickle"):
        read_frame(buf)


def test_artifacts_a_device_cannot_run_say_why(bundle, tmp_path):
    device = EmuDevice("neoverse-n1", "neoverse-n1", ("asimd",), (), "", EmuImage(tmp_path))
    twin = next(a for a in bundle.artifacts if a.runtime == "tvm")
    with pytest.raises(RuntimeUnavailable, match=f"built for {host_arch()}; emu:neoverse-n1 is aarch64"):
        open_device_session(bundle, twin, device)
    pte = dataclasses.replace(twin, name="executorch", runtime="executorch", arch="any")
    with pytest.raises(RuntimeUnavailable, match="no torch-free ExecuTorch runner"):
        open_device_session(bundle, pte, device)
    onnx = next(a for a in bundle.artifacts if a.runtime == "onnxruntime")
    with pytest.raises(RuntimeUnavailable, match="TVM RPC device; it runs TVM artifacts"):
        open_device_session(bundle, onnx, RpcDevice("linux-arm64", "127.0.0.1", 9190))
    assert EXECUTORCH_GAP.startswith("executorch:")


def test_an_emulator_that_ignores_cpu_is_refused(tmp_path):
    device = EmuDevice("neoverse-v1", "neoverse-v1", ("asimd", "sve", "i8mm"), ("sme",), "", EmuImage(tmp_path))
    device.check_features(["fp", "asimd", "sve", "i8mm"])
    with pytest.raises(RuntimeUnavailable, match=r"should have \['sve', 'i8mm'\]"):
        device.check_features(["fp", "asimd"])   # what bookworm's QEMU 7.2 shows: the host's view
    with pytest.raises(RuntimeUnavailable, match=r"lack \['sme'\]"):
        device.check_features(["asimd", "sve", "i8mm", "sme"])


def test_device_names():
    assert parse_device("rpc:linux-arm64@127.0.0.1:9190") == RpcDevice("linux-arm64", "127.0.0.1", 9190)
    assert parse_device("adb:R58M12345").name == "adb:R58M12345"
    with pytest.raises(ValueError, match="unknown emulated CPU 'cortex-x9'.*emu:neoverse-v1"):
        parse_device("emu:cortex-x9")
    with pytest.raises(ValueError, match=r"use emu:CPU .*adb:SERIAL or rpc:KEY@HOST:PORT"):
        parse_device("phone")


def test_parity_on_an_unknown_device_is_one_line_and_non_zero(bundle, capsys):
    assert main(["parity", str(bundle.path), "--device", "emu:cortex-x9"]) == 1
    assert "unknown emulated CPU 'cortex-x9'" in capsys.readouterr().err


def test_unbuilt_device_says_how_to_build_it(bundle, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFEDGE_CACHE", str(tmp_path))
    assert main(["parity", str(bundle.path), "--device", "emu:max"]) == 1
    assert "run `afedge device setup emu-arm64` first" in capsys.readouterr().err


def test_refused_download_names_the_url_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AFEDGE_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")   # the discard port: refused
    with pytest.raises(SetupError, match=r"downloading http://127.0.0.1:9/debian/dists/trixie/InRelease failed"):
        setup_emu_arm64(tmp_path / "emu", progress=lambda m: None)
    assert [p.name for p in (tmp_path / "emu").iterdir()] == []


def test_device_list_names_every_emulated_cpu_and_how_to_build_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AFEDGE_CACHE", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["device", "list"]) == 0
    out = capsys.readouterr().out
    assert all(f"emu:{c}" in out for c in ("cortex-a53", "neoverse-n1", "neoverse-v1", "neoverse-n2", "max"))
    assert "afedge device setup emu-arm64" in out and "rpc:KEY@HOST:PORT" in out
