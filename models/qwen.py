"""Qwen2 / Qwen2.5 and Qwen3: LLaMA-shaped, so their weights load by `llama_params`.

Qwen2 adds biases to the q, k and v projections (not to the output's); Qwen3
instead normalizes each head's q and k (RMSNorm over head_dim, before the
rotary) and takes head_dim from its config (128 when absent, as transformers).
"""

from __future__ import annotations

import dataclasses

from models.config import LayerSpec, ModelConfig, Moe
from models.gpt import _count
from models.llama import hf_layer_types, hf_rope, llama_fields, swiglu


def _with_windows(hf: dict, family: str, layers: tuple[LayerSpec, ...]) -> tuple[LayerSpec, ...]:
    """Sliding-window layers as transformers assigns them: a layer slides when its layer_types
    entry says so (by default, from max_window_layers on) and use_sliding_window is set; without
    it, sliding_window is dropped and every layer attends globally."""
    window = _count(hf, "sliding_window", 4096) if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", 28)
    types = hf_layer_types(hf, family, len(layers), [
        "sliding_attention" if window is not None and i >= first else "full_attention"
        for i in range(len(layers))])
    return tuple(
        dataclasses.replace(layer, attention="sliding", window=window)
        if window is not None and kind == "sliding_attention" else layer
        for layer, kind in zip(layers, types)
    )


def qwen2_config(hf: dict) -> ModelConfig:
    def layer(head_dim: int) -> LayerSpec:
        return swiglu(hf, "qwen2", hf_rope(hf, "qwen2", head_dim))

    fields = llama_fields(hf, "qwen2", layer)
    fields["layers"] = _with_windows(hf, "qwen2", fields["layers"])
    return ModelConfig(**fields, qkv_bias=True)


def qwen3_config(hf: dict, family: str = "qwen3") -> ModelConfig:
    def layer(head_dim: int) -> LayerSpec:
        return dataclasses.replace(swiglu(hf, family, hf_rope(hf, family, head_dim)),
                                   qk_norm=True)

    bias = bool(hf.get("attention_bias", False))
    fields = llama_fields(hf, family, layer, default_head_dim=128)
    fields["layers"] = _with_windows(hf, family, fields["layers"])
    return ModelConfig(**fields, qkv_bias=bias, out_bias=bias)


def qwen3_moe_config(hf: dict) -> ModelConfig:
    """Qwen3's attention; a layer's MLP is a mixture of experts unless it is listed in
    mlp_only_layers or off the decoder_sparse_step grid (then a dense one of intermediate_size)."""
    cfg = qwen3_config(hf, "qwen3_moe")
    moe = Moe(
        n_experts=_count(hf, "num_experts") if "num_experts" in hf else _count(hf, "num_local_experts"),
        top_k=_count(hf, "num_experts_per_tok"), d_ff=_count(hf, "moe_intermediate_size"),
        normalize=bool(hf.get("norm_topk_prob", False)),
    )
    dense_only, step = hf.get("mlp_only_layers") or [], _count(hf, "decoder_sparse_step", 1)
    return cfg.replace(layers=tuple(
        layer if i in dense_only or (i + 1) % step else dataclasses.replace(layer, moe=moe)
        for i, layer in enumerate(cfg.layers)
    ))
