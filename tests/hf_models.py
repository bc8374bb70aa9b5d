"""Tiny random Hugging Face checkpoints, built with transformers' own classes and saved like a hub download."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96


def hf_config(model_type: str):
    """A tiny config of each supported type, off the defaults where that exercises a code path."""
    import transformers as tf
    match model_type:
        case "mamba":  # conv_kernel 3, explicit dt rank, biases on, tied head
            return tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=3,
                                  expand=2, time_step_rank=4, use_bias=True, use_conv_bias=True)
        case "falcon_mamba":  # B/C/dt RMS norms, untied head
            return tf.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2,
                                        expand=2, mixer_rms_eps=1e-6, tie_word_embeddings=False)
        case "mamba2":  # 8 heads in 2 groups, a finite dt clamp
            return tf.Mamba2Config(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                   head_dim=8, num_heads=8, n_groups=2, chunk_size=16, time_step_limit=(0.0, 0.05))
        case "rwkv":  # 3 blocks halving the residual after each (rescale_every=1), pre_ln on block 0
            return tf.RwkvConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, attention_hidden_size=32,
                                 intermediate_size=96, context_length=128, rescale_every=1)
    raise ValueError(model_type)


def hf_model(model_type: str, seed: int = 0):
    """A random causal LM whose every parameter is perturbed (HF initialises norms, D, A_log to constants)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def word_tokenizer(n: int = VOCAB - 16):
    """A `tokenizers` word-level tokenizer with n ids ("[UNK]", "w1", ...): fewer than the embedding rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, n)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def save_hf_dir(model, directory: Path, weights: str = "safetensors") -> Path:
    """save_pretrained (safetensors) or config + torch.save'd pytorch_model.bin, plus a tokenizer.json."""
    if weights == "safetensors":
        model.save_pretrained(directory)
    else:
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    word_tokenizer().save(str(directory / "tokenizer.json"))
    return directory
