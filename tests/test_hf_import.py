"""Hugging Face checkpoints in (afedge.hf): tiny random `mamba`, `falcon_mamba`, `mamba2` and `rwkv` models saved
with transformers' own classes; afedge's parallel and step logits, and every exported artifact, match transformers'
forward; the loader refuses pickled code, remote code, unsupported types and an unreachable hub with clear errors.

The exporter x model-type matrix runs one case per exporter by default, the rest under `slow`.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.tasks")

from afedge import to_recurrent  # noqa: E402
from afedge.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from afedge.cli import main  # noqa: E402
from afedge.hf import HFImportError, load_hf, supported_types  # noqa: E402
from afedge.hf.importers import Importer  # noqa: E402
from afedge.hf.rwkv import RwkvImporter  # noqa: E402
from afedge.parity.metrics import max_rel  # noqa: E402
from afedge.pipeline import export_bundle, open_session  # noqa: E402
from afedge.target import load_target  # noqa: E402
from afedge.tolerances import tolerance  # noqa: E402
from afedge.zoo import resolve_model  # noqa: E402
from tests.hf_models import VOCAB, hf_model, save_hf_dir  # noqa: E402

TYPES = ("mamba", "falcon_mamba", "mamba2", "rwkv")
TOL = tolerance("fp32")
B, T = 2, 40  # T crosses several afedge chunks and HF's mamba2 chunk (16)
CHUNK, PREFILL, STEPS = 8, 16, 8  # exported program: prefill block of 16 in chunks of 8, then single steps
# One model type per exporter in the default suite (TVM compiles are the slow ones: one model only).
DEFAULT_EXPORTS = {("falcon_mamba", "onnx"), ("rwkv", "executorch"), ("mamba2", "tvm")}

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hf")
    return {t: save_hf_dir(hf_model(t), base / t) for t in TYPES}


@pytest.fixture(scope="module")
def imported(hf_dirs):
    return {t: load_hf(d) for t, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def transformers_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' own forward of the saved checkpoint (eval mode: RWKV rescales as it does in inference)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()(tokens, use_cache=False).logits


@pytest.fixture(scope="module")
def reference(hf_dirs, tokens) -> dict[str, torch.Tensor]:
    return {t: transformers_logits(d, tokens) for t, d in hf_dirs.items()}


@torch.no_grad()
@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("chunk", [None, CHUNK])
def test_parallel_logits_match_transformers(imported, reference, tokens, model_type, chunk):
    got, _ = imported[model_type].model(tokens, chunk_size=chunk)
    assert max_rel(got, reference[model_type]) <= TOL.max_rel


@torch.no_grad()
@pytest.mark.parametrize("model_type", TYPES)
def test_step_logits_match_transformers(imported, reference, tokens, model_type):
    model = imported[model_type].model
    state, ys = model.init_state(B), []
    for t in range(T):
        y, state = model.step(tokens[:, t], state)
        ys.append(y)
    assert max_rel(torch.stack(ys, 1), reference[model_type]) <= TOL.max_rel


@torch.no_grad()
@pytest.mark.parametrize("model_type", TYPES)
def test_reference_checkpoint_round_trips(imported, tokens, model_type, tmp_path):
    """What a bundle stores as reference/ rebuilds the same model; its config is plain JSON (no NaN/Infinity)."""
    model = imported[model_type].model
    save_checkpoint(model, tmp_path)
    json.dumps(json.loads((tmp_path / "config.json").read_text()), allow_nan=False)
    again = load_checkpoint(tmp_path)
    assert again.cfg == model.cfg
    assert torch.equal(again(tokens)[0], model(tokens)[0])


def test_source_records_every_file_it_read(imported, hf_dirs):
    src = imported["mamba"].source
    d = hf_dirs["mamba"]
    assert src["kind"] == "huggingface" and src["model_type"] == "mamba" and src["task"] == "text-generation"
    assert src["path"] == str(d.resolve()) and src["id"] is None
    assert set(src["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    for name, rec in src["files"].items():
        assert rec["sha256"] == hashlib.sha256((d / name).read_bytes()).hexdigest()
    assert src["import_check"]["max_rel"] <= TOL.max_rel
    assert imported["mamba"].tokenizer == d.resolve() / "tokenizer.json"


def test_import_check_catches_a_wrong_mapping(hf_dirs, monkeypatch):
    """Without RWKV's inference rescaling the import differs from transformers: the probe check must refuse it."""
    monkeypatch.setattr(RwkvImporter, "convert", Importer.convert)
    with pytest.raises(HFImportError, match="differs from transformers' forward"):
        load_hf(hf_dirs["rwkv"])


@torch.no_grad()
def test_bin_weights_load_with_weights_only(tmp_path, imported, tokens):
    d = save_hf_dir(hf_model("mamba"), tmp_path / "bin", weights="bin")
    got = load_hf(d)
    assert set(got.source["files"]) == {"config.json", "pytorch_model.bin", "tokenizer.json"}
    assert torch.equal(got.model(tokens)[0], imported["mamba"].model(tokens)[0])  # same seed, same weights


class _Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _poisoned_bin(directory: Path, marker: Path) -> None:
    state = hf_model("mamba").state_dict()
    torch.save({**state, "payload": _Payload(marker)}, directory / "pytorch_model.bin")


def test_pickled_code_in_bin_is_refused(tmp_path):
    d = save_hf_dir(hf_model("mamba"), tmp_path / "evil", weights="bin")
    marker = tmp_path / "code-ran"
    _poisoned_bin(d, marker)
    with pytest.raises(HFImportError, match=r"weights_only=True\) refused"):
        load_hf(d)
    assert not marker.exists()


def test_safetensors_preferred_over_bin(tmp_path):
    """A directory with both formats loads the safetensors file and never unpickles the .bin."""
    d = save_hf_dir(hf_model("mamba"), tmp_path / "both")
    marker = tmp_path / "code-ran"
    _poisoned_bin(d, marker)
    got = load_hf(d)
    assert "pytorch_model.bin" not in got.source["files"] and "model.safetensors" in got.source["files"]
    assert not marker.exists()


def test_auto_map_is_refused_without_trust_remote_code(tmp_path):
    d = save_hf_dir(hf_model("mamba"), tmp_path / "remote")
    marker = tmp_path / "code-ran"
    (d / "modeling_custom.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomMamba"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFImportError, match="auto_map.*--trust-remote-code"):
        resolve_model(str(d))
    assert not marker.exists()


def test_unsupported_model_type_lists_supported(tmp_path, capsys):
    d = tmp_path / "jamba"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "jamba", "architectures": ["JambaForCausalLM"]}))
    with pytest.raises(HFImportError) as err:
        resolve_model(str(d))
    assert "'jamba' is not supported" in str(err.value)
    assert all(t in str(err.value) for t in TYPES) and sorted(TYPES) == supported_types()
    assert main(["export", "--model", str(d), "--target", "host", "--out", str(tmp_path / "out")]) == 1
    assert "jamba" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_names_the_local_directory_alternative(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    out = subprocess.run([sys.executable, "-m", "afedge.cli", "export", "--model", "state-spaces/mamba-130m-hf",
                          "--target", "host", "--out", str(tmp_path / "out")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("afedge: error: --model state-spaces/mamba-130m-hf: not a local directory")
    assert "hf download state-spaces/mamba-130m-hf --local-dir DIR" in err and "--model DIR" in err


def _check_bundle(bundle, hf_dir: Path, tokens: torch.Tensor, want: torch.Tensor, source: dict) -> None:
    """The bundle's parity gate passed; its artifacts also match transformers directly; source and tokenizer
    came along."""
    assert bundle.manifest["parity"]["verdict"] == "pass"
    assert bundle.manifest["model"]["source"]["files"] == source["files"]
    assert json.loads(bundle.file("tokenizer.json").read_text()) == json.loads((hf_dir / "tokenizer.json").read_text())
    ids = tokens[:1, :PREFILL + STEPS].numpy()
    for art in bundle.artifacts:
        sess = open_session(bundle, art, threads=2)
        logits, state = sess.prefill(ids[:, :PREFILL], sess.init_state())
        got = [logits]
        for t in range(PREFILL, PREFILL + STEPS - 1):
            logits, state = sess.step(ids[:, t], state)
            got.append(logits)
        sess.close()
        assert max_rel(torch.from_numpy(got[0]), want[:1, PREFILL - 1]) <= TOL.max_rel, art.name
        assert max_rel(torch.tensor(got[1:]), want[:1, PREFILL:PREFILL + STEPS - 1].transpose(0, 1)) <= TOL.max_rel


def _export_param(model_type: str, exporter: str):
    marks = [] if (model_type, exporter) in DEFAULT_EXPORTS else [pytest.mark.slow]
    return pytest.param(model_type, exporter, id=f"{model_type}-{exporter}", marks=marks)


@pytest.mark.parametrize("model_type,exporter",
                         [_export_param(t, e) for t in TYPES for e in ("onnx", "executorch", "tvm")])
def test_exported_artifacts_match_transformers(imported, hf_dirs, reference, tokens, model_type, exporter, tmp_path):
    r = imported[model_type]
    program = to_recurrent(r.model, chunk_size=CHUNK, prefill_len=PREFILL)
    bundle, _ = export_bundle(program, load_target("host"), tmp_path / "bundle", [exporter], verify=True, steps=32,
                              source=r.source, progress=lambda m: None, tokenizer=r.tokenizer)
    _check_bundle(bundle, hf_dirs[model_type], tokens, reference[model_type], r.source)


def test_cli_exports_a_hugging_face_directory(hf_dirs, tmp_path):
    out = tmp_path / "bundle"
    rc = main(["export", "--model", str(hf_dirs["mamba"]), "--target", "host", "--runtimes", "onnx",
               "--out", str(out), "--steps", "32"])
    assert rc == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["verdict"] == "pass"
    assert manifest["model"]["source"]["kind"] == "huggingface"
    assert manifest["model"]["source"]["model_type"] == "mamba"
    # `afedge bench` runs transformers' own generate on the source checkpoint beside the artifacts
    md = tmp_path / "bench.md"
    assert main(["bench", str(out), "--runtime", "onnx,hf", "--contexts", "16,32", "--prompt-len", "32",
                 "--steps", "4", "--repeats", "1", "--out", str(md)]) == 0
    rows = {r["name"]: r for r in json.loads(md.with_suffix(".json").read_text())["runtimes"]}
    assert rows["hf"]["status"] == "ok", rows["hf"]
    assert rows["hf"]["decode_tok_s"] > 0 and rows["hf"]["prefill"]["chunked_tok_s"] > 0
    assert rows["onnx"]["status"] == "ok" and rows["onnx"]["decode_tok_s"] > 0
