"""Qwen2 / Qwen2.5 and Qwen3: LLaMA-shaped, so their weights load by `llama_params`.

Qwen2 adds biases to the q, k and v projections (not to the output's); Qwen3
instead normalizes each head's q and k (RMSNorm over head_dim, before the
rotary) and takes head_dim from its config (128 when absent, as transformers).
"""

from __future__ import annotations

import dataclasses

from models.config import LayerSpec, ModelConfig
from models.gpt import _count
from models.llama import hf_layer_types, hf_rope, llama_fields, swiglu


def _with_windows(hf: dict, family: str, layer: LayerSpec, n_layers: int) -> tuple[LayerSpec, ...]:
    """Sliding-window layers as transformers assigns them: a layer slides when its layer_types
    entry says so (by default, from max_window_layers on) and use_sliding_window is set; without
    it, sliding_window is dropped and every layer attends globally."""
    window = _count(hf, "sliding_window", 4096) if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf_layer_types(hf, family, n_layers, [
        "sliding_attention" if window is not None and i >= first else "full_attention"
        for i in range(n_layers)])
    sliding = dataclasses.replace(layer, attention="sliding", window=window) if window else layer
    return tuple(sliding if kind == "sliding_attention" else layer for kind in types)


def qwen2_config(hf: dict) -> ModelConfig:
    def layer(head_dim: int) -> LayerSpec:
        return swiglu(hf, "qwen2", hf_rope(hf, "qwen2", head_dim))

    fields = llama_fields(hf, "qwen2", layer)
    fields["layers"] = _with_windows(hf, "qwen2", fields["layers"][0], len(fields["layers"]))
    return ModelConfig(**fields, qkv_bias=True)


def qwen3_config(hf: dict) -> ModelConfig:
    def layer(head_dim: int) -> LayerSpec:
        return dataclasses.replace(swiglu(hf, "qwen3", hf_rope(hf, "qwen3", head_dim)),
                                   qk_norm=True)

    bias = bool(hf.get("attention_bias", False))
    fields = llama_fields(hf, "qwen3", layer, default_head_dim=128)
    fields["layers"] = _with_windows(hf, "qwen3", fields["layers"][0], len(fields["layers"]))
    return ModelConfig(**fields, qkv_bias=bias, out_bias=bias)
