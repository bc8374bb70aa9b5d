"""Cases 3-6: corrupt, hostile and mismatched afedge checkpoints are refused with the file and tensor named, before
anything large is allocated, and never loaded with strict=False; non-finite weights need --allow-nonfinite."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from afedge.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, read_safetensors_header, save_checkpoint
from afedge.model import LM
from tests.reliability.conftest import assert_one_line_error, cli, peak_rss_growth, tiny_config

SMALL = 32 << 20  # peak RSS growth allowed while refusing a file (the files here are a few KB)


@pytest.fixture(autouse=True, scope="module")
def _warm(tmp_path_factory):
    """Load one good checkpoint first, so lazy imports do not count as allocations of the refusals."""
    d = tmp_path_factory.mktemp("warm")
    save_checkpoint(LM(tiny_config()), d)
    load_checkpoint(d)


def raw_safetensors(path, header: dict, data: bytes = b"", length: int | None = None) -> None:
    """Write a safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def refuse(path, *needles: str) -> str:
    """load_checkpoint(path.parent) raises CheckpointError naming the file and every needle, allocating little."""
    def attempt():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path.parent)
        return str(e.value)
    msg, grew = peak_rss_growth(attempt)
    assert str(path) in msg
    for n in needles:
        assert n in msg, msg
    assert grew < SMALL, f"peak RSS grew by {grew} bytes while refusing {path.name}"
    return msg


# -- case 3: truncated, empty, Git-LFS pointer, HTML page ---------------------------------------------------------

def test_empty_safetensors_is_a_corrupt_checkpoint(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    w.write_bytes(b"")
    refuse(w, "corrupt checkpoint", "0 bytes")


def test_truncated_safetensors_names_expected_and_actual_bytes(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    full = w.stat().st_size
    w.write_bytes(w.read_bytes()[:full - 100])
    refuse(w, "corrupt checkpoint", "truncated", f"expected {full} bytes", f"actual {full - 100}")


def test_git_lfs_pointer_says_to_fetch_the_real_file(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    w.write_text("version https://git-lfs.github.com/spec/v1\n"
                 "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345678\n")
    msg = refuse(w, "corrupt checkpoint", "Git-LFS pointer", "expected 12345678 bytes",
                 f"actual {w.stat().st_size} bytes")
    assert "git lfs pull" in msg and "fetch the real file" in msg


def test_html_page_saved_as_a_model_is_named(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    w.write_text("<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n")
    refuse(w, "corrupt checkpoint", "HTML page", "fetch the real file")


def test_cli_export_of_a_truncated_checkpoint_is_one_line_and_writes_nothing(checkpoint_dir, tmp_path, capsys):
    w = checkpoint_dir / WEIGHTS
    w.write_bytes(w.read_bytes()[:-1])
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--model", checkpoint_dir, "--out", out)
    assert_one_line_error(rc, err, str(w), "corrupt checkpoint", "truncated")
    assert not out.exists() and not list(tmp_path.glob(".out*"))


# -- case 4: bloated header, overlapping offsets, shape overflow ---------------------------------------------------

def test_bloated_header_length_is_refused_before_reading_it(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    raw_safetensors(w, {}, length=1 << 40)
    refuse(w, "corrupt checkpoint", "header length 1099511627776 bytes exceeds")


def test_header_longer_than_the_file_is_refused_without_reading_it(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    raw_safetensors(w, {}, length=99_000_000)  # within the format's bound, but the file is a few bytes
    refuse(w, "truncated", f"needs {99_000_008} bytes")


def test_overlapping_offsets_are_refused(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    raw_safetensors(w, {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]},
                        "b": {"dtype": "F32", "shape": [16], "data_offsets": [32, 96]}}, bytes(96))
    refuse(w, "tensor 'b'", "overlap those of 'a'")


def test_offsets_beyond_the_file_are_refused(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    raw_safetensors(w, {"a": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}}, bytes(64))
    refuse(w, "truncated", "data 4096")


def test_shape_overflow_is_refused_without_allocating(checkpoint_dir):
    w = checkpoint_dir / WEIGHTS
    raw_safetensors(w, {"a": {"dtype": "F32", "shape": [1 << 62, 1 << 62], "data_offsets": [0, 64]}}, bytes(64))
    refuse(w, "tensor 'a'", "needs", "span 64")


def test_config_describing_a_huge_model_allocates_nothing(checkpoint_dir):
    """A terabyte-sized config beside small weights: the key/shape diff runs on the meta device."""
    cfg = json.loads((checkpoint_dir / "config.json").read_text())
    (checkpoint_dir / "config.json").write_text(json.dumps(cfg | {"d_model": 1 << 16, "n_layers": 64}))
    refuse(checkpoint_dir / WEIGHTS, "do not match", "wrong shape", "embed.weight")


# -- case 5: missing, unexpected, wrong-shaped keys ----------------------------------------------------------------

def test_key_and_shape_diff_is_reported_in_full_and_load_is_strict(checkpoint_dir, monkeypatch):
    import safetensors.torch as st
    w = checkpoint_dir / WEIGHTS
    tensors = load_file(str(w))
    del tensors["blocks.0.mlp.0.weight"]
    tensors["blocks.0.extra.weight"] = torch.zeros(3, 5)
    tensors["blocks.0.mlp.2.bias"] = torch.zeros(17)
    save_file(tensors, str(w))
    msg = refuse(w, "missing [blocks.0.mlp.0.weight [64, 16]]", "unexpected [blocks.0.extra.weight [3, 5]]",
                 "wrong shape [blocks.0.mlp.2.bias: file [17] vs config [16]]")
    assert "config.json" in msg
    calls = []
    real = st.load_model
    monkeypatch.setattr(st, "load_model", lambda *a, **k: calls.append(k.get("strict", True)) or real(*a, **k))
    tensors["blocks.0.mlp.0.weight"] = torch.zeros(64, 16)
    del tensors["blocks.0.extra.weight"]
    tensors["blocks.0.mlp.2.bias"] = torch.zeros(16)
    save_file(tensors, str(w))
    load_checkpoint(checkpoint_dir)
    assert calls == [True]


def test_tied_weights_saved_once_load(checkpoint_dir):
    header = read_safetensors_header(checkpoint_dir / WEIGHTS)
    assert ("embed.weight" in header) != ("head.weight" in header)  # safetensors keeps one name of a tied pair
    model = load_checkpoint(checkpoint_dir)
    assert model.head.weight is model.embed.weight


# -- case 6: NaN / Inf in weights ----------------------------------------------------------------------------------

def _poison(checkpoint_dir) -> None:
    w = checkpoint_dir / WEIGHTS
    tensors = load_file(str(w))
    tensors["blocks.0.mlp.0.weight"][3, :2] = float("nan")
    tensors["norm.weight"][0] = float("inf")
    save_file(tensors, str(w))


def test_nonfinite_weights_are_refused_naming_the_tensors(checkpoint_dir, tmp_path, capsys):
    _poison(checkpoint_dir)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                     "--out", out)
    assert_one_line_error(rc, err, "blocks.0.mlp.0.weight (2 NaN, 0 Inf)", "norm.weight (0 NaN, 1 Inf)",
                          "--allow-nonfinite")
    assert not out.exists()


def test_allow_nonfinite_exports_them(checkpoint_dir, tmp_path, capsys):
    _poison(checkpoint_dir)
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "host", "--runtimes", "onnx", "--model", checkpoint_dir,
                     "--out", out, "--allow-nonfinite", "--no-verify")
    assert rc == 0, err
    assert torch.isnan(load_checkpoint(out / "reference").blocks[0].mlp[0].weight).sum() == 2
