"""Qwen2 / Qwen2.5 and Qwen3: LLaMA-shaped, so their weights load by `llama_params`.

Qwen2 adds biases to the q, k and v projections (not to the output's); Qwen3
instead normalizes each head's q and k (RMSNorm over head_dim, before the
rotary) and takes head_dim from its config (128 when absent, as transformers).
"""

from __future__ import annotations

from models.config import LayerSpec, ModelConfig
from models.llama import hf_rope, llama_fields


def _check_full_attention(hf: dict, family: str) -> None:
    """Sliding-window layers, as transformers assigns them (layer_types, or use_sliding_window
    from max_window_layers on), are refused until the windowed mask lands."""
    windowed = [i for i, kind in enumerate(hf.get("layer_types") or []) if kind != "full_attention"]
    if hf.get("use_sliding_window") or windowed:
        raise ValueError(f"{family}: use_sliding_window={hf.get('use_sliding_window')!r}, "
                         f"layer_types with sliding layers {windowed}: sliding-window attention "
                         "is unsupported (full attention only)")


def qwen2_config(hf: dict) -> ModelConfig:
    _check_full_attention(hf, "qwen2")
    def layer(head_dim: int) -> LayerSpec:
        return LayerSpec(rope=hf_rope(hf, "qwen2", head_dim), mlp="gated", activation="silu")

    return ModelConfig(**llama_fields(hf, "qwen2", layer), qkv_bias=True)


def qwen3_config(hf: dict) -> ModelConfig:
    _check_full_attention(hf, "qwen3")
    def layer(head_dim: int) -> LayerSpec:
        return LayerSpec(rope=hf_rope(hf, "qwen3", head_dim), mlp="gated", activation="silu",
                         qk_norm=True)

    bias = bool(hf.get("attention_bias", False))
    fields = llama_fields(hf, "qwen3", layer, default_head_dim=128)
    return ModelConfig(**fields, qkv_bias=bias, out_bias=bias)
