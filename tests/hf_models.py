"""Tiny random Hugging Face models (torch), saved with save_pretrained: the parity references."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 256


def make_hf_model(family: str, directory: Path, seed: int = 0, **overrides):
    """Build, save (safetensors) and return a tiny random HF causal LM of `family`."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
            bos_token_id=0, eos_token_id=VOCAB - 1, **overrides,
        )
        model = transformers.GPT2LMHeadModel(config)
    elif family == "gptj":
        config = transformers.GPTJConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
            bos_token_id=0, eos_token_id=VOCAB - 1, **overrides,
        )
        model = transformers.GPTJForCausalLM(config)
    elif family == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, **overrides,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        raise ValueError(family)
    # Default init is tiny; larger weights make the logits (and the test) sharper.
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and "weight" in name
            p.normal_(1.0 if is_norm_scale else 0.0, 0.02 if p.dim() == 1 else 0.08)
    model.eval()
    model.save_pretrained(directory)
    return model
