"""Case 7: values beyond the fp16 range for an fp16 target (apple-ane: Core ML, fp16 compute) refuse the export
before anything is written, naming the layer; a model inside the range passes the check."""
from __future__ import annotations

import torch

from afedge.checkpoint import save_checkpoint
from afedge.precision import FP16_MAX, fp16_overflows
from tests.reliability.conftest import assert_one_line_error, cli, tiny_program


def test_model_within_range_passes():
    assert fp16_overflows(tiny_program()) == {}


def test_weight_beyond_fp16_is_refused_naming_it(tmp_path, capsys):
    program = tiny_program()
    with torch.no_grad():
        program.model.blocks[0].mlp[2].bias[5] = 2 * FP16_MAX
    save_checkpoint(program.model, tmp_path / "ckpt")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "export", "--target", "apple-ane", "--model", tmp_path / "ckpt", "--out", out)
    assert_one_line_error(rc, err, "target apple-ane, quant fp16", "weight blocks.0.mlp.2.bias", "--quant fp32")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_activation_beyond_fp16_is_refused_naming_the_layer():
    """Weights all inside the range (|w| <= 300), but the first MLP's output reaches ~16 * 300 * 300."""
    program = tiny_program()
    with torch.no_grad():
        program.model.embed.weight.fill_(1.0)
        program.model.blocks[0].norm2.weight.fill_(300.0)
        program.model.blocks[0].mlp[0].weight.fill_(300.0)
    assert not any(k.startswith("weight") for k in fp16_overflows(program))
    bad = fp16_overflows(program)
    assert "activation blocks.0.mlp.0" in bad and bad["activation blocks.0.mlp.0"] > FP16_MAX


def test_state_beyond_fp16_is_named():
    """k and v of ~1e3 each: every weight and projection is inside the range, their outer product (the state) not."""
    program = tiny_program()
    mixer = program.model.blocks[0].mixer
    with torch.no_grad():
        mixer.k_proj.weight.fill_(100.0)
        mixer.v_proj.weight.fill_(100.0)
    bad = fp16_overflows(program)
    assert "state layers.0.kv" in bad, bad
    assert not any(k.startswith("weight") for k in bad)
