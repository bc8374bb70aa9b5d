"""Units of `afedge bench`: budget validation and checking, the roofline's byte count, the KV-cache baseline, the
decode interleaved step by step over the contexts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from afedge.bench import measure
from afedge.bench.baseline import KVCacheTransformer, baseline_for, matched_mlp_hidden
from afedge.bench.budgets import BUDGET_KEYS, check
from afedge.bench.roofline import artifact_roofline, roofline, weight_bytes_per_token
from afedge.model import LM, LMConfig
from afedge.session import ProgramInfo, Session
from afedge.state import StateSlot, StateSpec
from afedge.target import TargetError, load_target, load_target_file, target_names
from afedge.tolerances import tolerance


def _profile(tmp_path: Path, table: str) -> Path:
    text = Path(load_target("host").path).read_text().split("[budgets]")[0]
    path = tmp_path / "host.toml"
    path.write_text(text.rstrip() + "\n\n[budgets]\n" + table + "\n")
    return path


@pytest.mark.parametrize("table, message", [
    ("decode_ms = 5", r"host\.toml: budgets\.decode_ms is not a known budget; known: decode_ms_p90"),
    ("decode_ms_p90 = -1", r"host\.toml: budgets\.decode_ms_p90 must be a positive number \(ms\), got -1"),
    ("peak_rss_mib = \"lots\"", r"host\.toml: budgets\.peak_rss_mib must be a positive number"),
    ("context_growth = 0.5", r"host\.toml: budgets\.context_growth is a ratio and must be >= 1"),
])
def test_budget_errors_name_the_file_and_field(tmp_path, table, message):
    with pytest.raises(TargetError, match=message):
        load_target_file(_profile(tmp_path, table))


def test_every_profile_has_valid_budgets():
    for name in target_names():
        budgets = load_target(name).budgets
        assert budgets and set(budgets) <= set(BUDGET_KEYS), name


def _row(name: str, p90: float, state: int) -> dict:
    return {"name": name, "decode": [{"context": 8, "median_ms": p90 / 2, "p90_ms": p90, "peak_rss_bytes": 2**20}],
            "state_bytes": state, "artifact_bytes": 2**20, "on_device": True}


def test_device_figures_are_checked_only_on_the_device():
    budgets = {"decode_ms_p90": 1.0, "state_kib": 1.0}
    on = {(v.budget, v.status) for v in check([_row("onnx", 5.0, 512)], budgets, True, "host")}
    assert on == {("decode_ms_p90", "fail"), ("state_kib", "pass")}
    off = {(v.budget, v.status) for v in check([_row("onnx", 5.0, 4096)], budgets, False, "android-arm64")}
    assert off == {("decode_ms_p90", "not-on-device"), ("state_kib", "fail")}


def test_roofline_counts_a_tied_embedding_once_and_an_untied_one_as_a_row():
    tied = LM(LMConfig(vocab_size=300, d_model=16, n_layers=1, tie_embeddings=True))
    untied = LM(LMConfig(vocab_size=300, d_model=16, n_layers=1, tie_embeddings=False))
    nbytes = lambda m: 4 * sum(p.numel() for p in m.parameters())  # noqa: E731 (parameters() dedups tied ones)
    assert weight_bytes_per_token(tied, tied.embed, tied.head) == nbytes(tied)
    assert weight_bytes_per_token(untied, untied.embed, untied.head) == nbytes(untied) - 4 * 16 * 299


def _causal_reference(model: KVCacheTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """Full-sequence causal attention with the baseline's weights. tokens: (T,) -> logits (T, V)."""
    x = model.embed(tokens)  # (T, D)
    for blk in model.blocks:
        q, k, v = blk.qkv(blk.norm1(x)).view(len(tokens), 3, blk.n_heads, blk.dh).permute(1, 2, 0, 3)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (H, T, Dh)
        x = x + blk.proj(att.transpose(0, 1).reshape(len(tokens), -1))
        x = x + blk.mlp(blk.norm2(x))
    return model.head(model.norm(x))


def test_the_baseline_decodes_like_causal_attention():
    model = KVCacheTransformer(vocab=97, d=128, n_layers=2, mlp_hidden=64)
    tokens = torch.randint(0, 97, (12,))
    cache = model.new_cache(len(tokens))
    steps = torch.cat([model.step(tokens[i:i + 1], cache, i) for i in range(len(tokens))])
    with torch.no_grad():
        ref = _causal_reference(model, tokens)
    assert ((steps - ref).abs().max() / ref.abs().max()).item() <= tolerance("fp32").max_rel


def test_the_baseline_matches_the_parameter_count():
    cfg = LMConfig(vocab_size=256, d_model=64, n_layers=2, mixer="mamba", mlp_ratio=0)
    lm = LM(cfg)
    n = sum(p.numel() for p in lm.parameters())
    base = baseline_for(cfg.to_dict(), n)
    assert abs(sum(p.numel() for p in base.parameters()) - n) <= cfg.n_layers * (2 * 64 + 1)  # h rounds
    assert matched_mlp_hidden(4 * 64 * 64, 64) == 0  # attention alone already has the budget: no MLP


class _ContextClock(Session):
    """A fake session whose step takes 1 ms of fake time, plus 9 ms while the machine is 'busy': `busy(i)` of the
    i-th step ever run. Its state counts the tokens seen, so the test can see which context each step ran at."""

    runtime = "fake"

    def __init__(self, busy) -> None:
        super().__init__(ProgramInfo(StateSpec((StateSlot("n", (1,)),)), vocab_size=8, prefill_len=4))
        self.now, self.busy, self.seen = 0.0, busy, []

    def _run(self, method, inputs):
        tokens, (n,) = inputs[0], inputs[1:]
        if method == "step":
            self.now += 1e-3 + (9e-3 if self.busy(len(self.seen)) else 0.0)
            self.seen.append(int(n[0]))
        return [np.zeros((1, 8), np.float32), n + tokens.shape[-1] if method == "prefill" else n + 1]


@pytest.mark.parametrize("busy", [lambda i: i < 40, lambda i: i // 8 % 3 == 0],
                         ids=["slow start", "slow spells every 24 steps"])
def test_decode_goes_round_the_contexts_step_by_step(monkeypatch, busy):
    """Every context samples the same moments of the machine: measured one context after the other, a slow start
    would make context 100 look 10x slower than context 400, and spells would land on whichever context ran then."""
    sess = _ContextClock(busy)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: sess.now)
    rows = measure.decode_vs_context(sess, 8, [100, 200, 300, 400], steps=16, progress=lambda m: None)
    assert [r["n"] for r in rows] == [16] * 4
    timed = [n // 100 for n in sess.seen[4 * measure.WARMUP:]]
    assert timed == [1, 2, 3, 4] * 16
    medians = [r["median_ms"] for r in rows]
    assert max(medians) / min(medians) <= 1.05, medians
    assert measure.growth(rows)["latency"] == 1.0


@pytest.mark.parametrize(("head", "tied"), [("int8", True), ("fp32", True), ("int8", False)])
def test_a_quantized_artifact_is_bounded_by_its_own_weight_bytes(head, tied):
    """A quantized file's bytes, less the fp32 embedding but one row (unless an fp32 tied head reads it whole)."""
    model = LM(LMConfig(vocab_size=256, d_model=32, n_layers=1, mixer="retnet", tie_embeddings=tied))
    roof = roofline(model, 1000, 10.0)
    embed = 256 * 32 * 4
    q = artifact_roofline(roof, {"scheme": "int8", "weight_bytes": 50_000, "policy": {"head": head}}, model)
    read = 50_000 if (tied and head == "fp32") else 50_000 - embed + 32 * 4
    assert q["weight_bytes_per_token"] == read and q["bytes_per_token"] == read + 2000
    assert q["decode_upper_bound_tok_s"] == round(10e9 / (read + 2000), 2)
    assert artifact_roofline(roof, {"scheme": "fp32", "weight_bytes": 50_000}, model) is None
    # one file per method (ONNX): the step reads its own graph's weights, not the sum over both graphs
    per_method = {"scheme": "int8", "weight_bytes": 100_000, "policy": {"head": head},
                  "methods": {"step": {"weight_bytes": 50_000}, "prefill": {"weight_bytes": 50_000}}}
    assert artifact_roofline(roof, per_method, model)["weight_bytes_per_token"] == read


@pytest.mark.parametrize("head", ["int8", "fp32"])
def test_a_quantized_embedding_is_read_one_row_of_its_own_bytes(head):
    """A quantized table (int8 rows + a scale each: 256 x 36 bytes) is read one row; an fp32 tied head still reads
    the fp32 table the file holds besides it."""
    model = LM(LMConfig(vocab_size=256, d_model=32, n_layers=1, mixer="retnet"))
    roof = roofline(model, 1000, 10.0)
    quant = {"scheme": "int8", "weight_bytes": 50_000, "embedding_bytes": 256 * 36, "policy": {"head": head},
             "embedding": {"bits": 8, "group": 0}}
    assert artifact_roofline(roof, quant, model)["weight_bytes_per_token"] == 50_000 - 256 * 36 + 36


def test_the_bandwidth_probe_runs_on_as_many_threads_as_the_runtimes():
    from afedge.bench.roofline import measure_bandwidth
    one, two = measure_bandwidth(8, 1), measure_bandwidth(8, 1, threads=2)
    assert "1 thread," in one["method"] and "2 threads" in two["method"]
    assert one["gb_s"] > 0 and two["gb_s"] > 0
