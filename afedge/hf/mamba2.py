"""`mamba2` (Mamba2ForCausalLM) onto the afedge `mamba2` mixer: the same layout as `mamba` (backbone.layers.N.norm
-> blocks.N.norm1, .mixer -> .mixer, norm_f -> norm, lm_head -> head). The mixer's gated RMSNorm (`mixer.norm`,
gate applied before the norm, over n_groups groups) and its in_proj split (z, xBC, dt) are HF's, so keys map 1:1.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from afedge.hf.importers import Importer, register, require, whole
from afedge.hf.mamba import LAYOUT
from afedge.model import LMConfig

# HF's default time_step_limit (0, inf) is "no clamp"; a finite lower bound with an infinite upper one is kept as
# the fp32 maximum, which clamps no finite fp32 value and keeps the config plain JSON (no Infinity).
_NO_LIMIT = (0.0, math.inf)


@register
class Mamba2Importer(Importer):
    model_type = "mamba2"
    rules = LAYOUT

    def lm_config(self, cfg: Any) -> LMConfig:
        expand = whole(cfg, "expand")
        require(cfg, cfg.hidden_act == "silu", "hidden_act", "the afedge mamba2 mixer uses silu")
        require(cfg, cfg.num_heads * cfg.head_dim == expand * cfg.hidden_size, "num_heads",
                f"num_heads * head_dim must equal expand * hidden_size = {expand * cfg.hidden_size}")
        kw = {"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": expand, "head_dim": cfg.head_dim,
              "n_groups": cfg.n_groups, "conv_bias": bool(cfg.use_conv_bias), "bias": bool(cfg.use_bias),
              "norm_eps": float(cfg.layer_norm_epsilon)}
        limit = tuple(float(v) for v in cfg.time_step_limit)
        if limit != _NO_LIMIT:
            kw["dt_limit"] = [min(v, torch.finfo(torch.float32).max) for v in limit]
        return LMConfig(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                        mixer="mamba2", mixer_kwargs=kw, mlp_ratio=0, norm="rmsnorm",
                        norm_eps=float(cfg.layer_norm_epsilon), tie_embeddings=bool(cfg.tie_word_embeddings))
