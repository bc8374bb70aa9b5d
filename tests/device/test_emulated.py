"""ARM64 parity without a phone: the android-arm64 bundle's ONNX and TVM artifacts on emulated CPUs (QEMU user
mode), judged against this machine's PyTorch reference; one step through a TVM RPC tracker on loopback.

Slow: the first run builds the emulated device (`afedge device setup emu-arm64`: about 300 MB of downloads, under a
minute here); later runs reuse the cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from afedge.cli import main
from afedge.model import LM, LMConfig
from afedge.rewrite import to_recurrent
from afedge.target import load_target

pytestmark = pytest.mark.slow
CPUS = ["cortex-a53", "neoverse-n1", "neoverse-v1", "max"]


@pytest.fixture(scope="module")
def image():
    from afedge.device.image import setup_emu_arm64
    return setup_emu_arm64(progress=lambda m: None)


def _bundle(root: Path, quant: str) -> Path:
    from afedge.pipeline import export_bundle
    program = to_recurrent(LM(LMConfig(vocab_size=256, d_model=64, n_layers=2, mixer="mamba2",
                                       mixer_kwargs={"d_state": 16, "head_dim": 16}, mlp_ratio=1)),
                           chunk_size=8, prefill_len=16)
    out = root / f"arm64-{quant}"
    export_bundle(program, load_target("android-arm64"), out, exporters=["onnx", "tvm"], quant=quant,
                  verify=False, progress=lambda m: None)
    return out


@pytest.fixture(scope="module", params=["fp32", "int8"])
def bundle(request, tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("emu"), request.param)


def test_android_arm64_bundle_passes_parity_on_every_emulated_cpu(image, bundle):
    report = bundle.parent / f"{bundle.name}-emu.md"
    argv = ["parity", str(bundle), "--steps", "64", "--report", str(report)]
    assert main([*argv, *(a for c in CPUS for a in ("--device", f"emu:{c}"))]) == 0
    reports = [r["report"] for r in json.loads(report.with_suffix(".json").read_text()) if r["report"]]
    assert {tuple(r["runtime"].split("@")) for r in reports} == \
        {(rt, f"emu:{c}") for rt in ("onnxruntime", "tvm") for c in CPUS}
    assert len(reports) == 3 * 2 * len(CPUS) and all(r["passed"] for r in reports)   # 3 workloads each


def test_setup_again_downloads_nothing(image, monkeypatch):
    from afedge.device import image as img

    def refuse(url, *a, **k):
        raise AssertionError(f"downloaded {url} again")
    monkeypatch.setattr(img, "_fetch", refuse)
    monkeypatch.setattr(img.subprocess, "run", lambda *a, **k: refuse(a[0]))
    assert img.setup_emu_arm64(progress=lambda m: None).root == image.root


def test_one_step_through_a_tvm_rpc_tracker_on_loopback(image, tmp_path):
    from afedge.bundle import load_bundle
    from afedge.device.devices import RpcDevice, emu_device
    from afedge.device.rpc import serve_emulated, start_tracker
    from afedge.device.session import open_device_session
    from afedge.pipeline import reference_program
    from afedge.runtimes.torch import TorchSession
    from afedge.tolerances import tolerance
    b = load_bundle(_bundle(tmp_path, "fp32"))
    tracker, port = start_tracker()
    server = None
    try:
        server = serve_emulated(emu_device("neoverse-n1", image), ("127.0.0.1", port), "linux-arm64")
        art = next(a for a in b.artifacts if a.runtime == "tvm" and a.arch == "aarch64")
        sess = open_device_session(b, art, RpcDevice("linux-arm64", "127.0.0.1", port))
        ref = TorchSession(reference_program(b), 1)
        tok = np.array([7], dtype=np.int64)
        (got, g_state), (want, w_state) = sess.step(tok, sess.init_state()), ref.step(tok, ref.init_state())
        sess.close()
    finally:
        for p in (server, tracker):
            if p is not None:
                p.kill()
                p.wait()
    bound = tolerance("fp32").max_rel
    assert sess.runtime == f"tvm@rpc:linux-arm64@127.0.0.1:{port}"
    assert np.abs(got - want).max() <= bound * np.abs(want).max()
    assert all(np.abs(g - w).max() <= bound * max(np.abs(w).max(), 1e-6) for g, w in zip(g_state, w_state))


def test_emulated_bench_figures_are_marked_and_never_checked_as_device_latency(image, tmp_path):
    b = _bundle(tmp_path, "fp32")
    out = tmp_path / "bench.md"
    assert main(["bench", str(b), "--device", "emu:neoverse-n1", "--contexts", "4,20", "--prompt-len", "24",
                 "--steps", "4", "--repeats", "1", "--bandwidth-mib", "32", "--no-torch", "--no-baseline",
                 "--no-hf", "--check", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in res["runtimes"]}
    emulated = [r for r in rows.values() if r.get("status") == "ok"]
    assert {r["runtime"] for r in emulated} == {"onnxruntime", "tvm"}
    assert all(r["emulated"] and "never device latency" in r["timing"] and "roofline_ratio" not in r
               for r in emulated)
    assert not res["measured_on_target"]
    latency = [v for v in res["budgets"]["verdicts"] if v["budget"] in ("decode_ms_p90", "prefill_tok_s")]
    assert latency and all(v["status"] == "not-on-device" for v in latency)
    assert "EMULATED, not device latency" in out.read_text()
