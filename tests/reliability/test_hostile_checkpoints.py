"""Cases 1 and 2: code hidden in a checkpoint never runs. A pickled `__reduce__` payload in a `.bin` (or saved in
place of safetensors) is refused under `torch.load(weights_only=True)` with no unsafe fallback, and a Hugging Face
directory's own modelling code (`auto_map`, `modeling_*.py`) is never imported without --trust-remote-code. A canary
file proves nothing ran."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from afedge.checkpoint import WEIGHTS
from tests.reliability.conftest import assert_one_line_error, cli

pytest.importorskip("transformers")
from tests.hf_models import hf_model, save_hf_dir  # noqa: E402

AFEDGE = Path(__file__).resolve().parents[2] / "afedge"


class Payload:
    """Unpickling this runs code: it creates the canary file."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


@pytest.fixture
def load_calls(monkeypatch) -> list[dict]:
    """Every torch.load call's keyword arguments (the real load still runs)."""
    calls, real = [], torch.load

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)
    monkeypatch.setattr(torch, "load", spy)
    return calls


# -- case 1: pickles -----------------------------------------------------------------------------------------------

def test_pickled_code_in_a_bin_never_runs(tmp_path, capsys, load_calls):
    d = save_hf_dir(hf_model("mamba"), tmp_path / "evil", weights="bin")
    canary = tmp_path / "code-ran"
    torch.save({**hf_model("mamba").state_dict(), "payload": Payload(canary)}, d / "pytorch_model.bin")
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", d, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, str(d), "weights_only=True) refused", "afedge never unpickles code")
    assert not canary.exists() and not (tmp_path / "out").exists()
    assert load_calls and all(k.get("weights_only") is True for k in load_calls), load_calls


def test_a_pickle_saved_as_safetensors_is_a_corrupt_checkpoint(checkpoint_dir, capsys, load_calls):
    canary = checkpoint_dir.parent / "code-ran"
    torch.save({"w": torch.zeros(2), "payload": Payload(canary)}, checkpoint_dir / WEIGHTS)
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", checkpoint_dir)
    assert_one_line_error(rc, err, str(checkpoint_dir / WEIGHTS), "corrupt checkpoint")
    assert not canary.exists() and load_calls == []


def test_afedge_has_no_unsafe_loader():
    """Every torch.load in afedge passes weights_only=True; nothing unpickles."""
    unsafe = re.compile(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\.load|\bcloudpickle\b"
                        r"|\bnp\.load\([^)]*allow_pickle=True")
    for f in sorted(AFEDGE.rglob("*.py")):
        text = f.read_text()
        assert not unsafe.search(text), f"{f}: unsafe deserialisation"
        for call in re.finditer(r"torch\.load\(", text):
            args = text[call.end():text.find(")", call.end())]
            assert "weights_only=True" in args, f"{f}: torch.load without weights_only=True"


# -- case 2: remote code -------------------------------------------------------------------------------------------

def _with_modeling_code(d: Path, canary: Path, module: str) -> None:
    (d / f"{module}.py").write_text(f"from pathlib import Path\nPath({str(canary)!r}).touch()\n")


def test_auto_map_code_never_runs_without_the_flag(tmp_path, capsys):
    d = save_hf_dir(hf_model("mamba"), tmp_path / "remote")
    canary = tmp_path / "code-ran"
    _with_modeling_code(d, canary, "modeling_custom")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | {"auto_map": {"AutoModelForCausalLM":
                                                                  "modeling_custom.CustomMamba"}}))
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", d, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "auto_map", "modeling_custom.CustomMamba", "--trust-remote-code")
    assert not canary.exists() and "modeling_custom" not in sys.modules


def test_modeling_files_without_auto_map_are_never_imported(tmp_path, capsys, monkeypatch):
    """A modelling file shadowing transformers' own module name sits in the directory; the import goes through
    transformers' built-in class and stops before exporting."""
    d = save_hf_dir(hf_model("mamba"), tmp_path / "shadow")
    canary = tmp_path / "code-ran"
    _with_modeling_code(d, canary, "modeling_mamba")
    _with_modeling_code(d, canary, "configuration_mamba")
    import afedge.pipeline

    def stop(*a, **k):
        raise RuntimeError("stopped after the import")
    monkeypatch.setattr(afedge.pipeline, "export_bundle", stop)
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", d, "--out", tmp_path / "out")
    assert_one_line_error(rc, err, "stopped after the import")
    assert not canary.exists()
