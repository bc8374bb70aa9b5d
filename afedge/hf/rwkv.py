"""`rwkv` (RwkvForCausalLM, RWKV-4) onto the afedge `rwkv4` mixer, which is a whole HF `RwkvBlock` minus its
residual adds (ln1, attention = time mixing, ln2, feed_forward = channel mixing):

    rwkv.embeddings     -> embed          rwkv.blocks.0.pre_ln -> embed_norm (LayerNorm on the embeddings)
    rwkv.blocks.N.*     -> blocks.N.mixer.* (1:1; the block adds no norm of its own: mixer_norm=False)
    rwkv.ln_out         -> norm           head -> head

Inference rescaling, exactly as transformers does it in eval mode: with `rescale_every` R > 0, block i's
attention.output and feed_forward.value weights are divided by 2 ** (i // R) and the residual stream is halved after
every R-th block (LMConfig.rescale_every). Powers of two, so the stored weights are exact; the reference checkpoint
of a bundle holds these inference-form weights.
"""
from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from afedge.hf.importers import Importer, register
from afedge.model import LMConfig

# transformers builds ln_out as nn.LayerNorm(hidden_size): torch's default eps, whatever layer_norm_epsilon says.
LN_OUT_EPS = 1e-5
_RESCALED = re.compile(r"blocks\.(\d+)\.mixer\.(attention\.output|feed_forward\.value)\.weight")


@register
class RwkvImporter(Importer):
    model_type = "rwkv"
    rules = (
        (r"rwkv\.embeddings\.weight", "embed.weight"),
        (r"rwkv\.blocks\.0\.pre_ln\.(weight|bias)", r"embed_norm.\1"),
        (r"rwkv\.blocks\.(\d+)\.((?:ln1|ln2|attention|feed_forward)\..+)", r"blocks.\1.mixer.\2"),
        (r"rwkv\.ln_out\.(weight|bias)", r"norm.\1"),
        (r"head\.weight", "head.weight"),
    )

    def lm_config(self, cfg: Any) -> LMConfig:
        eps = float(cfg.layer_norm_epsilon)
        return LMConfig(vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
                        mixer="rwkv4", mixer_kwargs={"attention_size": cfg.attention_hidden_size,
                                                     "intermediate_size": cfg.intermediate_size, "eps": eps},
                        mlp_ratio=0, norm="layernorm", norm_eps=eps, final_norm_eps=LN_OUT_EPS, embed_norm=True,
                        mixer_norm=False, rescale_every=max(int(cfg.rescale_every), 0),
                        tie_embeddings=bool(cfg.tie_word_embeddings))

    def convert(self, state: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
        out = super().convert(state, cfg)
        r = max(int(cfg.rescale_every), 0)
        if r:
            for k, v in out.items():
                if m := _RESCALED.fullmatch(k):
                    out[k] = v / 2 ** (int(m[1]) // r)
        return out
