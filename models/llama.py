"""LLaMA family (LLaMA 1-3.x, Mistral, SmolLM2; the Qwen files reuse it): config and weights.

Grouped-query attention, RMSNorm, SwiGLU, rotary over half-split pairs (scaled
as transformers scales it: linear, llama3, yarn), tied or untied LM head.
`get(name, shape)` returns a tensor (`models.lazy.LazyTensor`) in Hugging Face's layout
and names (the GGUF importer renames and un-permutes into them).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from models.config import LayerSpec, ModelConfig, Moe, Rope
from models.gpt import TensorGetter, _count, _eos_ids, _real
from models.layers import AttentionWeights, ExpertWeights, MlpWeights, NormWeights
from models.lazy import LazyTensor
from models.transformer import LayerWeights, Params

# Scalings whose frequencies change with the length of the sequence a forward pass sees
# (transformers' `dynamic_rope_update`): a key cached at one length was turned with other
# frequencies than a later step uses, so no slot cache reproduces them.
_LENGTH_DEPENDENT = ("dynamic", "longrope")


def _rope_field(rope: dict, key: str, family: str, kind: str) -> float:
    if rope.get(key) is None:
        raise ValueError(f"{family}: rope scaling rope_type={kind!r} needs {key}")
    return rope[key]


def hf_rope(
    hf: dict, family: str, head_dim: int, default_theta: float = 10000.0,
    default_fraction: float = 1.0,
) -> Rope:
    """The rotary embedding transformers builds from config.json: `rope_parameters`
    (transformers 5) or `rope_scaling` with top-level `rope_theta` and `partial_rotary_factor`
    (earlier versions); a family without them in its config passes its defaults."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = _real(rope if rope.get("rope_theta") is not None else hf, "rope_theta", default_theta)
    fraction = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_fraction))
    dims = int(head_dim * fraction)  # as transformers rounds it
    if dims % 2 or not 2 <= dims <= head_dim:
        raise ValueError(f"{family}: partial_rotary_factor={fraction!r} turns {dims} of "
                         f"head_dim={head_dim} dims: must be an even count in [2, head_dim]")
    dims = None if dims == head_dim else dims
    if kind in _LENGTH_DEPENDENT:
        raise ValueError(
            f"{family}: rope scaling rope_type={kind!r} is unsupported: its frequencies depend on "
            "the longest sequence each forward pass sees, which a slot cache cannot reproduce "
            "(supported: default, linear, llama3, yarn)")
    if kind == "default":
        return Rope(theta=theta, dims=dims)
    if kind not in ("linear", "llama3", "yarn"):
        raise ValueError(f"{family}: rope scaling rope_type={kind!r} is unsupported "
                         "(supported: default, linear, llama3, yarn)")
    # As transformers' standardize_rope_params: a top-level value (Phi-3) wins, then the
    # rope dict's, then max_position_embeddings.
    if hf.get("original_max_position_embeddings") is not None:
        original = _count(hf, "original_max_position_embeddings")
    elif rope.get("original_max_position_embeddings") is not None:
        original = _count(rope, "original_max_position_embeddings")
    else:
        original = _count(hf, "max_position_embeddings", 2048)
    factor = rope.get("factor")
    if kind == "yarn" and factor is None:  # DeepSeek's convention, as transformers reads it
        factor = _count(hf, "max_position_embeddings", 2048) / original
    if factor is None:
        raise ValueError(f"{family}: rope scaling rope_type={kind!r} needs factor")
    factor = float(factor)
    if kind == "linear":
        return Rope(theta=theta, dims=dims, scaling="linear", factor=factor)
    if kind == "llama3":
        return Rope(
            theta=theta, dims=dims, scaling="llama3", factor=factor, original_max_positions=original,
            low_freq_factor=float(_rope_field(rope, "low_freq_factor", family, kind)),
            high_freq_factor=float(_rope_field(rope, "high_freq_factor", family, kind)),
        )
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:  # transformers' yarn_get_mscale, as the YaRN paper's eq. 21

        def mscale(m: float = 1.0) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return Rope(
        theta=theta, dims=dims, scaling="yarn", factor=factor, original_max_positions=original,
        beta_fast=float(rope.get("beta_fast") or 32.0), beta_slow=float(rope.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor), truncate=bool(rope.get("truncate", True)),
    )


LAYER_TYPES = ("full_attention", "sliding_attention")


def hf_layer_types(hf: dict, family: str, n_layers: int, default: list[str]) -> list[str]:
    """Each layer's attention kind as transformers reads it: config.json's layer_types, else
    the family's `default` (derived from its older fields)."""
    types = hf.get("layer_types") or default
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ValueError(f"{family}: layer_types={types!r}: must list num_hidden_layers="
                         f"{n_layers} of {LAYER_TYPES}")
    return types


def swiglu(hf: dict, family: str, rope: Rope) -> LayerSpec:
    """The LLaMA-shaped families' layer: SwiGLU MLP (only silu: others are refused)."""
    if (act := hf.get("hidden_act", "silu")) != "silu":
        raise ValueError(f"{family}: hidden_act={act!r} is unsupported (silu only)")
    return LayerSpec(rope=rope, mlp="gated", activation="silu")


def llama_fields(
    hf: dict, family: str, layer: Callable[[int], LayerSpec], default_head_dim: int | None = None
) -> dict:
    """ModelConfig fields shared by the LLaMA-shaped families (LLaMA, Mistral, Qwen, Phi-3);
    `layer(head_dim)` gives the family's layers' spec."""
    if hf.get("mlp_bias"):
        raise ValueError(f"{family}: mlp_bias=True is unsupported")
    d, heads = _count(hf, "hidden_size"), _count(hf, "num_attention_heads")
    head_dim = _count(hf, "head_dim", default_head_dim or d // heads)
    return dict(
        family=family,
        vocab_size=_count(hf, "vocab_size"),
        d_model=d,
        layers=(layer(head_dim),) * _count(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=_count(hf, "num_key_value_heads", heads),
        head_dim=head_dim,
        d_ff=_count(hf, "intermediate_size"),
        max_positions=_count(hf, "max_position_embeddings", 2048),
        norm="rmsnorm",
        norm_eps=_real(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )


def llama_config(hf: dict) -> ModelConfig:
    fields = llama_fields(hf, "llama", lambda head_dim: swiglu(
        hf, "llama", hf_rope(hf, "llama", head_dim)))
    # Mistral's sliding window: up to the window every key is in it, so capping the sequence
    # length there keeps us exact without a windowed mask.
    if hf.get("sliding_window") is not None:
        fields["max_positions"] = min(fields["max_positions"], _count(hf, "sliding_window"))
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(**fields, qkv_bias=bias, out_bias=bias)


# Where a mixture of experts keeps its router and each expert's gate, up and down weights
# ({p}: the layer's prefix, {j}: the expert): Qwen3-MoE's names; Mixtral passes its own.
EXPERT_NAMES = ("{p}.mlp.gate.weight", "{p}.mlp.experts.{j}.gate_proj.weight",
                "{p}.mlp.experts.{j}.up_proj.weight", "{p}.mlp.experts.{j}.down_proj.weight")


def expert_weights(
    get: TensorGetter, prefix: str, moe: Moe, d: int, names: tuple[str, str, str, str]
) -> ExpertWeights:
    router, gate, up, down = names
    f = moe.d_ff

    def each(name: str, shape: tuple[int, int]) -> tuple[LazyTensor, ...]:  # (out, in) -> (in, out)
        return tuple(get(name.format(p=prefix, j=j), shape).T for j in range(moe.n_experts))

    return ExpertWeights(
        router=get(router.format(p=prefix), (moe.n_experts, d)).T,
        expert_gate=each(gate, (f, d)), expert_in=each(up, (f, d)), expert_out=each(down, (d, f)),
    )


def llama_params(
    get: TensorGetter, cfg: ModelConfig, expert_names: tuple[str, str, str, str] = EXPERT_NAMES
) -> Params:
    d, f, e = cfg.d_model, cfg.d_ff, cfg.head_dim
    h, k = cfg.n_heads, cfg.n_kv_heads

    def linear(name: str, out_dim: int, in_dim: int) -> LazyTensor:
        return get(name, (out_dim, in_dim)).T  # torch Linear (out, in) -> (in, out)

    def bias(on: bool, name: str, *shape: int) -> LazyTensor | None:
        return get(name, (math.prod(shape),)).reshape(shape) if on else None

    def head_norm(on: bool, name: str) -> NormWeights | None:
        return NormWeights(get(name, (e,))) if on else None

    layers = []
    for i, spec in enumerate(cfg.layers):
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        attn = AttentionWeights(
            wq=linear(f"{a}.q_proj.weight", h * e, d).reshape(d, h, e),
            wk=linear(f"{a}.k_proj.weight", k * e, d).reshape(d, k, e),
            wv=linear(f"{a}.v_proj.weight", k * e, d).reshape(d, k, e),
            wo=linear(f"{a}.o_proj.weight", d, h * e).reshape(h, e, d),
            bq=bias(cfg.qkv_bias, f"{a}.q_proj.bias", h, e),
            bk=bias(cfg.qkv_bias, f"{a}.k_proj.bias", k, e),
            bv=bias(cfg.qkv_bias, f"{a}.v_proj.bias", k, e),
            bo=bias(cfg.out_bias, f"{a}.o_proj.bias", d),
            q_norm=head_norm(spec.qk_norm, f"{a}.q_norm.weight"),
            k_norm=head_norm(spec.qk_norm, f"{a}.k_norm.weight"),
        )
        m = f"{p}.mlp"
        mlp = MlpWeights(
            w_gate=linear(f"{m}.gate_proj.weight", f, d),
            w_in=linear(f"{m}.up_proj.weight", f, d),
            w_out=linear(f"{m}.down_proj.weight", d, f),
        ) if spec.moe is None else expert_weights(get, p, spec.moe, d, expert_names)
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
        lm_head=head.T,
    )
