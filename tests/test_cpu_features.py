"""Native code compiled for CPU features (the host TVM library's AVX2 + FMA) is refused, by name, where they are
missing, before anything is loaded."""
from __future__ import annotations

from pathlib import Path

import pytest

from afedge.session import ArtifactSession, ProgramInfo, RuntimeUnavailable
from afedge.target import host_cpu_features


class _Recorder(ArtifactSession):
    runtime = "recorder"

    def _load(self) -> None:
        self.loaded = True


def _info() -> ProgramInfo:
    from afedge import LM, LMConfig, to_recurrent
    return ProgramInfo.of(to_recurrent(LM(LMConfig(d_model=16, n_layers=1, mixer="retnet")), 8, 16))


@pytest.mark.parametrize("line, flags", [("flags\t\t: fpu sse2 avx2 fma", {"fpu", "sse2", "avx2", "fma"}),
                                         ("Features\t: fp asimd crc32", {"fp", "asimd", "crc32"})],
                         ids=["x86", "arm"])
def test_cpuinfo_flags_are_read(tmp_path, line, flags):
    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\n{line}\n")
    assert host_cpu_features(tmp_path / "cpuinfo") == flags
    assert host_cpu_features(tmp_path / "absent") is None


def test_a_library_needing_a_missing_feature_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr("afedge.target.host_cpu_features", lambda: {"sse2", "avx2"})
    files = {"step": Path("/nowhere/model-x86_64.so")}
    with pytest.raises(RuntimeUnavailable, match=r"model-x86_64.so is compiled for CPU features fma\b"):
        _Recorder(files, _info(), cpu_features=("avx2", "fma"))
    assert _Recorder(files, _info(), cpu_features=("avx2",)).loaded


def test_tvm_records_x86_mattr_only():
    pytest.importorskip("tvm")
    from afedge.exporters.tvm import cpu_features
    assert cpu_features({"kind": "llvm", "mattr": ["+avx2", "+fma", "-avx512f"]}, "x86_64") == ["avx2", "fma"]
    assert cpu_features({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "aarch64") == []
    assert cpu_features({"kind": "cuda"}, "x86_64") == []
