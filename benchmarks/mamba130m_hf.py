"""Write a Hugging Face `mamba` checkpoint at the mamba-130m shape with random weights (no download needed).

    .venv/bin/python benchmarks/mamba130m_hf.py DIR        # ~0.5 GB: config.json, model.safetensors, tokenizer.json
    .venv/bin/afedge export --model DIR --target host       # then `afedge bench` (README "Performance")

transformers' own `MambaForCausalLM` (vocab 50280, d_model 768, 24 layers, d_state 16, conv 4, expand 2; 129.1M
parameters, seed 0), saved with `save_pretrained`; the tokenizer is afedge's byte-level one (ids 0..255).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="directory to write")
    args = ap.parse_args()
    import transformers

    from afedge.tokenizer import byte_tokenizer
    torch.manual_seed(0)
    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24,
                                   conv_kernel=4, expand=2)
    model = transformers.MambaForCausalLM(cfg).eval()
    model.save_pretrained(args.out)
    byte_tokenizer().save(str(args.out / "tokenizer.json"))
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
