"""`mamba` (MambaForCausalLM) and `falcon_mamba` (FalconMambaForCausalLM) onto the afedge `mamba` mixer.

    backbone.embeddings -> embed        backbone.layers.N.norm  -> blocks.N.norm1 (RMSNorm, eps from the config)
    backbone.norm_f     -> norm         backbone.layers.N.mixer -> blocks.N.mixer (HF MambaMixer names, 1:1)
    lm_head             -> head

FalconMamba's weightless RMS norms on dt, B and C are the mixer's `bcdt_rms_eps` (its `mixer_rms_eps`).
"""
from __future__ import annotations

from typing import Any

from afedge.hf.importers import Importer, register, require, whole
from afedge.model import LMConfig

LAYOUT = (
    (r"backbone\.embeddings\.weight", "embed.weight"),
    (r"backbone\.layers\.(\d+)\.norm\.weight", r"blocks.\1.norm1.weight"),
    (r"backbone\.layers\.(\d+)\.mixer\.(.+)", r"blocks.\1.mixer.\2"),
    (r"backbone\.norm_f\.weight", "norm.weight"),
    (r"lm_head\.weight", "head.weight"),
)


@register
class MambaImporter(Importer):
    model_type = "mamba"
    rules = LAYOUT

    def mixer_kwargs(self, cfg: Any) -> dict:
        """The checkpoint's shape, and the sequential in-chunk scan: at published sizes (d_inner >= 1536) its prefill
        is 4x the segment-sum form's under ONNX Runtime (benchmarks/prefill_sweep.py; same math, same weights)."""
        return {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": whole(cfg, "expand"),
                "dt_rank": int(cfg.time_step_rank), "conv_bias": bool(cfg.use_conv_bias), "bias": bool(cfg.use_bias),
                "scan": "sequential"}

    def lm_config(self, cfg: Any) -> LMConfig:
        require(cfg, cfg.hidden_act == "silu", "hidden_act", "the afedge mamba mixer uses silu")
        return LMConfig(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                        mixer="mamba", mixer_kwargs=self.mixer_kwargs(cfg), mlp_ratio=0, norm="rmsnorm",
                        norm_eps=float(cfg.layer_norm_epsilon), tie_embeddings=bool(cfg.tie_word_embeddings))


@register
class FalconMambaImporter(MambaImporter):
    model_type = "falcon_mamba"

    def mixer_kwargs(self, cfg: Any) -> dict:
        return super().mixer_kwargs(cfg) | {"bcdt_rms_eps": float(cfg.mixer_rms_eps)}
