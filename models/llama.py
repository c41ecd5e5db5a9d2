"""LLaMA family (LLaMA 1-3 without rope scaling, Mistral, SmolLM2): config and weights.

Grouped-query attention, RMSNorm, SwiGLU, rotary over half-split pairs, tied or
untied LM head. `get(name, shape)` returns a float32 numpy array in Hugging
Face's layout and names (the GGUF importer renames and un-permutes into them).
"""

from __future__ import annotations

import numpy as np

from models.config import ModelConfig
from models.gpt import TensorGetter, _count, _eos_ids, _real
from models.layers import AttentionWeights, MlpWeights, NormWeights
from models.transformer import LayerWeights, Params


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise ValueError(f"llama: rope scaling rope_type={kind!r} is unsupported (default only)")
    if "rope_theta" in rope:
        return _real(rope, "rope_theta", 10000.0)
    return _real(hf, "rope_theta", 10000.0)


def llama_config(hf: dict) -> ModelConfig:
    if hf.get("mlp_bias"):
        raise ValueError("llama: mlp_bias=True is unsupported")
    if (act := hf.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"llama: hidden_act={act!r} is unsupported (silu only)")
    d, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
    max_positions = _count(hf, "max_position_embeddings", 2048)
    # Mistral's sliding window: up to the window every key is in it, so capping the sequence
    # length there keeps us exact without a windowed mask.
    window = hf.get("sliding_window")
    if window is not None:
        max_positions = min(max_positions, _count(hf, "sliding_window"))
    return ModelConfig(
        family="llama",
        vocab_size=_count(hf, "vocab_size"),
        d_model=d,
        n_layers=_count(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=_count(hf, "num_key_value_heads", heads),
        head_dim=_count(hf, "head_dim", d // heads),
        d_ff=_count(hf, "intermediate_size"),
        max_positions=max_positions,
        norm="rmsnorm",
        norm_eps=_real(hf, "rms_norm_eps", 1e-6),
        positions="rope_half",
        rope_theta=_rope_theta(hf),
        gated_mlp=True,
        activation="silu",
        attention_bias=bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def llama_params(get: TensorGetter, cfg: ModelConfig) -> Params:
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    h, k = cfg.n_heads, cfg.n_kv_heads

    def linear(name: str, out_dim: int, in_dim: int) -> np.ndarray:
        return get(name, (out_dim, in_dim)).T  # torch Linear (out, in) -> (in, out)

    def bias(name: str, *shape: int) -> np.ndarray | None:
        return get(name, (int(np.prod(shape)),)).reshape(shape) if cfg.attention_bias else None

    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        attn = AttentionWeights(
            wq=linear(f"{a}.q_proj.weight", h * e, d).reshape(d, h, e),
            wk=linear(f"{a}.k_proj.weight", k * e, d).reshape(d, k, e),
            wv=linear(f"{a}.v_proj.weight", k * e, d).reshape(d, k, e),
            wo=linear(f"{a}.o_proj.weight", d, h * e).reshape(h, e, d),
            bq=bias(f"{a}.q_proj.bias", h, e),
            bk=bias(f"{a}.k_proj.bias", k, e),
            bv=bias(f"{a}.v_proj.bias", k, e),
            bo=bias(f"{a}.o_proj.bias", d),
        )
        m = f"{p}.mlp"
        mlp = MlpWeights(
            w_gate=linear(f"{m}.gate_proj.weight", f, d),
            w_in=linear(f"{m}.up_proj.weight", f, d),
            w_out=linear(f"{m}.down_proj.weight", d, f),
        )
        layers.append(LayerWeights(
            attn_norm=NormWeights(get(f"{p}.input_layernorm.weight", (d,))), attn=attn,
            mlp_norm=NormWeights(get(f"{p}.post_attention_layernorm.weight", (d,))), mlp=mlp,
        ))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, d))
    head = embed if cfg.tie_embeddings else get("lm_head.weight", (cfg.vocab_size, d))
    return Params(
        embed=embed,
        layers=layers,
        final_norm=NormWeights(get("model.norm.weight", (d,))),
        lm_head=np.ascontiguousarray(head.T),
    )
