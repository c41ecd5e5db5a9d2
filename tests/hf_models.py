"""Tiny random Hugging Face models (torch), saved with save_pretrained: the parity references."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 256

# The LLaMA-shaped families share one tiny shape (grouped-query attention, untied head).
LLAMA_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
LLAMA_SHAPED = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    # head_dim 24 is not hidden_size / heads (16): it must come from the config.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    # Sliding windows of 8 on every second layer (tests run prompts past them), head_dim 24
    # and query_pre_attn_scalar 20 (neither hidden_size / heads); eager attention is the
    # reference transformers computes Gemma's soft-capping in.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=8, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True, attn_implementation="eager")),
    # Gemma 3: local layers' own base; the global ones' is linearly scaled.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=24, query_pre_attn_scalar=20, sliding_window=8, tie_word_embeddings=True,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="eager",
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1_000_000.0}})),
    # 16 experts, two per token: a step runs only the experts its tokens chose. Qwen3-MoE's
    # layer 1 is dense (mlp_only_layers), its top two are not renormalized.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        intermediate_size=32, num_local_experts=16, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, moe_intermediate_size=24, num_experts=16, num_experts_per_tok=2,
        mlp_only_layers=[1], norm_topk_prob=False)),
    # Phi-4-mini's partial rotary: half of each head turns.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5))),
}


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
    elif family == "gpt_neox":  # rotary on 4 of 16 dims (rotary_pct 0.25), parallel residual
        config = transformers.GPTNeoXConfig(**{
            "vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128, "max_position_embeddings": 128, "bos_token_id": 0,
            "eos_token_id": VOCAB - 1, **overrides,
        })
        model = transformers.GPTNeoXForCausalLM(config)
    elif family in LLAMA_SHAPED:
        config_name, model_name, fields = LLAMA_SHAPED[family]
        config = getattr(transformers, config_name)(**{**LLAMA_SHAPE, **fields, **overrides})
        model = getattr(transformers, model_name)(config)
    else:
        raise ValueError(family)
    # Default init is tiny; larger weights make the logits (and the test) sharper. Norm scales
    # move away from their init of 1, so a norm read from the wrong tensor shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = p.dim() == 1 and ("ln" in name or "norm" in name) and "weight" in name
            p.normal_(1.0 if is_norm_scale else 0.0, 0.02 if p.dim() == 1 else 0.08)
    model.eval()
    model.save_pretrained(directory)
    return model
