"""Gemma 2 and Gemma 3 (text: Gemma2ForCausalLM, Gemma3ForCausalLM): config and weights.

LLaMA-shaped weights with Gemma's differences: RMSNorm scales by (1 + weight) (folded
into the weight at load, exact in float32), the embedding is scaled by sqrt(d_model),
a gelu-tanh gated MLP, norms after attention and after the MLP too, attention scaled
by query_pre_attn_scalar ** -0.5, optional soft-capping of the scores and of the
logits (Gemma 2), and per-layer attention: sliding-window layers between global ones
(`layer_types`). Gemma 3 also normalizes each head's q and k, and gives its sliding
and global layers their own rotary embeddings (local base 10000, global base 1e6,
possibly linearly scaled).
"""

from __future__ import annotations

import dataclasses
import math

from models.config import LayerSpec, ModelConfig, Rope
from models.gpt import TensorGetter, _count, _real
from models.layers import NormWeights
from models.lazy import LazyTensor
from models.llama import hf_layer_types, hf_rope, llama_fields, llama_params
from models.transformer import Params


def _rope(hf: dict, family: str, head_dim: int, kind: str) -> Rope:
    """One layer type's rotary embedding: transformers 5 nests rope_parameters by layer type;
    earlier Gemma 3 configs give the global layers rope_theta and rope_scaling and the
    sliding ones rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if kind in params:
        return hf_rope({**hf, "rope_parameters": params[kind]}, family, head_dim)
    if family == "gemma3" and kind == "sliding_attention":
        return Rope(theta=_real(hf, "rope_local_base_freq", 10000.0))
    default_theta = 1_000_000.0 if family == "gemma3" else 10000.0
    return hf_rope(hf, family, head_dim, default_theta=default_theta)


def _config(hf: dict, family: str, pattern: int) -> ModelConfig:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        raise ValueError(f"{family}: hidden_activation={act!r} is unsupported "
                         "(gelu_pytorch_tanh only)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"{family}: use_bidirectional_attention=True is unsupported (causal only)")
    if hf.get("attention_bias"):
        raise ValueError(f"{family}: attention_bias=True is unsupported")
    window = _count(hf, "sliding_window", 4096)
    n_layers = _count(hf, "num_hidden_layers")
    # Every `pattern`-th layer global, the others sliding, where layer_types is absent.
    types = hf_layer_types(hf, family, n_layers, [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)])
    fields = llama_fields(hf, family, lambda head_dim: LayerSpec(), default_head_dim=256)
    head_dim = fields["head_dim"]

    def layer(kind: str) -> LayerSpec:
        sliding = kind == "sliding_attention"
        return LayerSpec(
            rope=_rope(hf, family, head_dim, kind), mlp="gated", activation="gelu_tanh",
            attention="sliding" if sliding else "global", window=window if sliding else None,
            qk_norm=family == "gemma3", post_norms=True,
        )

    fields["layers"] = tuple(layer(kind) for kind in types)
    fields["tie_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    return ModelConfig(
        **fields,
        embed_scale=math.sqrt(fields["d_model"]),
        attention_scale=float(_count(hf, "query_pre_attn_scalar", 256)) ** -0.5,
        attention_softcap=_optional_float(hf, "attn_logit_softcapping"),
        final_softcap=_optional_float(hf, "final_logit_softcapping"),
    )


def _optional_float(hf: dict, key: str) -> float | None:
    value = hf.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or value <= 0):
        raise ValueError(f"{key}={value!r}: must be a positive number or null")
    return None if value is None else float(value)


def gemma2_config(hf: dict) -> ModelConfig:
    return _config(hf, "gemma2", pattern=2)


def gemma3_config(hf: dict) -> ModelConfig:
    return _config(hf, "gemma3", pattern=hf.get("sliding_window_pattern", 6))


def gemma_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d = cfg.d_model

    def norm_scale(name: str) -> LazyTensor:  # Gemma's RMSNorm: x * (1 + weight)
        size = cfg.head_dim if name.endswith(("q_norm.weight", "k_norm.weight")) else d
        return 1.0 + get(name, (size,))

    def llama_get(name: str, shape: tuple[int, ...]) -> LazyTensor:
        # LLaMA's post_attention_layernorm is the MLP's input norm: Gemma's pre_feedforward one.
        name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
        return norm_scale(name) if name.endswith("norm.weight") else get(name, shape)

    params = llama_params(llama_get, cfg)
    layers = [
        dataclasses.replace(
            layer,
            post_attn_norm=NormWeights(norm_scale(f"model.layers.{i}.post_attention_layernorm.weight")),
            post_mlp_norm=NormWeights(norm_scale(f"model.layers.{i}.post_feedforward_layernorm.weight")),
        )
        for i, layer in enumerate(params.layers)
    ]
    return dataclasses.replace(params, layers=layers)
