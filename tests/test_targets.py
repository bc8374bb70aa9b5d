"""Every target profile loads, validates, and names only registered exporters and known tolerance profiles."""
from __future__ import annotations

import pytest

from afedge.exporting import EXPORTERS, load_plugins
from afedge.target import TargetError, load_target, load_target_file, target_names

REQUIRED_TARGETS = {"host", "android-arm64", "linux-arm64", "apple-ane", "qualcomm-htp", "desktop-cuda"}


def test_the_six_profiles_exist():
    assert REQUIRED_TARGETS <= set(target_names())


@pytest.mark.parametrize("name", target_names())
def test_profile_is_valid(name):
    load_plugins()
    t = load_target(name)
    assert all(e in EXPORTERS for e in t.exporters), t.exporters
    if "tvm" in t.exporters:
        assert "kind" in t.tvm["target"]
    if "onnx" in t.exporters:
        assert t.onnx["opset"] >= 18 and t.onnx["providers"][-1] == "CPUExecutionProvider"


def test_bad_field_names_the_file_and_field(tmp_path):
    good = (load_target("host").path)
    text = open(good).read().replace('arch = "x86_64"', 'arch = "riscv"')
    bad = tmp_path / "host.toml"
    bad.write_text(text)
    with pytest.raises(TargetError, match=r"host\.toml: arch must be one of"):
        load_target_file(bad)


def test_unknown_field_and_unknown_target(tmp_path):
    bad = tmp_path / "x.toml"
    bad.write_text(open(load_target("host").path).read().replace('name = "host"', 'name = "x"\nbogus = 1'))
    with pytest.raises(TargetError, match=r"unknown fields \['bogus'\]"):
        load_target_file(bad)
    with pytest.raises(TargetError, match="unknown target 'nope'; known: "):
        load_target("nope")


def test_a_profile_file_of_ones_own_loads_by_path(tmp_path):
    """`--target ./host-int8.toml`: a copy of host with one option changed loads from its path, validated."""
    mine = tmp_path / "host-int8.toml"
    mine.write_text(open(load_target("host").path).read().replace('name = "host"', 'name = "host-int8"')
                    .replace('providers = ["CPUExecutionProvider"]',
                             'providers = ["CPUExecutionProvider"]\naccuracy_level = 4'))
    t = load_target(str(mine))
    assert (t.name, t.onnx["accuracy_level"], t.path) == ("host-int8", 4, str(mine))
    with pytest.raises(TargetError, match=r"nope\.toml: "):
        load_target(str(tmp_path / "nope.toml"))
