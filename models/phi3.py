"""Phi-3 (Phi3ForCausalLM): LLaMA-shaped layers whose checkpoint fuses q, k and v into one
`qkv_proj` and gate and up into one `gate_up_proj`; its rotary may turn only a prefix of each
head (`partial_rotary_factor`, Phi-4-mini). The fused tensors are split into LLaMA's names, and
`llama_params` loads the rest.
"""

from __future__ import annotations

import re

from models.config import LayerSpec, ModelConfig
from models.gpt import TensorGetter, _count
from models.lazy import LazyTensor
from models.llama import hf_rope, llama_fields, llama_params, swiglu
from models.transformer import Params


def phi3_config(hf: dict) -> ModelConfig:
    def layer(head_dim: int) -> LayerSpec:
        return swiglu(hf, "phi3", hf_rope(hf, "phi3", head_dim))

    fields = llama_fields(hf, "phi3", layer)
    # Phi-3's sliding window covers every layer: up to the window every key is in it, so capping
    # the sequence length there keeps us exact without a windowed mask (as for Mistral).
    if hf.get("sliding_window") is not None:
        fields["max_positions"] = min(fields["max_positions"], _count(hf, "sliding_window"))
    return ModelConfig(**fields)


def phi3_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    q, kv = cfg.n_heads * e, cfg.n_kv_heads * e
    # LLaMA's name -> (the fused tensor, its rows, the part's first row, the part's rows).
    parts = {
        "self_attn.q_proj.weight": ("self_attn.qkv_proj.weight", q + 2 * kv, 0, q),
        "self_attn.k_proj.weight": ("self_attn.qkv_proj.weight", q + 2 * kv, q, kv),
        "self_attn.v_proj.weight": ("self_attn.qkv_proj.weight", q + 2 * kv, q + kv, kv),
        "mlp.gate_proj.weight": ("mlp.gate_up_proj.weight", 2 * f, 0, f),
        "mlp.up_proj.weight": ("mlp.gate_up_proj.weight", 2 * f, f, f),
    }

    def split_get(name: str, shape: tuple[int, ...]) -> LazyTensor:
        match = re.fullmatch(r"(model\.layers\.\d+)\.(.+)", name)
        if match is None or match[2] not in parts:
            return get(name, shape)
        fused, rows, first, count = parts[match[2]]
        return get(f"{match[1]}.{fused}", (rows, d))[first : first + count]

    return llama_params(split_get, cfg)
